#!/usr/bin/env bash
# One device session's GPU work, run unattended in the background (setsid) while the device calls only bring model
# parts and keep the machine warm (bench/DEVICE.md). After `source bench/device_env.sh`, from the checkout's root:
#   bash bench/device_session.sh smollm2   # once SmolLM2 is there: its step-speed (issue 23) and serving (issue 27)
#                                          # benchmarks, alone on the GPU while the Qwen parts come
#   bash bench/device_session.sh qwen      # once Qwen is there: waits for the SmolLM2 benchmarks, then Qwen's (nf4
#                                          # and fp16 steps, nf4 serving), then issue 22's dev runs in the background
#   bash bench/device_session.sh train     # issue 22's dev runs only (Qwen round 3, SmolLM2 BoolQ), in the background
#   bash bench/device_session.sh serve-qwen OUT   # stop the training runs (their seed checkpoints resume them next
#                                          # session), Qwen nf4 serving alone on the GPU (5.5 min cap), collect;
#                                          # sources device_env.sh itself (a call's shell starts without its exports)
#   bash bench/device_session.sh graphs    # once SmolLM2 is there: issue 23's CUDA graphs against the eager step,
#                                          # alone on the GPU while the Qwen parts come (~1.5 min; then graphs-bench.done);
#                                          # with SMOLLM2_RUNS=1, then SmolLM2's accuracy under --tf32 / --cuda-graphs
#                                          # (SST-2) and BoolQ on its last layer (3 seeds each)
#   bash bench/device_session.sh llama7b   # the 7B-shape nf4 step against zolite-base, alone (~10 min; llama7b.done)
#   bash bench/device_session.sh qwen-graphs [VERB]   # once Qwen is there: after a benchmark still running alone
#                                          # (graphs, llama7b), Qwen's graphed step (layers 1 and 27, nf4, BoolQ) alone
#                                          # (~2 min), then real_scale_dev.sh VERB (default final-short), in the background
#   bash bench/device_session.sh collect OUT   # everything so far -> OUT/res.tgz (real_scale_dev.sh collect)
# Timings come first and alone; each benchmark is capped (timeout) so the training runs always start.
set -u
R=/root/res
mkdir -p $R
if [ -d .device/zolite-base/zolite ] && [ ! -d /root/zolite-base/zolite ]; then cp -r .device/zolite-base /root/zolite-base; fi
BASE=""
[ -d /root/zolite-base/zolite ] && BASE="--baseline /root/zolite-base"
case $1 in
smollm2)
  cd /root/src || exit 1
  setsid nohup bash -c "
    timeout 420 python bench/step_speed.py --out $R/step_speed/small --data /root/data --steps 30 $BASE \
      --configs smollm2-L11,smollm2-all,smollm2-L11-f16,smollm2-all-f16
    timeout 300 python bench/serve_bench.py --model smollm2-135m --device cuda --mode fp16 --requests 64 \
      --out $R/serve_gpu_smollm2
    touch $R/smollm2-bench.done" > $R/smollm2-bench.log 2>&1 < /dev/null &
  echo "started: $R/smollm2-bench.log" ;;
qwen)
  cd /root/src || exit 1
  setsid nohup bash -c "
    while [ ! -f $R/smollm2-bench.done ]; do sleep 2; done
    timeout 600 python bench/step_speed.py --out $R/step_speed/gpu --data /root/data --steps 30 $BASE \
      --configs ${SPEED_CONFIGS:-qwen-L1-nf4,qwen-L1-fp16}
    timeout 300 python bench/serve_bench.py --model qwen2.5-coder-1.5b --layer 1 --device cuda --mode nf4 \
      --requests 48 --out $R/serve_gpu_qwen
    bash bench/real_scale_dev.sh qwen-round3
    bash bench/real_scale_dev.sh smollm2-boolq" > $R/qwen-bench.log 2>&1 < /dev/null &
  echo "started: $R/qwen-bench.log" ;;
graphs)
  cd /root/src || exit 1
  setsid nohup bash -c "
    timeout 300 python bench/step_speed.py --out $R/step_speed/graphs --data /root/data --steps 30 \
      --rounds ${GRAPH_ROUNDS:-2} --only zolite,zolite-bare,graphs,graphs-bare,eager,floor-2b --profile graphs-bare \
      --configs ${GRAPH_CONFIGS:-smollm2-L11,smollm2-L11-tf32,smollm2-all,smollm2-all-tf32,smollm2-all-f16}
    touch $R/graphs-bench.done
    if [ -n \"${SMOLLM2_RUNS:-}\" ]; then
      zolite ablate --model smollm2-135m --task sst2 --plan bench/plans/smollm2_fast.toml --seeds 3 --jobs 3 \\
        --data /root/data --out $R/smollm2-fast/sst2 --quiet > $R/smollm2-fast.log 2>&1 &
      zolite ablate --model smollm2-135m --task boolq --plan bench/plans/smollm2_boolq_last.toml --seeds 3 --jobs 3 \\
        --data /root/data --out $R/smollm2-last/boolq --quiet > $R/smollm2-last.log 2>&1
      wait
    fi" > $R/graphs-bench.log 2>&1 < /dev/null &
  echo "started: $R/graphs-bench.log" ;;
qwen-graphs)
  # once Qwen is there: after any benchmark still running alone on the GPU (SmolLM2's graphs, the 7B row; at most 5
  # more minutes), Qwen's graphed step (layers 1 and 27, nf4, BoolQ) alone (~2 min), then issue 22's runs
  # (real_scale_dev.sh VERB, default final-short), all in the background
  cd /root/src || exit 1
  setsid nohup bash -c "
    for i in \$(seq 150); do
      busy=; for b in graphs-bench llama7b; do [ -f $R/\$b.log ] && [ ! -f $R/\$b.done ] && busy=1; done
      [ -z \"\$busy\" ] && break; sleep 2
    done
    timeout 200 python bench/step_speed.py --out $R/step_speed/qwen-graphs --data /root/data --steps 20 --rounds 1 \
      --only zolite-bare,graphs-bare,floor-2b --configs qwen-L1-nf4,qwen-L27-nf4
    bash bench/real_scale_dev.sh ${2:-final-short}" > $R/qwen-graphs.log 2>&1 < /dev/null &
  echo "started: $R/qwen-graphs.log" ;;
llama7b)
  # issue 23's last row: the 7B-shape nf4 step against the baseline zolite (carry .device/zolite-base), alone on the
  # GPU while the Qwen parts come (~10 min with the one-time build of the random 7B model; then llama7b.done)
  cd /root/src || exit 1
  setsid nohup bash -c "
    timeout 720 python bench/step_speed.py --out $R/step_speed/llama7b --steps 20 --rounds 1 $BASE \
      --only zolite,zolite-bare,base,base-bare,eager,floor-2x,floor-2b --configs llama7b-L1-nf4
    touch $R/llama7b.done" > $R/llama7b.log 2>&1 < /dev/null &
  echo "started: $R/llama7b.log" ;;
train)
  cd /root/src || exit 1
  bash bench/real_scale_dev.sh qwen-round3
  bash bench/real_scale_dev.sh smollm2-boolq
  echo "started: $R/qwen3-*.log, $R/smollm2-r3-boolq.log" ;;
serve-qwen)
  [ $# -ge 2 ] || { echo "usage: $0 serve-qwen OUT" >&2; exit 2; }
  here=$(pwd)
  source bench/device_env.sh > /dev/null
  cd /root/src || exit 1
  bash bench/real_scale_dev.sh stop
  # the cells the 2026-12-06 run did not reach, the largest first (results.json is rewritten after each cell)
  timeout 330 python bench/serve_bench.py --model qwen2.5-coder-1.5b --layer 1 --device cuda --mode nf4 \
    --requests 32 --clients 32,8 --workers one-at-a-time,mixed,continuous --out $R/serve_gpu_qwen_rest \
    > $R/serve-qwen.log 2>&1
  cd "$here" && bash bench/real_scale_dev.sh collect "$2" ;;
collect)
  tail -n 3 $R/*.log 2>/dev/null | cut -c1-300
  bash "$(dirname "$0")/real_scale_dev.sh" collect "$2" ;;
*)
  echo "usage: $0 smollm2 | qwen | graphs | qwen-graphs | llama7b | train | serve-qwen OUT | collect OUT" >&2; exit 2 ;;
esac
