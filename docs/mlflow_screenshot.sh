#!/usr/bin/env bash
# Screenshot of the MLflow runs table of a finished `make run` (docs/mlflow.png in the README).
#   docs/mlflow_screenshot.sh [STORE_URI] [OUT_PNG]
# Starts `mlflow ui` on STORE_URI (default sqlite:///mlflow.db) on a free loopback port, opens the
# saved view of the finals and trials (the address `paploss run` prints at its end) in headless
# Chromium (Debian's package `chromium`), waits for the table to render, writes OUT_PNG, stops the UI.
set -euo pipefail
cd "$(dirname "$0")/.."
STORE=${1:-sqlite:///mlflow.db}
OUT=${2:-docs/mlflow.png}
PORT=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
command -v chromium >/dev/null || { echo "Error: chromium not found (apt-get install chromium)" >&2; exit 2; }
.venv/bin/mlflow ui --backend-store-uri "$STORE" --host 127.0.0.1 --port "$PORT" >/tmp/mlflow-ui-$PORT.log 2>&1 &
UI=$!
trap 'kill $UI 2>/dev/null; wait $UI 2>/dev/null || true' EXIT
for _ in $(seq 60); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 1; done
EXP=$(.venv/bin/python - "$STORE" <<'PY'
import sys
from mlflow import MlflowClient
print(MlflowClient(tracking_uri=sys.argv[1]).get_experiment_by_name("paploss").experiment_id)
PY
)
URL="http://127.0.0.1:$PORT/#/experiments/$EXP/runs?workflowType=machine_learning&viewStateShareKey=paploss-finals"
TMP="$OUT.tmp.png"
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1600,900 \
  --virtual-time-budget=20000 --screenshot="$TMP" "$URL" 2>/dev/null
mv "$TMP" "$OUT"
echo "wrote $OUT from $URL"
