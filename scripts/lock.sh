#!/usr/bin/env bash
# Refresh constraints.txt, the lock both README commands and .ci/run install from (torch held at the CPU wheel
# the machines here carry). `bash scripts/lock.sh` keeps every pin that still fits pyproject.toml and adds what
# is new (a dependency added there); `bash scripts/lock.sh --upgrade` moves every pin to the newest release the
# ranges admit (`--upgrade-package NAME` one of them). Run the tests on the new lock before committing it:
#   bash scripts/lock.sh && python3 -m venv /tmp/lock-venv \
#     && /tmp/lock-venv/bin/pip install -c constraints.txt torch==2.13.0 -e ".[dev]" && /tmp/lock-venv/bin/pytest -m "not gpu"
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
if ! "$python" -m piptools compile --help >/dev/null 2>&1; then
  echo "pip-tools is missing: install the dev extra first (.venv/bin/pip install -e \".[dev]\")" >&2
  exit 1
fi
torch_pin=$(mktemp)
trap 'rm -f "$torch_pin"' EXIT
echo "torch==${TORCH_VERSION:-2.13.0}" > "$torch_pin"
"$python" -m piptools compile --quiet "$@" --extra dev --strip-extras --no-emit-index-url \
  --no-emit-find-links --constraint "$torch_pin" --output-file constraints.txt pyproject.toml
# The lock names the CPU build (+cpu); without the local label a GPU machine's CUDA build of the same version
# satisfies it too.
sed -i -E 's/^(torch==[0-9.]+)\+cpu$/\1/' constraints.txt
# pip-compile writes the temporary file's name into the header: name the command instead.
sed -i -E "s|^#    pip-compile .*|#    bash scripts/lock.sh|" constraints.txt
echo "wrote constraints.txt ($(grep -c '==' constraints.txt) pinned packages)"
