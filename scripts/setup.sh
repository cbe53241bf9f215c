#!/usr/bin/env bash
# Install adams_dist with its test, example and framework (integrations) extras. torch goes in first when none is present
# (scripts/install_torch.sh: the CPU build on machines without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PYTHON="$PY" bash scripts/install_torch.sh
"$PY" -m pip install --quiet -e ".[dev,examples,integrations]"
