#!/usr/bin/env bash
# Start Dask workers on this host and attach them to a scheduler.
#
# CPU mode (default): one `dask worker` with --nworkers processes of --nthreads 1 each (image
# decoding and torch scale by processes, not threads).
# GPU mode (--gpus): ONE worker process per GPU, each seeing only its GPU through
# CUDA_VISIBLE_DEVICES=<i> and advertising --resources GPU=1, so tasks submitted under
# dask.annotate(resources={"GPU": 1}) get a GPU of their own and never share one.
#
# Workers bind 127.0.0.1 unless --host or --interface says otherwise (workers run pickled code).
set -euo pipefail

usage() {
    cat <<'EOF'
usage: start-workers.sh [SCHEDULER_ADDRESS] [options] [-- extra `dask worker` args]

  SCHEDULER_ADDRESS      default: $FSS_DASK_ADDRESS or tcp://127.0.0.1:8786
  --scheduler-file FILE  read the address from a scheduler file instead (shared file system)
  --nworkers N           CPU mode: worker processes (default 2)
  --nthreads N           threads per worker process (default 1)
  --memory-limit M       per worker process, e.g. 8GB or 0.25 (default: auto, i.e. host
                         memory split evenly over this host's workers)
  --resources "K=V ..."  extra resources for CPU-mode workers
  --gpus LIST|all        GPU mode: one worker per listed GPU index (e.g. 0,1,2,3); "all" asks
                         nvidia-smi
  --host HOST            address to bind (default: $FSS_DASK_HOST or 127.0.0.1)
  --interface IFACE      bind this network interface instead (e.g. eth0, ib0)
  --name PREFIX          worker name prefix (default: short host name)
  --background           detach; logs and pid files go to the run dir
  --run-dir DIR          default: ${FSS_HOME:-.fss}/dask
  --wait SECONDS         background mode: how long to wait for registration (default 60)
  --dry-run              print the command(s) and exit
Environment: PYTHON (the interpreter with this project installed, default python3).
EOF
}

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SCHEDULER="${FSS_DASK_ADDRESS:-tcp://127.0.0.1:8786}"
SCHEDULER_FILE=""
NWORKERS=2
NTHREADS=1
MEMORY_LIMIT="auto"
RESOURCES=""
GPUS=""
HOST="${FSS_DASK_HOST:-127.0.0.1}"
INTERFACE=""
NAME="${HOSTNAME%%.*}"
BACKGROUND=0
WAIT_S=60
DRY_RUN=0
EXTRA=()

while [[ $# -gt 0 ]]; do
    case "$1" in
        --scheduler-file) SCHEDULER_FILE="$2"; shift 2 ;;
        --nworkers) NWORKERS="$2"; shift 2 ;;
        --nthreads) NTHREADS="$2"; shift 2 ;;
        --memory-limit) MEMORY_LIMIT="$2"; shift 2 ;;
        --resources) RESOURCES="$2"; shift 2 ;;
        --gpus) GPUS="$2"; shift 2 ;;
        --host) HOST="$2"; shift 2 ;;
        --interface) INTERFACE="$2"; shift 2 ;;
        --name) NAME="$2"; shift 2 ;;
        --background) BACKGROUND=1; shift ;;
        --run-dir) RUN_DIR="$2"; shift 2 ;;
        --wait) WAIT_S="$2"; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; EXTRA=("$@"); break ;;
        -*) usage >&2; die "unknown option: $1" ;;
        *) SCHEDULER="$1"; shift ;;
    esac
done

# Arguments every worker gets, whatever the mode.
COMMON=(--nthreads "$NTHREADS" --no-dashboard)
if [[ -n "$SCHEDULER_FILE" ]]; then
    COMMON+=(--scheduler-file "$SCHEDULER_FILE")
fi
# Even without a dashboard each worker serves /health and /metrics over HTTP, on all interfaces
# unless told otherwise: keep that on the bind host (or on 127.0.0.1 with --interface).
if [[ -n "$INTERFACE" ]]; then
    COMMON+=(--interface "$INTERFACE" --dashboard-address 127.0.0.1:0)
else
    COMMON+=(--host "$HOST" --dashboard-address "$HOST:0")
fi
# The scheduler is a positional argument; omitted when a scheduler file names it.
TARGET=()
if [[ -z "$SCHEDULER_FILE" ]]; then
    TARGET=("$SCHEDULER")
fi

# The worker processes to start, as parallel arrays: name, GPU index ("" for CPU), mode args.
NAMES=()
DEVICES=()
MODE_ARGS=()
if [[ -n "$GPUS" ]]; then
    if [[ "$GPUS" == "all" ]]; then
        command -v nvidia-smi >/dev/null || die "--gpus all needs nvidia-smi; list indices instead"
        GPUS="$(nvidia-smi --query-gpu=index --format=csv,noheader | paste -sd, -)"
        [[ -n "$GPUS" ]] || die "nvidia-smi lists no GPU"
    fi
    IFS=, read -r -a GPU_LIST <<<"$GPUS"
    if [[ "$MEMORY_LIMIT" == "auto" ]]; then
        # Separate single-worker processes would each claim all host memory with "auto".
        MEMORY_LIMIT="$(awk -v n="${#GPU_LIST[@]}" 'BEGIN { printf "%.4f", 1 / n }')"
    fi
    for i in "${GPU_LIST[@]}"; do
        NAMES+=("$NAME-gpu$i")
        DEVICES+=("$i")
        MODE_ARGS+=("--nworkers 1 --memory-limit $MEMORY_LIMIT --resources GPU=1")
    done
    EXPECTED=${#GPU_LIST[@]}
else
    NAMES+=("$NAME-cpu")
    DEVICES+=("")
    MODE_ARGS+=("--nworkers $NWORKERS --memory-limit $MEMORY_LIMIT")
    EXPECTED=$NWORKERS
fi
RESOURCES_ARG=()
if [[ -n "$RESOURCES" && -z "$GPUS" ]]; then
    RESOURCES_ARG=(--resources "$RESOURCES")
fi

worker_cmd() {  # worker_cmd INDEX: sets CMD for the INDEX-th worker process
    local mode_args
    read -r -a mode_args <<<"${MODE_ARGS[$1]}"
    CMD=("$PYTHON" -m dask worker "${TARGET[@]}" "${COMMON[@]}" "${mode_args[@]}"
         --name "${NAMES[$1]}" "${RESOURCES_ARG[@]}" "${EXTRA[@]}")
}

if [[ $DRY_RUN -eq 1 ]]; then
    for k in "${!NAMES[@]}"; do
        worker_cmd "$k"
        if [[ -n "${DEVICES[$k]}" ]]; then
            printf 'CUDA_VISIBLE_DEVICES=%s ' "${DEVICES[$k]}"
        fi
        show_cmd "${CMD[@]}"
    done
    exit 0
fi

check_project_importable

if [[ $BACKGROUND -eq 0 && ${#NAMES[@]} -eq 1 && -z "${DEVICES[0]}" ]]; then
    worker_cmd 0
    exec "${CMD[@]}"
fi

mkdir -p "$RUN_DIR"
PIDS=()
LOGS=()
for k in "${!NAMES[@]}"; do
    name="${NAMES[$k]}"
    worker_cmd "$k"
    log="$RUN_DIR/worker-$name.log"
    if [[ -n "${DEVICES[$k]}" ]]; then
        export CUDA_VISIBLE_DEVICES="${DEVICES[$k]}"
    fi
    if [[ $BACKGROUND -eq 1 ]]; then
        # Registration is counted from the log's INFO line below, whatever level the caller's
        # environment asks of distributed (`fss` itself sets warning for its own workers).
        DASK_LOGGING__DISTRIBUTED=info setsid nohup "${CMD[@]}" >"$log" 2>&1 &
        echo $! >"$RUN_DIR/worker-$name.pid"
        LOGS+=("$log")
    else
        "${CMD[@]}" &
    fi
    PIDS+=($!)
done
unset CUDA_VISIBLE_DEVICES

if [[ $BACKGROUND -eq 0 ]]; then
    # Foreground GPU mode: one child per GPU; a signal stops them all together. `wait` returns
    # early when a trapped signal arrives, so wait again until every child has shut down.
    trap 'kill -TERM "${PIDS[@]}" 2>/dev/null || true' INT TERM
    until wait; do :; done
    exit 0
fi

# Background: wait until every worker process has logged its registration.
deadline=$((SECONDS + WAIT_S))
while true; do
    registered=$(cat "${LOGS[@]}" | grep -c "Registered to:" || true)
    [[ $registered -ge $EXPECTED ]] && break
    for pid in "${PIDS[@]}"; do
        kill -0 "$pid" 2>/dev/null || die "a worker exited; see ${LOGS[*]}"
    done
    [[ $SECONDS -lt $deadline ]] || die "$registered of $EXPECTED workers registered within ${WAIT_S}s"
    sleep 0.5
done
echo "$registered worker processes registered (pids ${PIDS[*]}, logs in $RUN_DIR)"
