"""Where flows run: the Prefect API they report to and the Dask cluster their tasks go to.

Flows always talk to one Prefect API server. In ephemeral mode every Dask worker process would
start a temporary API server of its own (a 3-task flow took ~40 s instead of ~8 s,
docs/architecture.md), so when no `PREFECT_API_URL` is set we start one local server on 127.0.0.1
(SQLite under the working folder's `.fss/`) and hand its URL to the workers through the environment.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tasks.defaults import PREFECT_PORT, WORKERS

STATE_DIR_ENV = "FSS_HOME"
DASK_ADDRESS_ENV = "FSS_DASK_ADDRESS"


def state_dir() -> Path:
    """The working folder's private state (Prefect server DB, its pid and URL)."""
    path = Path(os.environ.get(STATE_DIR_ENV, ".fss")).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def api_healthy(url: str, timeout: float = 2.0) -> bool:
    """True when `<url>/health` answers 200 (Prefect's API and MLflow's server both have it)."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def _server_file() -> Path:
    return state_dir() / "prefect-server.json"


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the parent dies, even by SIGKILL (Linux prctl)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start_server(*, host: str = "127.0.0.1", port: int | None = None, ui: bool = True,
                 wait_s: float = 90.0, log: Path | None = None,
                 persistent: bool = False) -> tuple[subprocess.Popen, str]:
    """Start `prefect server start` in a new process group and wait until its API answers.

    A temporary server (the default) is stopped by the kernel when this process dies, however
    it dies; a `persistent` one outlives it (`fss server start`).
    """
    port = port or free_port(host)
    url = f"http://{host}:{port}/api"
    home = state_dir() / "prefect"
    home.mkdir(exist_ok=True)
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_UI_ENABLED": "true" if ui else "false",
           # `--port` alone leaves the UI calling the API at the default port (4200): "Unable to
           # connect to Prefect server" on any other port (tests/test_mlflow_ui.py).
           "PREFECT_SERVER_API_HOST": host, "PREFECT_SERVER_API_PORT": str(port)}
    env.pop("PREFECT_API_URL", None)
    out = open(log or state_dir() / "prefect-server.log", "ab")  # noqa: SIM115 - owned by child
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port",
           str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True,
                            preexec_fn=None if persistent else _die_with_parent)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}; see {out.name}")
        if api_healthy(url):
            return proc, url
        time.sleep(0.3)
    stop_process(proc)
    raise RuntimeError(f"prefect server did not answer on {url} within {wait_s:.0f} s")


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """Stop a server and its children (uvicorn workers) via its process group."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def recorded_server() -> str | None:
    """URL of a persistent server started by `fss server start`, if it still answers."""
    path = _server_file()
    if not path.exists():
        return None
    url = json.loads(path.read_text())["url"]
    return url if api_healthy(url) else None


def start_persistent_server(*, host: str = "127.0.0.1", port: int = PREFECT_PORT) -> str:
    """`fss server start`: a server that outlives this process, recorded in the state dir."""
    url = recorded_server()
    if url:
        return url
    proc, url = start_server(host=host, port=port, persistent=True)
    _server_file().write_text(json.dumps({"url": url, "pid": proc.pid}))
    return url


def stop_persistent_server() -> bool:
    path = _server_file()
    if not path.exists():
        return False
    pid = json.loads(path.read_text())["pid"]
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    path.unlink()
    return True


@contextlib.contextmanager
def prefect_api() -> Iterator[str]:
    """Make flows in this process (and Dask workers it starts) report to one API server.

    Order: `PREFECT_API_URL` if set; a server recorded by `fss server start`; else a temporary
    local server that is stopped on exit.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = os.environ.get("PREFECT_API_URL") or recorded_server()
    proc = None
    if not url:
        proc, url = start_server(ui=False)
    previous = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = url  # inherited by LocalCluster worker processes
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
    finally:
        if previous is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = previous
        if proc is not None:
            _drain_prefect_workers()
            stop_process(proc)


def _drain_prefect_workers() -> None:
    """Send queued logs and events before a temporary server goes away, not after."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    EventsWorker.drain_all(timeout=10)


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes only): `ablation-demo-umt`.
    Artifacts with a key are listed on the Artifacts page, and a rerun adds a version."""
    import re

    return re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")


def _local_cluster_kwargs(workers: int) -> dict[str, Any]:
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    # One thread per worker process: decoding and torch work scale by processes here.
    return {"n_workers": workers, "threads_per_worker": 1, "processes": True,
            "host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}


def task_runner(workers: int = WORKERS, dask_address: str | None = None):  # -> DaskTaskRunner
    """A Dask task runner: an existing scheduler when an address is given, else a LocalCluster.

    For flows whose Prefect tasks run on the Dask workers (the ablation: one coarse task per
    point); the shard flows use `dask_client`. The address may also come from
    `FSS_DASK_ADDRESS`, so scaled-out runs need no code change.
    """
    from prefect_dask import DaskTaskRunner

    address = dask_address or os.environ.get(DASK_ADDRESS_ENV)
    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                          cluster_kwargs=_local_cluster_kwargs(workers))


@contextlib.contextmanager
def dask_client(workers: int = WORKERS, dask_address: str | None = None, *,
                resources: dict[str, float] | None = None):  # -> Iterator[Client]
    """A Dask client of an existing scheduler (the address, or `FSS_DASK_ADDRESS`), else of a
    LocalCluster of ``workers`` processes that lives as long as the context.

    For the shard flows (ingest, features, pseudo), whose Prefect tasks run in the flow's
    process and hand the work to Dask as plain functions: the workers then never import Prefect
    nor run its task engine. Every worker of a LocalCluster started here declares
    ``resources`` (``{"GPU": 1}`` for GPU work); an external cluster's workers declare their
    own (`dask worker --resources GPU=1`).
    """
    from distributed import Client, LocalCluster

    address = dask_address or os.environ.get(DASK_ADDRESS_ENV)
    with contextlib.ExitStack() as stack:
        if not address:
            kwargs = _local_cluster_kwargs(workers) | ({"resources": resources} if resources
                                                       else {})
            cluster = stack.enter_context(LocalCluster(**kwargs))
            address = cluster.scheduler_address
        yield stack.enter_context(Client(address, set_as_default=False))
