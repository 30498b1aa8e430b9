# Helpers shared by the Dask scripts in this folder (sourced, not run).
# shellcheck shell=bash
set -euo pipefail

# The interpreter that has this project installed. The scheduler and every worker must be able to
# import the project and prefect-dask, or task graphs fail to deserialize (DESIGN.md, known traps).
PYTHON="${PYTHON:-python3}"

# Where background mode keeps logs, pid files and the scheduler file (same root as flows/runtime).
# shellcheck disable=SC2034  # used by the scripts that source this file
RUN_DIR="${FSS_HOME:-.fss}/dask"

die() {
    echo "error: $*" >&2
    exit 2
}

# Fail fast, before a worker joins and then cannot unpickle a single task.
check_project_importable() {
    "$PYTHON" - <<'EOF' || die "install this project on this host first: pip install -e . (or use the container image)"
import importlib.util
import sys

missing = [m for m in ("flows", "tasks", "models", "distributed", "prefect_dask")
           if importlib.util.find_spec(m) is None]
if missing:
    print(f"{sys.executable} cannot import: {', '.join(missing)}", file=sys.stderr)
    sys.exit(1)
EOF
}

# Print a command the way it would be run (for --dry-run and the logs).
show_cmd() {
    printf '%q ' "$@"
    printf '\n'
}
