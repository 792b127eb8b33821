#!/usr/bin/env bash
# The GPU check in one command (see benchmarks/gpu_check.py): token equality GPU vs CPU, tokenization, k-means and
# trainer throughput, results in one JSON file. Under 8 minutes on one GPU; --tiny runs the CPU test of its logic.
#   bash benchmarks/gpu_check.sh [--tiny] [--out gpu_check.json] [--device auto|cpu|cuda]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$root/.venv/bin/python}
[ -x "$PY" ] || PY=python3
# The JSON is rewritten after every section, so a run stopped by the time limit keeps what it measured.
exec timeout --signal=INT --kill-after=30 480 "$PY" "$root/benchmarks/gpu_check.py" "$@"
