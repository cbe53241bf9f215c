#!/usr/bin/env bash
# Train the example GPT on CPU: NPROC processes (default 2) talking over gloo, one shard of the
# optimizer state each. Extra arguments go to examples/train_gpt.py, e.g.
#   NPROC=4 bash launch/train_cpu.sh --steps 600 --optimizer adamw
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the checkout's adams_dist, installed or not
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"        # the script then gives each rank cores/NPROC threads
TORCHRUN=("${PYTHON:-python}" -m torch.distributed.run)  # = torchrun, from the interpreter that has torch
# --device cpu first so a later --device in "$@" wins; on CPU the script picks gloo.
exec "${TORCHRUN[@]}" --standalone --nproc_per_node="${NPROC:-2}" examples/train_gpt.py --device cpu "$@"
