#!/usr/bin/env bash
# Create ./.venv with the CPU build of torch and rholearn (editable, with test extras).
# Safe to re-run: it only reinstalls when pyproject.toml changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
stamp=.venv/.rholearn-installed
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
    exit 0
fi
echo "[setup] creating .venv with $($PYTHON --version)" >&2
"$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# the CPU wheel: from the local wheel cache if configured, else PyTorch's CPU index
.venv/bin/python -m pip install --quiet "$TORCH_SPEC" \
    || .venv/bin/python -m pip install --quiet "$TORCH_SPEC" \
        --extra-index-url https://download.pytorch.org/whl/cpu
.venv/bin/python -m pip install --quiet -e ".[test,notebook]"
touch "$stamp"
echo "[setup] done: $(.venv/bin/python -c 'import torch, rholearn; print("torch", torch.__version__, "rholearn", rholearn.__version__)')" >&2
