#!/usr/bin/env bash
# One GPU check for a lent machine, inside 8 minutes: proxy trials packed k = 1, 8, 16 per
# GPU (under CUDA MPS when it starts) and a bfloat16 on/off pair, as a table (bench/gpu_check.py).
#
#   bench/gpu_check.sh            # on the GPU machine: results in $OUT (else runs/gpu-check)
#   bench/gpu_check.sh --cpu      # a quick dry check of the script on a CPU (tiny sizes)
#
# Python: $PYTHON, else .venv/bin/python, else python3 (the device image's, which has torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
BUDGET_S=${BUDGET_S:-480}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout --kill-after=10 "$BUDGET_S" "$PY" -m bench.gpu_check --budget-s "$((BUDGET_S - 30))" "$@"
