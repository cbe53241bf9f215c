#!/usr/bin/env bash
# Install torch when the interpreter has none. Without a GPU (no working nvidia-smi) the CPU build comes
# from PyTorch's CPU wheel index (about 200 MB, no CUDA packages); with a GPU, or when that index cannot be
# reached, from the default index (on Linux: the CUDA build plus its nvidia-* packages, several GB).
#   ADAMS_DIST_TORCH_SPEC   what to install (default torch==2.13.0)
#   ADAMS_DIST_TORCH_INDEX  the CPU wheel index (default https://download.pytorch.org/whl/cpu)
#   DRY_RUN=1               print the pip command instead of running it (and do not look for torch first)
set -euo pipefail
PY=${PYTHON:-python3}
SPEC=${ADAMS_DIST_TORCH_SPEC:-torch==2.13.0}
CPU_INDEX=${ADAMS_DIST_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}

if [ -z "${DRY_RUN:-}" ] && "$PY" -c "import torch" >/dev/null 2>&1; then
  exit 0
fi
reachable() {  # the index answers within 10 s (urllib: no curl needed)
  "$PY" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=10)" "$1" >/dev/null 2>&1
}
pip_install() {
  if [ -n "${DRY_RUN:-}" ]; then echo "$PY -m pip install $*"; else "$PY" -m pip install --quiet "$@"; fi
}
if nvidia-smi -L >/dev/null 2>&1; then
  echo "install_torch: a GPU is present: $SPEC from the default index (the CUDA build)" >&2
  pip_install "$SPEC"
elif reachable "$CPU_INDEX"; then
  echo "install_torch: no GPU: the CPU build of $SPEC from $CPU_INDEX" >&2
  pip_install --index-url "$CPU_INDEX" "$SPEC"
else
  echo "install_torch: no GPU, and $CPU_INDEX cannot be reached: $SPEC from the default index" >&2
  pip_install "$SPEC"
fi
