"""The ablation flow for real: Prefect server, Dask LocalCluster, MLflow SQLite."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.ablate import run_ablation
from flows.runtime import prefect_api
from tasks.study.ablation import expand, set_grid, study_from_dict

pytestmark = pytest.mark.slow


def _study(store: str, budgets: list[float], out: Path) -> dict:
    return {
        "study": "tiny", "experiment": "tiny-ablation",
        "base": {"store": store, "dataset": "synth", "fold": 0, "steps": 2, "batch_size": 2,
                 "checkpoint_every": 2, "val_every": 2, "val_episodes": 2, "test_episodes": 4,
                 "test_shots": [1], "min_pixels": 64, "out_dir": str(out / "runs"),
                 "model_args": {"embed_dim": 16, "global_dim": 32, "local_dim": 16}},
        "grid": {"model": ["metasegnet"], "budget": budgets, "seed": [0]},
    }


def test_expand_grid_points_and_model_overrides() -> None:
    spec = {"base": {"steps": 5}, "grid": {"model": ["panet", "umt"], "budget": [0.2, 1.0]},
            "models": {"umt": {"steps": 9}}, "points": [{"model": "metasegnet", "ways": 2}]}
    points = expand(spec)
    assert len(points) == 5
    assert {p["steps"] for p in points if p["model"] == "umt"} == {9}
    assert [p["ways"] for p in points if p["model"] == "metasegnet"] == [2]
    # --set overrides reach every point, over model keys too.
    overridden = expand(spec, ["steps=3", "model_args.dim=32"])
    assert {p["steps"] for p in overridden} == {3}
    assert {p["model_args"]["dim"] for p in overridden} == {32}
    # --grid replaces an axis: three seeds of the four grid points, the extra point once.
    seeds = expand(set_grid(spec, ["seed=[0, 1, 2]"]))
    assert len(seeds) == 4 * 3 + 1 and spec["grid"] == {"model": ["panet", "umt"],
                                                         "budget": [0.2, 1.0]}
    assert len(expand(set_grid(spec, ["budget=0.5"]))) == 2 + 1
    # Seeds resample the labelled subset unless budget draws are an axis of their own.
    study = study_from_dict({"study": "s", "experiment": "e", "grid": {"seed": [0, 1]}})
    assert [p.budget_seed for p in study.points] == [0, 1]
    draws = study_from_dict({"study": "s", "experiment": "e",
                             "grid": {"seed": [0], "budget_seed": [0, 1, 2]}})
    assert [(p.seed, p.budget_seed) for p in draws.points] == [(0, 0), (0, 1), (0, 2)]
    with pytest.raises(ValueError, match="--grid"):
        set_grid(spec, ["lr=[1, 2]"])
    with pytest.raises(ValueError, match="not sweepable"):
        expand({"grid": {"lr": [1, 2]}})
    with pytest.raises(ValueError, match="study"):
        study_from_dict({"experiment": "x", "grid": {"model": ["panet"]}})


def test_ablation_tracks_parent_and_children_and_resumes(
        tiny_store: str, tmp_path: Path, prefect_api_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    out = str(tmp_path / "reports")
    with prefect_api():
        first = run_ablation(_study(tiny_store, [0.5, 1.0], tmp_path), workers=1, out_dir=out,
                             progress=False)
        again = run_ablation(_study(tiny_store, [0.5, 1.0], tmp_path), workers=1, out_dir=out,
                             progress=False)
        wider = run_ablation(_study(tiny_store, [0.0, 0.5, 1.0], tmp_path), workers=1,
                             out_dir=out, progress=False)
    assert (first["trained"], first["skipped"], first["failed"]) == (2, 0, [])
    assert (again["trained"], again["skipped"]) == (0, 2)
    assert (wider["trained"], wider["skipped"]) == (1, 2)
    assert first["parent_run_id"] == again["parent_run_id"] == wider["parent_run_id"]

    client = MlflowClient(uri)
    parent = client.get_run(first["parent_run_id"])
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 3
    for child in children:
        assert {"model", "budget", "fold", "shots", "ways", "seed"} <= set(child.data.tags)
        assert {"test/miou", "test/fbiou"} <= set(child.data.metrics)
    assert sorted(c.data.tags["budget"] for c in children) == ["0", "0.5", "1"]
    # Every point was scored on the same test episodes: what pairs budgets (and models).
    assert len({c.data.tags["test.episodes"] for c in children}) == 1
    summary = {a.path for a in client.list_artifacts(parent.info.run_id, "summary")}
    assert {"summary/summary.csv", "summary/summary.md", "summary/miou_vs_budget.png",
            "summary/estimate.csv", "summary/summary_table.json", "summary/report.html"} <= summary
    # The HTML report has each point's per-class IoU and overlays, from the children's artifacts.
    page = (Path(out) / "tiny" / "report.html").read_text(encoding="utf-8")
    assert page.count('<section class="point"') == 3 and "No overlays" not in page
    assert "No per-class IoU" not in page and "metasegnet 50% seed 0" in page
    # Per-budget mIoU with its interval on the parent run, from the children's episodes.
    metrics = parent.data.metrics
    assert {"summary/metasegnet/1w1s/b0.5/miou", "summary/metasegnet/1w1s/b0.5/miou_lo",
            "summary/metasegnet/1w1s/b0.5/miou_hi"} <= set(metrics)
    assert (metrics["summary/metasegnet/1w1s/b0.5/miou_lo"]
            < metrics["summary/metasegnet/1w1s/b0.5/miou_hi"])
    assert "| metasegnet | 1 | 1 | 50 % |" in wider["table"]
    assert wider["table"].count("| metasegnet |") == 3
