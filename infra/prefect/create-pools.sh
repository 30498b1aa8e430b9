#!/usr/bin/env bash
# Create the two work pools that the deployments in prefect.yaml use, "fss-cpu" and "fss-gpu",
# both of type "process" (a worker runs each flow run as a subprocess on its own host). Safe to
# rerun: an existing pool is left as it is. (`fss deploy` creates the same pools.)
set -euo pipefail

PYTHON="${PYTHON:-python3}"
# Without an API URL the CLI would talk to a throwaway ephemeral server and the pools would be
# lost: insist on a real one.
: "${PREFECT_API_URL:?export PREFECT_API_URL=http://127.0.0.1:4200/api (see start-server.sh)}"
# How many GPU flow runs may run at once, over all GPU hosts (default: no pool-wide limit; each
# GPU worker already takes one run at a time, see start-worker.sh).
GPU_POOL_LIMIT="${GPU_POOL_LIMIT:-}"

for pool in fss-cpu fss-gpu; do
    if "$PYTHON" -m prefect work-pool inspect "$pool" >/dev/null 2>&1; then
        echo "work pool $pool exists"
    else
        "$PYTHON" -m prefect work-pool create "$pool" --type process
    fi
done
if [[ -n "$GPU_POOL_LIMIT" ]]; then
    "$PYTHON" -m prefect work-pool set-concurrency-limit fss-gpu "$GPU_POOL_LIMIT"
fi
