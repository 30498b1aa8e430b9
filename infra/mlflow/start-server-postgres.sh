#!/usr/bin/env bash
# Start the MLflow tracking server on a PostgreSQL backend: start-server.sh with checks.
#
# The connection URI comes from the environment, never from this file:
#   export MLFLOW_BACKEND_STORE_URI=postgresql://mlflow@db.example.internal:5432/mlflow
# and the password from libpq's usual places (PGPASSWORD from a secret manager, or ~/.pgpass
# with mode 600), so that it is neither in the URI nor on any command line.
# Needs psycopg2 next to the project: pip install psycopg2-binary
set -euo pipefail

PYTHON="${PYTHON:-python3}"
URI="${MLFLOW_BACKEND_STORE_URI:-}"

case "$URI" in
    postgresql://*|postgresql+psycopg2://*) ;;
    "") echo "error: set MLFLOW_BACKEND_STORE_URI=postgresql://USER@HOST:5432/DB" >&2; exit 2 ;;
    *) echo "error: MLFLOW_BACKEND_STORE_URI is not a postgresql:// URI" >&2; exit 2 ;;
esac
if [[ " $* " != *" --dry-run "* ]] && ! "$PYTHON" -c 'import psycopg2' 2>/dev/null; then
    echo "error: $PYTHON cannot import psycopg2: pip install psycopg2-binary" >&2
    exit 2
fi

exec "$(dirname "${BASH_SOURCE[0]}")/start-server.sh" "$@"
