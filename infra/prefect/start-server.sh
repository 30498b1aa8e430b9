#!/usr/bin/env bash
# Start a Prefect API server (with UI) that flows and work-pool workers report to.
#
# Binds 127.0.0.1 unless --host says otherwise. Database: SQLite under $PREFECT_HOME by
# default; for PostgreSQL export PREFECT_SERVER_DATABASE_CONNECTION_URL
# (postgresql+asyncpg://USER:PASSWORD@HOST:5432/DB) from your secret store, never in this file.
# Needs prefect==3.8.8 with fastapi<0.151 (pyproject.toml pins both; see README.md here).
set -euo pipefail

usage() {
    cat <<'EOF_USAGE'
usage: start-server.sh [options] [-- extra `prefect server start` args]

  --host HOST   address to bind (default: $PREFECT_SERVER_API_HOST or 127.0.0.1)
  --port PORT   default: $PREFECT_SERVER_API_PORT or 4200
  --no-ui       API only
  --dry-run     print the command and exit
Environment: PREFECT_HOME (default ${FSS_HOME:-.fss}/prefect-server), PYTHON (default python3).
EOF_USAGE
}

PYTHON="${PYTHON:-python3}"
HOST="${PREFECT_SERVER_API_HOST:-127.0.0.1}"
PORT="${PREFECT_SERVER_API_PORT:-4200}"
UI=(--ui)
DRY_RUN=0
EXTRA=()

while [[ $# -gt 0 ]]; do
    case "$1" in
        --host) HOST="$2"; shift 2 ;;
        --port) PORT="$2"; shift 2 ;;
        --no-ui) UI=(--no-ui); shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; EXTRA=("$@"); break ;;
        *) usage >&2; echo "error: unknown option: $1" >&2; exit 2 ;;
    esac
done

# The server's own state (SQLite DB, logs) lives apart from any client profile.
export PREFECT_HOME="${PREFECT_HOME:-${FSS_HOME:-.fss}/prefect-server}"
export PREFECT_SERVER_ANALYTICS_ENABLED="${PREFECT_SERVER_ANALYTICS_ENABLED:-false}"
# A client-side API URL left in the environment would become the UI's API URL
# (PREFECT_UI_API_URL defaults to it); flows/runtime.py drops it for the same reason.
unset PREFECT_API_URL

CMD=("$PYTHON" -m prefect server start --host "$HOST" --port "$PORT" "${UI[@]}" "${EXTRA[@]}")
if [[ $DRY_RUN -eq 1 ]]; then
    printf '%q ' "${CMD[@]}"
    printf '\n'
    exit 0
fi

mkdir -p "$PREFECT_HOME"
echo "Prefect API: export PREFECT_API_URL=http://$HOST:$PORT/api" >&2
exec "${CMD[@]}"
