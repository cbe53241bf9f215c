#!/usr/bin/env bash
# From a fresh clone, with or without a virtual environment: install what is missing, then train the
# example GPT (2 CPU processes, or one process per GPU when nvidia-smi lists any). Arguments go to
# examples/train_gpt.py. Set PYTHON to pick the interpreter (default: python).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHON="${PYTHON:-python}"  # the launchers start torchrun with this interpreter too

# torch first, pinned: left to resolve adams-dist's "torch>=2.4" by itself, pip would pull the newest torch,
# a multi-GB CUDA build on Linux even without a GPU. Install the build you want first if you need another.
bash scripts/install_torch.sh
"$PYTHON" -m pip install -e ".[examples]"

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
  exec bash launch/train_gpu.sh "$@"
fi
exec bash launch/train_cpu.sh "$@"
