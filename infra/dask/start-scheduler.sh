#!/usr/bin/env bash
# Start a Dask scheduler for the fss flows (point them at it with FSS_DASK_ADDRESS).
#
# Binds 127.0.0.1 unless --host or --interface says otherwise: a Dask scheduler runs whatever
# pickled code it is sent, so it must never listen on a network by accident.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: start-scheduler.sh [options] [-- extra `dask scheduler` args]

  --host HOST            address to bind (default: $FSS_DASK_HOST or 127.0.0.1)
  --interface IFACE      bind this network interface instead (e.g. eth0, ib0)
  --port PORT            scheduler port (default: $FSS_DASK_PORT or 8786)
  --dashboard-address A  dashboard bind address (default: HOST:8787, or 127.0.0.1:8787
                         with --interface; the dashboard needs bokeh installed)
  --background           detach; log, pid file and scheduler file go to the run dir
  --run-dir DIR          default: ${FSS_HOME:-.fss}/dask
  --wait SECONDS         background mode: how long to wait for the scheduler (default 60)
  --dry-run              print the command and exit
Environment: PYTHON (the interpreter with this project installed, default python3).
EOF
}

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

HOST="${FSS_DASK_HOST:-127.0.0.1}"
INTERFACE=""
PORT="${FSS_DASK_PORT:-8786}"
DASHBOARD=""
BACKGROUND=0
WAIT_S=60
DRY_RUN=0
EXTRA=()

while [[ $# -gt 0 ]]; do
    case "$1" in
        --host) HOST="$2"; shift 2 ;;
        --interface) INTERFACE="$2"; shift 2 ;;
        --port) PORT="$2"; shift 2 ;;
        --dashboard-address) DASHBOARD="$2"; shift 2 ;;
        --background) BACKGROUND=1; shift ;;
        --run-dir) RUN_DIR="$2"; shift 2 ;;
        --wait) WAIT_S="$2"; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; EXTRA=("$@"); break ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
done

SCHEDULER_FILE="$RUN_DIR/scheduler.json"
CMD=("$PYTHON" -m dask scheduler --port "$PORT" --scheduler-file "$SCHEDULER_FILE")
if [[ -n "$INTERFACE" ]]; then
    # An interface is an explicit choice to serve a network; the dashboard still stays local
    # (reach it with ssh -L 8787:127.0.0.1:8787) unless --dashboard-address says otherwise.
    CMD+=(--interface "$INTERFACE" --dashboard-address "${DASHBOARD:-127.0.0.1:8787}")
else
    CMD+=(--host "$HOST" --dashboard-address "${DASHBOARD:-$HOST:8787}")
fi
CMD+=("${EXTRA[@]}")

if [[ $DRY_RUN -eq 1 ]]; then
    show_cmd "${CMD[@]}"
    exit 0
fi

check_project_importable
mkdir -p "$RUN_DIR"
rm -f "$SCHEDULER_FILE"  # a stale file would make the readiness check below lie

if [[ $BACKGROUND -eq 0 ]]; then
    exec "${CMD[@]}"
fi

LOG="$RUN_DIR/scheduler.log"
setsid nohup "${CMD[@]}" >"$LOG" 2>&1 &
echo $! >"$RUN_DIR/scheduler.pid"

# The scheduler writes its scheduler file once it listens: that is the readiness signal.
deadline=$((SECONDS + WAIT_S))
until [[ -s "$SCHEDULER_FILE" ]]; do
    if ! kill -0 "$(cat "$RUN_DIR/scheduler.pid")" 2>/dev/null; then
        tail -n 20 "$LOG" >&2
        die "the scheduler exited; see $LOG"
    fi
    if [[ $SECONDS -ge $deadline ]]; then
        die "the scheduler did not start within ${WAIT_S}s; see $LOG"
    fi
    sleep 0.5
done
ADDRESS="$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["address"])' \
    "$SCHEDULER_FILE")"
echo "scheduler $ADDRESS (pid $(cat "$RUN_DIR/scheduler.pid"), log $LOG)"
echo "export FSS_DASK_ADDRESS=$ADDRESS"
