"""`fss ui`: the MLflow UI over the project's tracking store, on 127.0.0.1.

Runs `mlflow server` on the same backend `tasks.study.tracking.tracking_uri()` resolves
(SQLite in the working folder by default), with new experiments' artifacts in the same
`mlartifacts` folder the flows write to, so runs logged directly to SQLite and runs seen
through the UI agree.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

from flows.runtime import api_healthy, free_port, state_dir, stop_process
from tasks.defaults import MLFLOW_UI_PORT


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def start_mlflow_ui(uri: str | None = None, port: int | None = MLFLOW_UI_PORT, *,
                    host: str = "127.0.0.1", artifacts: str | Path | None = None,
                    wait_s: float = 120.0, log: Path | None = None,
                    ) -> tuple[subprocess.Popen, str]:
    """Start `mlflow server` for a database-backed tracking URI; returns (process, UI URL)
    once its /health answers. `port=None` or 0 picks a free port. Stop with
    `flows.runtime.stop_process` (the server and its workers share one process group)."""
    from tasks.study.tracking import DEFAULT_ARTIFACTS, tracking_uri

    uri = uri or tracking_uri()
    if uri.startswith(("http://", "https://", "databricks")):
        raise ValueError(f"{uri} is a tracking server already: open it in a browser")
    if not port:
        port = free_port(host)
    elif not _port_free(host, port):
        raise ValueError(f"port {port} on {host} is in use (an MLflow UI already running?); "
                         "choose another with --port, or --port 0 for any free one")
    artifact_root = Path(artifacts or DEFAULT_ARTIFACTS).resolve().as_uri()
    url = f"http://{host}:{port}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
           "--default-artifact-root", artifact_root,
           # Artifacts live in a local folder both sides can read: no upload proxy needed.
           "--no-serve-artifacts", "--host", host, "--port", str(port), "--workers", "1"]
    out = open(log or state_dir() / "mlflow-ui.log", "ab")  # noqa: SIM115 - owned by child
    try:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        out.close()
    deadline = time.monotonic() + wait_s
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {proc.returncode}; "
                                   f"see {out.name}")
            if api_healthy(url):
                return proc, url
            time.sleep(0.3)
        raise RuntimeError(f"mlflow server did not answer on {url} within {wait_s:.0f} s; "
                           f"see {out.name}")
    except BaseException:  # also Ctrl-C while waiting: never leave the server behind
        stop_process(proc)
        raise


def experiment_pages(uri: str, ui_url: str) -> dict[str, str]:
    """Experiment name -> its runs table in the UI (MLflow 3.17's root shows GenAI traces)."""
    from mlflow.tracking import MlflowClient

    from tasks.study.tracking import runs_url

    return {e.name: runs_url(ui_url, e.experiment_id)
            for e in MlflowClient(uri).search_experiments() if e.name != "Default"}
