#!/usr/bin/env bash
# Train the example GPT on NNODES machines: run this script once on every node, with the same
# rendezvous endpoint (host:port of one of the nodes, reachable from all of them). torchrun's c10d
# rendezvous gathers the nodes there, then starts NPROC_PER_NODE processes on each (default: one per
# GPU, NCCL; 2 on a machine without GPUs, gloo). Extra arguments go to examples/train_gpt.py, e.g.
#   # on node 0 (node0.example is its address), then the same with NODE_RANK=1 on node 1:
#   MASTER_ADDR=node0.example MASTER_PORT=29500 NNODES=2 NODE_RANK=0 bash launch/train_multinode.sh --steps 600
# Environment:
#   RDZV_ENDPOINT        host:port of the rendezvous (default: $MASTER_ADDR:$MASTER_PORT, port 29500)
#   NNODES               number of nodes (required)
#   NODE_RANK            this node's rank (default: $SLURM_NODEID, else 0); c10d ranks the nodes in the
#                        order they join, so it is informational only
#   NPROC_PER_NODE       processes on this node (default: GPUs listed by nvidia-smi, else 2)
#   RDZV_ID              the run's id, the same on every node (default: $SLURM_JOB_ID, else adams_dist)
#   RDZV_TIMEOUT         seconds to wait for all nodes to join (default: 900)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the checkout's adams_dist, installed or not

: "${NNODES:?train_multinode.sh: set NNODES (the number of nodes)}"
if [ -z "${RDZV_ENDPOINT:-}" ]; then
  : "${MASTER_ADDR:?train_multinode.sh: set MASTER_ADDR (the address of a node) or RDZV_ENDPOINT (host:port)}"
  RDZV_ENDPOINT="$MASTER_ADDR:${MASTER_PORT:-29500}"
fi
GPUS="$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)"
DEVICE_ARGS=()
if [ "$GPUS" -lt 1 ]; then
  DEVICE_ARGS=(--device cpu)                    # first, so a later --device in "$@" wins; gloo on CPU
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # the script then gives each rank cores/NPROC threads
fi
NPROC_PER_NODE="${NPROC_PER_NODE:-$([ "$GPUS" -ge 1 ] && echo "$GPUS" || echo 2)}"

TORCHRUN=("${PYTHON:-python}" -m torch.distributed.run)  # = torchrun, from the interpreter that has torch
exec "${TORCHRUN[@]}" \
  --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" --node_rank="${NODE_RANK:-${SLURM_NODEID:-0}}" \
  --rdzv_backend=c10d --rdzv_endpoint="$RDZV_ENDPOINT" --rdzv_id="${RDZV_ID:-${SLURM_JOB_ID:-adams_dist}}" \
  --rdzv_conf="join_timeout=${RDZV_TIMEOUT:-900}" \
  examples/train_gpt.py ${DEVICE_ARGS[@]+"${DEVICE_ARGS[@]}"} "$@"
