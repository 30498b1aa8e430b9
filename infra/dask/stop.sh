#!/usr/bin/env bash
# Stop the scheduler and workers that start-*.sh --background started from this run dir.
# Workers go first so that they do not spend their death timeout reconnecting.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if [[ "${1:-}" == "--run-dir" ]]; then
    RUN_DIR="$2"
fi
[[ -d "$RUN_DIR" ]] || die "no run dir $RUN_DIR"

# Each process was started with setsid, so its pid is also its process group: SIGTERM to the
# process lets dask shut down cleanly; SIGKILL to the group after 20 s leaves no orphan behind.
stop_pidfile() {
    local pidfile="$1" pid
    pid="$(cat "$pidfile")"
    if kill -TERM "$pid" 2>/dev/null; then
        for _ in $(seq 40); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.5
        done
        kill -KILL -- "-$pid" 2>/dev/null || true
        echo "stopped $(basename "$pidfile" .pid) (pid $pid)"
    fi
    rm -f "$pidfile"
}

shopt -s nullglob
for pidfile in "$RUN_DIR"/worker-*.pid; do
    stop_pidfile "$pidfile"
done
if [[ -f "$RUN_DIR/scheduler.pid" ]]; then
    stop_pidfile "$RUN_DIR/scheduler.pid"
fi
rm -f "$RUN_DIR/scheduler.json"
