#!/usr/bin/env bash
# One-GPU check (kernel parity, step time and memory vs torch fused AdamW, NCCL smoke test) into a JSON.
# Without CUDA, or with --cpu-only, the same checks run small on the CPU. See benchmarks/gpu_check.py.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the checkout's adams_dist, installed or not
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
