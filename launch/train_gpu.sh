#!/usr/bin/env bash
# Train the example GPT on every GPU of this machine (or NPROC of them), one process per GPU, NCCL
# (the script picks it because each rank has a CUDA device). Extra arguments go to examples/train_gpt.py, e.g.
#   bash launch/train_gpu.sh --n-layer 8 --d-model 512 --n-head 8 --batch-size 64 --steps 2000
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the checkout's adams_dist, installed or not
NPROC="${NPROC:-$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)}"
if [ "$NPROC" -lt 1 ]; then
  echo "train_gpu.sh: nvidia-smi lists no GPU (set NPROC, or use launch/train_cpu.sh)" >&2
  exit 1
fi
TORCHRUN=("${PYTHON:-python}" -m torch.distributed.run)  # = torchrun, from the interpreter that has torch
exec "${TORCHRUN[@]}" --standalone --nproc_per_node="$NPROC" examples/train_gpt.py "$@"
