"""Several processes on one fresh MLflow DB and on one point: nothing breaks, nothing doubles."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest


def _run_point(config: dict, uri: str) -> dict:
    import os

    os.environ["MLFLOW_TRACKING_URI"] = uri
    import torch

    from tasks.fewshot.config import from_dict
    from tasks.fewshot.experiment import run_point

    torch.set_num_threads(1)
    return run_point(from_dict(config), progress=False)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("trial", range(2))
def test_three_runs_of_one_point_on_a_fresh_db(tiny_store: str, tmp_path: Path,
                                               trial: int) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # fresh: the three race to migrate it
    config = dict(model="panet", store=tiny_store, dataset="synth", steps=2, batch_size=2,
                  val_every=2, checkpoint_every=2, val_episodes=2, test_episodes=4,
                  test_shots=[1], min_pixels=64, experiment="race", seed=trial,
                  out_dir=str(tmp_path / "runs"))
    with mp.get_context("spawn").Pool(3) as pool:
        results = pool.starmap(_run_point, [(config, uri)] * 3)
    # One process trained the point; the two others waited on its folder and read it back.
    assert sorted(bool(r.get("skipped")) for r in results) == [False, True, True]
    assert len({r["run_id"] for r in results}) == 1
    client = MlflowClient(uri)
    (exp,) = [e for e in client.search_experiments() if e.name == "race"]
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and "test/miou" in run.data.metrics
    client.create_experiment("still-works")  # the DB is usable afterwards


def test_a_relative_sqlite_uri_works(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.study.tracking import ensure_experiment

    monkeypatch.chdir(tmp_path)
    assert ensure_experiment("rel", "sqlite:///data/mlflow.db")
    assert (tmp_path / "data" / "mlflow.db").exists()
