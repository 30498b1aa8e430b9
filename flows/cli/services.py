"""`fss server`, `fss ui`, `fss deploy`: the local Prefect server, the MLflow UI, deployments."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from tasks import defaults


def add_parsers(sub: Any) -> None:
    add_ui_parser(sub)
    add_deploy_parser(sub)
    sv = sub.add_parser("server", help="a persistent local Prefect server (127.0.0.1)")
    sv.add_argument("action", choices=["start", "stop", "status"], help="what to do")
    sv.add_argument("--port", type=int, default=defaults.PREFECT_PORT, help="port of `start`")
    sv.set_defaults(func=cmd_server)


def add_ui_parser(subparsers: Any) -> argparse.ArgumentParser:
    """`fss ui`: the MLflow UI for the tracking store on 127.0.0.1."""
    p = subparsers.add_parser("ui", help="serve the MLflow UI for the tracking store "
                                         "(127.0.0.1) until Ctrl-C")
    p.add_argument("--port", type=int, default=defaults.MLFLOW_UI_PORT,
                   help="0 picks a free port")
    p.add_argument("--backend-store-uri",
                   help="default: MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db")
    p.set_defaults(func=cmd_ui)
    return p


def add_deploy_parser(subparsers: Any) -> argparse.ArgumentParser:
    """`fss deploy`: work pools + every deployment of prefect.yaml on the Prefect API."""
    p = subparsers.add_parser("deploy", help="create work pools and the deployments of "
                                             "prefect.yaml; optionally start workers")
    p.add_argument("--prefect-file", default=str(defaults.PREFECT_FILE),
                   help="the deployments to apply")
    p.add_argument("--worker", action="append", choices=sorted(defaults.WORK_POOLS), default=[],
                   help="start a worker for this pool and keep it running (repeatable)")
    p.add_argument("--limit", type=int, help="maximum concurrent flow runs per worker")
    p.set_defaults(func=cmd_deploy, runs_flows=True)
    return p


def cmd_server(args: argparse.Namespace) -> int:
    from flows import runtime

    if args.action == "start":
        print(f"Prefect server at {runtime.start_persistent_server(port=args.port)}")
    elif args.action == "stop":
        print("stopped" if runtime.stop_persistent_server() else "no server recorded")
    else:
        url = runtime.recorded_server()
        print(f"running at {url}" if url else "not running")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    """Serve the MLflow UI until Ctrl-C."""
    from flows.runtime import stop_process
    from flows.ui import experiment_pages, start_mlflow_ui
    from tasks.study.tracking import tracking_uri

    uri = args.backend_store_uri or tracking_uri()
    if uri.startswith(("http://", "https://")):
        print(f"MLFLOW_TRACKING_URI points at a tracking server: its UI is {uri}")
        return 0
    # The server runs in its own process group, so a `kill` of this process must stop it too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    proc, url = start_mlflow_ui(uri, args.port)
    print(f"MLflow UI at {url}  (tracking {uri}); Ctrl-C stops it")
    for name, page in experiment_pages(uri, url).items():
        print(f"  runs of {name}: {page}")
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop_process(proc)


def cmd_deploy(args: argparse.Namespace) -> int:
    """Pools + deployments, then optionally serve pools with workers until Ctrl-C."""
    import subprocess

    from flows import runtime
    from flows.deployments import (
        POOLS,
        PROJECT_DIR,
        PROJECT_DIR_ENV,
        deploy_all,
        deployment_names,
        ensure_pools,
        start_worker,
    )

    # A temporary server would take the deployments with it: use the configured API or the
    # persistent `fss server` (started here when none runs).
    url = os.environ.get("PREFECT_API_URL") or runtime.start_persistent_server()
    print(f"Prefect API {url}")
    created = ensure_pools(url)
    print("work pools: " + ", ".join(f"{p} ({'created' if p in created else 'exists'})"
                                     for p in POOLS))
    t0 = time.perf_counter()
    deploy_all(url, Path(args.prefect_file).resolve())
    deployments = deployment_names(url)
    print(f"{len(deployments)} deployments ({time.perf_counter() - t0:.0f} s):")
    for name, d in sorted(deployments.items()):
        when = ", ".join(f"cron '{s['cron']}' {s['timezone']}" for s in d["schedules"]) or "-"
        limit = d["concurrency"]
        at_once = (f"; at most {limit['limit']} at once ({limit['collision_strategy']})"
                   if limit else "")
        print(f"  {name:<36} pool {d['work_pool']:<8} schedule {when}{at_once}")
    if not args.worker:
        print("start workers: fss deploy --worker fss-cpu (on GPU hosts: --worker fss-gpu), or "
              f"`prefect worker start --pool POOL` with {PROJECT_DIR_ENV}={PROJECT_DIR} exported")
        return 0
    # Workers run in their own process groups: a `kill` of this process must stop them too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    procs: list[subprocess.Popen] = []
    try:
        for pool in args.worker:
            procs.append(start_worker(pool, url, limit=args.limit,
                                      log=runtime.state_dir() / f"worker-{pool}.log"))
        print(f"workers for {', '.join(args.worker)} running (logs in {runtime.state_dir()});"
              " Ctrl-C stops them")
        while all(p.poll() is None for p in procs):
            time.sleep(1.0)
        print("a worker exited; see its log", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for p in procs:
            runtime.stop_process(p)
