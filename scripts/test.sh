#!/usr/bin/env bash
# Set up, then run the whole test suite in parallel (multi-process tests use gloo on 127.0.0.1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export ADAMS_DIST_FRAMEWORKS=required  # setup.sh installed them: a framework test must not skip
exec "$PY" -m pytest -n "${PYTEST_WORKERS:-2}" --timeout=600 -q "$@"
