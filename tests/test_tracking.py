"""Tracking backends: the default SQLite store, and failing fast on an unreachable server."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from tasks.study.tracking import Tracker, check_reachable, ensure_experiment, tracking_uri


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


def test_system_metrics_are_logged_while_a_run_trains(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TrainConfig(system_metrics=True) starts MLflow's monitor on the point's run: CPU, memory,
    disk and network under system/, sampled until the run finishes."""
    from mlflow.tracking import MlflowClient

    from tasks.fewshot.config import TrainConfig, config_digest

    # The switch is not part of a point's identity: its run folder and name stay the same
    # (f32e2ddd is the default config's digest from before the key existed; a key that changes
    # it renames every run folder, and finished points would train again).
    assert config_digest(TrainConfig(system_metrics=True), "synth/v1") == config_digest(
        TrainConfig(), "synth/v1") == "f32e2ddd"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    client = MlflowClient(tracking_uri())
    tracker = Tracker("sys", run_name="sampled")
    tracker.start_system_metrics()
    tracker.start_system_metrics()  # once per run
    time.sleep(1.5)
    tracker.finish()
    cpu = client.get_metric_history(tracker.run_id, "system/cpu_utilization_percentage")
    assert len(cpu) >= 3 and all(0 <= m.value <= 100 for m in cpu)
    assert sorted(m.step for m in cpu) == list(range(len(cpu)))
    metrics = client.get_run(tracker.run_id).data.metrics
    assert {"system/system_memory_usage_megabytes", "system/disk_usage_percentage",
            "system/network_receive_megabytes"} <= set(metrics)
    assert client.get_run(tracker.run_id).info.status == "FINISHED"

    # A run shorter than one interval still gets its sample (MLflow's monitor would drop it),
    # a failed one too; without the switch, nothing is sampled.
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "30")
    short = Tracker("sys", run_name="short")
    short.start_system_metrics()
    t0 = time.perf_counter()
    short.finish("FAILED")
    assert time.perf_counter() - t0 < 10  # finish does not wait for the interval
    assert len(client.get_metric_history(short.run_id, "system/cpu_utilization_percentage")) == 1
    plain = Tracker("sys", run_name="plain")
    plain.finish()
    assert not any(k.startswith("system/") for k in client.get_run(plain.run_id).data.metrics)

    without = Tracker("sys", run_name="no psutil")
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(RuntimeError, match="psutil"):
        without.start_system_metrics()
