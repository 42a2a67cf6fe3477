#!/usr/bin/env bash
# Issue 23's GPU measurement (bench/step_speed.py), unattended, on the device machine: after the models came over
# (bench/DEVICE.md: SmolLM2 in 2 calls, Qwen2.5-Coder-1.5B in 22) and `source bench/device_env.sh`, from the
# checkout's root:
#   bash bench/step_speed_device.sh start          # background (setsid): SmolLM2 + Qwen configs, then the 7B shape
#   bash bench/step_speed_device.sh collect $OUT   # results so far (tables, JSON, log) -> $OUT
# The baseline step (zolite before issue 23) is timed beside it when the checkout carries its zolite package in
# .device/zolite-base (made here with: mkdir -p .device/zolite-base && git archive 4b3a7fd zolite | tar -x -C
# .device/zolite-base). The 7B shape is built once into /root/llama7b-random (13.5 GB fp16, ~1-2 min), then loaded
# in nf4. Expect ~10 min for the small configs and ~10 min for the 7B shape on an H100/H200.
set -u
R=/root/res/step_speed
case $1 in
start)
  mkdir -p $R
  if [ -d .device/zolite-base/zolite ]; then rm -rf /root/zolite-base && cp -r .device/zolite-base /root/zolite-base; fi
  BASE=""
  [ -d /root/zolite-base/zolite ] && BASE="--baseline /root/zolite-base"
  cd /root/src || exit 1
  setsid nohup bash -c "python bench/step_speed.py --out $R/small --data /root/data --steps 30 $BASE \
      --configs smollm2-L11,smollm2-all,smollm2-L11-f16,smollm2-all-f16,qwen-L1-nf4,qwen-L1-fp16; \
    python bench/step_speed.py --out $R/7b --configs llama7b-L1-nf4 --steps 20 --rounds 2 --warmup 3 $BASE" \
    > $R/run.log 2>&1 < /dev/null &
  echo "started: tail $R/run.log" ;;
collect)
  nvidia-smi > $R/nvidia-smi.txt 2>&1
  tar czf $2/step_speed.tgz -C /root/res step_speed && ls -la $2 ;;
*)
  echo "usage: $0 start | collect OUT" >&2; exit 2 ;;
esac
