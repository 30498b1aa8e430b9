"""What a user sees of our runs in Prefect: run names, logs, artifacts and skipped points, read
back from a real `prefect server start` through its API (what the UI shows)."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from flows.runtime import artifact_key
from tasks.fewshot.config import TrainConfig
from tasks.fewshot.experiment import budget_str, point_label

TINY = {"model": "metasegnet", "dataset": "synth", "fold": 0, "steps": 2, "batch_size": 2,
        "checkpoint_every": 2, "val_every": 2, "val_episodes": 2, "test_episodes": 4,
        "test_shots": [1], "min_pixels": 64,
        "model_args": {"embed_dim": 16, "global_dim": 32, "local_dim": 16}}


def test_point_labels_budgets_and_artifact_keys() -> None:
    assert point_label(TrainConfig(model="umt", budget=0.2, seed=1)) == "umt 20% seed 1"
    assert point_label(TrainConfig(model="panet", budget=0.05, fold=2, shots=5, seed=0,
                                   budget_seed=3)) == "panet 5% fold 2 1w5s seed 0 draw 3"
    assert point_label(TrainConfig(budget=0.07)).startswith("metasegnet 7% ")
    assert [budget_str(b) for b in (0.2, 1.0, 0, 0.05, 1)] == ["0.2", "1", "0", "0.05", "1"]
    assert artifact_key("ablation", "Synthetic_budget 2") == "ablation-synthetic-budget-2"
    assert artifact_key("train", "x", "umt 20% seed 1") == "train-x-umt-20-seed-1"


@contextlib.contextmanager
def _client(api_url: str) -> Iterator[Any]:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}), \
            get_client(sync_client=True) as client:
        yield client


def _flow_runs(api_url: str, name: str) -> list[Any]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with _client(api_url) as client:
        return client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])),
            sort=FlowRunSort.START_TIME_ASC)


def _task_runs(api_url: str, flow_run_id: Any) -> list[Any]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with _client(api_url) as client:
        return client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def _logs(api_url: str, flow_run_ids: list[Any]) -> list[Any]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with _client(api_url) as client:
        return client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=flow_run_ids)))


@pytest.fixture
def info_run_logs(prefect_api_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run logs at INFO, as `fss` has them: in the Dask workers (they inherit the variable) and
    here, whatever the level was when Prefect configured its logging in this process."""
    monkeypatch.setenv("PREFECT_LOGGING_LEVEL", "INFO")
    logger = logging.getLogger("prefect")
    level = logger.level
    logger.setLevel(logging.INFO)
    yield
    logger.setLevel(level)


@pytest.mark.slow
def test_ablation_runs_are_named_logged_keyed_and_skipped_points_show(
        tiny_store: str, tmp_path: Path, prefect_api_url: str, info_run_logs: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.logging.handlers import APILogWorker

    from flows.ablate import run_ablation
    from flows.runtime import prefect_api

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    study = {"study": "named", "experiment": "named-ablation",
             "base": TINY | {"store": tiny_store, "out_dir": str(tmp_path / "runs")},
             "grid": {"model": ["metasegnet"], "budget": [1.0], "seed": [5]}}
    with prefect_api():
        first = run_ablation(study, workers=1, out_dir=str(tmp_path / "reports"), progress=False)
        again = run_ablation(study, workers=1, out_dir=str(tmp_path / "reports"), progress=False)
    APILogWorker.drain_all(timeout=15)
    assert (first["trained"], first["skipped"], again["trained"], again["skipped"]) == (1, 0, 0, 1)

    runs = _flow_runs(prefect_api_url, "ablation named")
    assert len(runs) == 2 and all(r.state.is_completed() for r in runs)
    states = []
    for run in runs:
        (task,) = _task_runs(prefect_api_url, run.id)
        assert task.name == "train metasegnet 100% seed 5"
        states.append(task.state.name)
    assert states == ["Completed", "Skipped"]  # a point read back is not shown as trained

    messages = [log.message for log in _logs(prefect_api_url, [r.id for r in runs])]
    assert any("skipped: already done" in m for m in messages), messages
    assert any("trained in" in m for m in messages), messages
    assert any("1 points, 0 trained, 1 skipped, 0 failed" in m for m in messages), messages

    key = "ablation-named"
    with _client(prefect_api_url) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key, f"{key}-table"])))
    assert {a.key for a in artifacts} == {key, f"{key}-table"}
    latest = max((a for a in artifacts if a.key == key), key=lambda a: a.created)
    assert "0 trained, 1 skipped (already done, read back)" in latest.data


@pytest.mark.slow
def test_cli_keeps_the_terminal_quiet_and_sends_run_logs_to_prefect(
        tiny_store: str, tmp_path: Path, prefect_server: str) -> None:
    """`fss train`: no Prefect INFO lines on the terminal, yet the run's logs are on the server
    (the UI no longer says "This run didn't generate logs")."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"train": TINY | {
        "store": tiny_store, "out_dir": str(tmp_path / "runs"), "seed": 8,
        "experiment": "quiet"}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_LOGGING")}
    env |= {"PREFECT_API_URL": prefect_server, "OMP_NUM_THREADS": "1",
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    done = subprocess.run([sys.executable, "-m", "flows.cli", "train", "--config", str(config)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    terminal = done.stdout + done.stderr
    assert "| INFO" not in terminal and "Beginning flow run" not in terminal, terminal[-3000:]
    assert "metasegnet" in done.stdout  # the result is printed

    (run,) = _flow_runs(prefect_server, "train metasegnet 100% seed 8")
    (task,) = _task_runs(prefect_server, run.id)
    assert task.name == "train metasegnet 100% seed 8" and task.state.name == "Completed"
    messages = [log.message for log in _logs(prefect_server, [run.id])]
    assert any("trained in" in m and "test mIoU" in m for m in messages), messages
    assert any("Beginning flow run" in m for m in messages), messages
    # The library's own log lines (logging.getLogger(__name__) under `tasks`) are run logs too.
    assert any(m.startswith("metasegnet at budget 1: ") and "labelled images" in m
               for m in messages), messages
