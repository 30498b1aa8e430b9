"""prefect.yaml for real: work pools, `prefect deploy --all` against `prefect server start` on
127.0.0.1, and one deployment run by a `prefect worker` subprocess."""

from __future__ import annotations

import argparse
import importlib
import re
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from flows.cli.services import add_deploy_parser
from flows.deployments import (
    POOLS,
    PREFECT_FILE,
    PROJECT_DIR,
    deploy_all,
    deployment_names,
    ensure_pools,
    start_worker,
    train_deployment,
)
from flows.runtime import prefect_api, stop_process

GPU_FLOWS = {"fss-pretrain", "fss-train", "fss-ablation"}  # training: the GPU pool


def _declared() -> dict[str, dict[str, Any]]:
    """`flow/deployment` → its entry in prefect.yaml (flow names read from the entrypoints)."""
    out = {}
    for d in yaml.safe_load(PREFECT_FILE.read_text())["deployments"]:
        path, attr = d["entrypoint"].split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        out[f"{getattr(module, attr).name}/{d['name']}"] = d
    return out


@pytest.fixture(scope="module")
def log_before_deploy(prefect_server_log: Path) -> int:
    """Where the server log stood before this module deployed (what follows is ours)."""
    return prefect_server_log.stat().st_size if prefect_server_log.exists() else 0


@pytest.fixture(scope="module")
def deployed(prefect_server: str, log_before_deploy: int) -> dict[str, dict[str, Any]]:
    """Pools + every deployment of prefect.yaml, applied once for this module."""
    assert set(ensure_pools(prefect_server)) <= set(POOLS)
    assert ensure_pools(prefect_server) == []  # idempotent: existing pools are kept
    deploy_all(prefect_server)
    return deployment_names(prefect_server)


def test_deploy_parser() -> None:
    p = argparse.ArgumentParser()
    add_deploy_parser(p.add_subparsers())
    args = p.parse_args(["deploy", "--worker", "fss-cpu", "--worker", "fss-gpu"])
    assert args.worker == ["fss-cpu", "fss-gpu"] and Path(args.prefect_file) == PREFECT_FILE


@pytest.mark.slow
def test_every_deployment_is_accepted_with_pool_schedule_and_pull_step(
        deployed: dict[str, dict[str, Any]], prefect_server: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    declared = _declared()
    assert set(declared) <= set(deployed), f"not deployed: {set(declared) - set(deployed)}"
    assert {"fss-ingest", "fss-features", "fss-pseudo", "fss-pretrain", "fss-train",
            "fss-ablation"} <= {name.split("/")[0] for name in declared}
    for name, d in declared.items():
        got = deployed[name]
        flow_name = name.split("/")[0]
        assert got["work_pool"] == ("fss-gpu" if flow_name in GPU_FLOWS else "fss-cpu"), name
        assert got["parameters"] == d.get("parameters", {}), name
        # Resolved on the worker at run time, not baked in at deploy time.
        assert got["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {
            "directory": "{{ $FSS_PROJECT_DIR }}"}}], name
    nightly = deployed["fss-ablation/nightly-synthetic"]
    assert nightly["schedules"] == [{"cron": "0 2 * * *", "timezone": "UTC", "active": True}]
    # Two runs of the study never overlap: the server holds a limit of one, new runs cancelled.
    assert nightly["concurrency"] == {"limit": 1, "active": True,
                                      "collision_strategy": "CANCEL_NEW"}
    # One naming scheme: fss-<stage>/<dataset>, scheduled ones fss-<stage>/nightly-<dataset>.
    for name in declared:
        flow_name, deployment = name.split("/")
        assert re.fullmatch(r"fss-[a-z]+", flow_name), name
        assert re.fullmatch(r"(nightly-)?synthetic", deployment), name
        assert deployment.startswith("nightly-") == bool(declared[name].get("schedules")), name
    assert all(not d["schedules"] for n, d in deployed.items() if n.split("/")[0] != "fss-ablation")
    with temporary_settings(updates={PREFECT_API_URL: prefect_server}), \
            get_client(sync_client=True) as client:
        assert {p: client.read_work_pool(p).type for p in POOLS} == {
            "fss-cpu": "process", "fss-gpu": "process"}
    # The nightly study file (when present) is a valid study.
    study_file = PROJECT_DIR / nightly["parameters"]["config_path"]
    if study_file.exists():
        from tasks.study.ablation import study_from_dict

        assert study_from_dict(yaml.safe_load(study_file.read_text())).points


def _upcoming_runs(api_url: str, deployment_id: str) -> int:
    """Scheduled (not yet started) flow runs of one deployment, as the UI's Upcoming tab."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}), \
            get_client(sync_client=True) as client:
        return len(client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])))))


@pytest.mark.slow
def test_schedules_produce_upcoming_runs_with_no_scheduler_error(
        deployed: dict[str, dict[str, Any]], prefect_server: str, prefect_server_log: Path,
        log_before_deploy: int) -> None:
    """The nightly study really gets runs: Prefect 3.8.8's scheduler creates none, and logs
    `Can't evaluate bulk DML statement` every loop, with SQLAlchemy 2.1 (pinned <2.1)."""
    scheduled = {n: d for n, d in deployed.items() if any(s["active"] for s in d["schedules"])}
    assert "fss-ablation/nightly-synthetic" in scheduled
    # The "recent deployments" loop runs every 5 s and schedules at least 3 runs each.
    deadline = time.monotonic() + 60
    while True:
        upcoming = {n: _upcoming_runs(prefect_server, d["id"]) for n, d in scheduled.items()}
        if all(n >= 3 for n in upcoming.values()) or time.monotonic() > deadline:
            break
        time.sleep(2)
    with open(prefect_server_log, "rb") as f:
        f.seek(log_before_deploy)
        log = f.read().decode(errors="replace")
    errors = [line for line in log.splitlines()
              if any(w in line for w in ("ERROR", "Traceback", "Error scheduling", "bulk DML"))]
    assert not errors, "scheduler errors in the server log:\n" + "\n".join(errors[:20])
    assert all(n >= 3 for n in upcoming.values()), f"upcoming runs per deployment: {upcoming}"


@pytest.mark.slow
def test_ingest_deployment_runs_on_a_process_worker(
        deployed: dict[str, dict[str, Any]], prefect_api_url: str, synth_root: Path,
        tmp_path: Path) -> None:
    from prefect.deployments import run_deployment

    from tasks.data.store import open_dataset

    store_url = str(tmp_path / "deployed.zarr")
    log = tmp_path / "worker.log"
    # Poll every second (default 10 s): the test waits on the worker, not the other way round.
    worker = start_worker("fss-cpu", prefect_api_url, log=log,
                          extra_env={"PREFECT_WORKER_QUERY_SECONDS": "1",
                                     "PREFECT_LOGGING_LEVEL": "INFO"})
    try:
        with prefect_api():
            run = run_deployment(
                "fss-ingest/synthetic", timeout=240, poll_interval=2,
                parameters={"root": str(synth_root / "voc"), "store_url": store_url,
                            "name": "deployed", "size": 64, "shard_size": 32, "workers": 1})
    finally:
        stop_process(worker)
    assert run.state is not None and run.state.is_completed(), (
        f"flow run {run.name} is {run.state}; worker log:\n{log.read_text()[-4000:]}")
    ds = open_dataset(store_url, "deployed")
    assert len(ds.ids) == 56 and len(ds.quarantine) == 0


@pytest.mark.slow
def test_train_wrapper_loads_a_config_path(tiny_store: str, tmp_path: Path,
                                           prefect_api_url: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The fss-train entrypoint: a config file plus `--set`-style overrides, into MLflow."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"train": {
        "model": "metasegnet", "store": tiny_store, "dataset": "synth", "steps": 50,
        "batch_size": 2, "checkpoint_every": 2, "val_every": 2, "val_episodes": 2,
        "test_episodes": 4, "test_shots": [1], "min_pixels": 64, "experiment": "deployed",
        "out_dir": str(tmp_path / "runs"),
        "model_args": {"embed_dim": 16, "global_dim": 32, "local_dim": 16}}}))
    with prefect_api():
        result = train_deployment(config_path=str(config), overrides=["steps=2"])
    run = MlflowClient(uri).get_run(result["run_id"])
    assert run.data.params["steps"] == "2" and "test/miou" in run.data.metrics
