"""Tracking backends: the default SQLite store, and failing fast on an unreachable server."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from tasks.tracking import Tracker, check_reachable, ensure_experiment, tracking_uri


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nobody listens there


def test_unreachable_server_fails_fast_with_a_clear_message(
        monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="unreachable") as err:
        ensure_experiment("x")
    assert uri in str(err.value)
    assert time.perf_counter() - t0 < 30  # MLflow's own retries take minutes
    check_reachable("sqlite:///anything.db")  # local stores need no server


def test_default_is_sqlite_in_the_working_folder_and_metrics_are_batched(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker("exp", run_name="r", tags={"model": "panet"}, flush_every=1000)
    for step in range(50):
        tracker.log_metrics({"train/loss": 1.0 / (step + 1)}, step)
    assert tracker._metrics  # buffered, not sent one by one
    tracker.finish()
    history = tracker.client.get_metric_history(tracker.run_id, "train/loss")
    assert len(history) == 50 and (tmp_path / "mlflow.db").exists()
    assert ensure_experiment("exp") == tracker.experiment_id  # created once, then found
