#!/usr/bin/env bash
# Start an MLflow tracking server for the fss runs (point clients at it with
# MLFLOW_TRACKING_URI=http://HOST:PORT).
#
# Backend: $MLFLOW_BACKEND_STORE_URI, default sqlite:///mlflow.db in the current folder (MLflow 3
# refuses the file store). The URI is read from the environment by `mlflow server` itself and
# never put on a command line, so a database password in it does not show up in `ps`.
# Artifacts are proxied by the server (clients need no storage credentials) and stored under
# --artifacts-destination: a folder, or s3://bucket/prefix with the server's own credentials.
set -euo pipefail

usage() {
    cat <<'EOF_USAGE'
usage: start-server.sh [options] [-- extra `mlflow server` args]

  --host HOST                  address to bind (default: $MLFLOW_HOST or 127.0.0.1)
  --port PORT                  default: $MLFLOW_PORT or 5000
  --artifacts-destination URI  default: $MLFLOW_ARTIFACTS_DESTINATION or ./mlartifacts
  --workers N                  server worker processes (default 2)
  --dry-run                    print the command and exit
Environment: MLFLOW_BACKEND_STORE_URI (default sqlite:///mlflow.db), PYTHON (default python3).
EOF_USAGE
}

PYTHON="${PYTHON:-python3}"
HOST="${MLFLOW_HOST:-127.0.0.1}"
PORT="${MLFLOW_PORT:-5000}"
ARTIFACTS="${MLFLOW_ARTIFACTS_DESTINATION:-./mlartifacts}"
WORKERS=2
DRY_RUN=0
EXTRA=()
export MLFLOW_BACKEND_STORE_URI="${MLFLOW_BACKEND_STORE_URI:-sqlite:///mlflow.db}"

while [[ $# -gt 0 ]]; do
    case "$1" in
        --host) HOST="$2"; shift 2 ;;
        --port) PORT="$2"; shift 2 ;;
        --artifacts-destination) ARTIFACTS="$2"; shift 2 ;;
        --workers) WORKERS="$2"; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; EXTRA=("$@"); break ;;
        *) usage >&2; echo "error: unknown option: $1" >&2; exit 2 ;;
    esac
done

CMD=("$PYTHON" -m mlflow server --host "$HOST" --port "$PORT"
     --artifacts-destination "$ARTIFACTS" --workers "$WORKERS" "${EXTRA[@]}")
if [[ $DRY_RUN -eq 1 ]]; then
    printf '%q ' "${CMD[@]}"
    printf '\n'
    exit 0
fi

# Create or migrate the schema once, in this one process, before the server's workers (and any
# fanned-out training task) touch it: concurrent first-time migrations fail with "duplicate
# column name" (DESIGN.md, known traps). Same command as `mlflow db upgrade URI`, with the URI
# taken from the environment instead of argv.
"$PYTHON" -c 'import os
from mlflow.db import upgrade
upgrade.main([os.environ["MLFLOW_BACKEND_STORE_URI"]], standalone_mode=False)'

exec "${CMD[@]}"
