#!/usr/bin/env bash
# Install msa and everything its demo and tests need, on a fresh machine.
# - keeps an already-installed torch (e.g. your CUDA build);
# - with no torch at all, installs the CPU wheel torch==2.13.0 (a loose range would pull a multi-GB
#   CUDA build on CPU-only machines).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$PY" -m pip install -q torch
  else
    "$PY" -m pip install -q torch==2.13.0
  fi
fi
"$PY" -m pip install -q -e ".[test,hf]"
"$PY" -c "import torch, triton, msa; print(f'msa {msa.__version__} ready: torch {torch.__version__}, triton {triton.__version__}')"
