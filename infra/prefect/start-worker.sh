#!/usr/bin/env bash
# Start a Prefect worker that runs the flow runs of one work pool as subprocesses of this host.
#
#   start-worker.sh fss-cpu              # a CPU host: up to --limit runs at once (default 4)
#   start-worker.sh fss-gpu --gpu 0      # one worker per GPU: sees only GPU 0, one run at a time
#
# Flow runs inherit this process's environment, so export here what the flows need:
# PREFECT_API_URL (required), FSS_DASK_ADDRESS (an external Dask scheduler),
# MLFLOW_TRACKING_URI (the tracking server), and FSS_PROJECT_DIR: the checkout that the `pull`
# step of prefect.yaml changes into (default: the checkout holding this script). The project
# must be installed there (pip install -e . or the container image).
set -euo pipefail

usage() {
    cat <<'EOF_USAGE'
usage: start-worker.sh POOL [--gpu INDEX] [--limit N] [--name NAME] [--dry-run]
                       [-- extra `prefect worker start` args]
EOF_USAGE
}

PYTHON="${PYTHON:-python3}"
POOL=""
GPU=""
LIMIT=4
NAME=""
DRY_RUN=0
EXTRA=()
# Workers open no port unless started with --with-healthcheck; keep that one local if used.
export PREFECT_WORKER_WEBSERVER_HOST="${PREFECT_WORKER_WEBSERVER_HOST:-127.0.0.1}"

while [[ $# -gt 0 ]]; do
    case "$1" in
        --gpu) GPU="$2"; LIMIT=1; shift 2 ;;
        --limit) LIMIT="$2"; shift 2 ;;
        --name) NAME="$2"; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; EXTRA=("$@"); break ;;
        -*) usage >&2; echo "error: unknown option: $1" >&2; exit 2 ;;
        *) POOL="$1"; shift ;;
    esac
done
[[ -n "$POOL" ]] || { usage >&2; exit 2; }
FSS_PROJECT_DIR="${FSS_PROJECT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
export FSS_PROJECT_DIR
NAME="${NAME:-${HOSTNAME%%.*}-$POOL${GPU}}"

if [[ -n "$GPU" ]]; then
    # The flow run and the torch code in it see exactly one GPU, as device cuda:0.
    export CUDA_VISIBLE_DEVICES="$GPU"
fi
# --install-policy never: the image or venv already has every package; a worker must not pip
# install anything at run time.
CMD=("$PYTHON" -m prefect worker start --pool "$POOL" --type process --name "$NAME"
     --limit "$LIMIT" --install-policy never "${EXTRA[@]}")

if [[ $DRY_RUN -eq 1 ]]; then
    [[ -z "$GPU" ]] || printf 'CUDA_VISIBLE_DEVICES=%s ' "$GPU"
    printf '%q ' "${CMD[@]}"
    printf '\n'
    exit 0
fi
: "${PREFECT_API_URL:?export PREFECT_API_URL=http://SERVER:4200/api}"
exec "${CMD[@]}"
