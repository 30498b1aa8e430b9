"""What a user finds in MLflow for a point: the runs page, the commit, the dataset inputs, one
spelling of the budget, and result files that are valid JSON."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tasks.fewshot.config import TrainConfig
from tasks.study.tracking import PROJECT_DIR, Tracker, runs_url, source_tags


def _strict_json(text: str) -> object:
    """json.loads that refuses NaN and Infinity (which JSON does not have)."""
    def refuse(token: str) -> None:
        raise ValueError(f"not JSON: {token}")

    return json.loads(text, parse_constant=refuse)


def test_runs_url_commit_tag_and_ui_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.cli.study import ui_hint

    assert runs_url("http://127.0.0.1:5000/", "7") == (
        "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_DIR, capture_output=True,
                          text=True).stdout.strip()
    assert source_tags()["mlflow.source.git.commit"] == head

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracker = Tracker("hinted", run_name="r")
    run = tracker.client.get_run(tracker.run_id)
    assert run.data.tags["mlflow.source.git.commit"] == head
    assert run.data.tags["mlflow.source.name"] == str(PROJECT_DIR)
    hint = ui_hint("hinted")
    assert f"fss ui --backend-store-uri {uri}" in hint
    assert hint.endswith(runs_url("http://127.0.0.1:5000", tracker.experiment_id))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert ui_hint() == "compare runs in the MLflow UI: http://mlflow.example:5000"


def test_fluent_tracking_uri_is_put_back(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    from tasks.study.tracking import fluent_tracking_uri

    ours, other = f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", ours)
    with fluent_tracking_uri(other):
        assert mlflow.get_tracking_uri() == other
    assert mlflow.get_tracking_uri() == ours and os.environ["MLFLOW_TRACKING_URI"] == ours


def test_json_safe_writes_null_for_nan() -> None:
    from tasks.jsonsafe import json_safe

    value = json_safe({"a": float("nan"), "b": [1.0, float("inf")], "c": "x", "d": None})
    assert _strict_json(json.dumps(value)) == {"a": None, "b": [1.0, None], "c": "x", "d": None}


@pytest.mark.slow
def test_point_logs_its_data_commit_one_budget_spelling_and_valid_json(
        tiny_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    from tasks.data.store import open_dataset
    from tasks.fewshot.episodes import label_budget
    from tasks.fewshot.experiment import RESULT, run_point, subset_digest

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    client = MlflowClient(uri)
    ds = open_dataset(tiny_store, "synth")
    head = source_tags()["mlflow.source.git.commit"]
    for budget, spelled in [(0.25, "0.25"), (1.0, "1")]:
        cfg = TrainConfig(model="panet", store=tiny_store, dataset="synth", budget=budget,
                          steps=2, batch_size=2, checkpoint_every=2, val_every=2,
                          val_episodes=2, test_episodes=4, test_shots=[1], min_pixels=64,
                          experiment="inputs", out_dir=str(tmp_path / "runs"),
                          system_metrics=budget == 1.0)
        result = run_point(cfg, progress=False)
        run = client.get_run(result["run_id"])
        # System metrics on the point that asked for them only (the switch is not in its name).
        system = {k for k in run.data.metrics if k.startswith("system/")}
        assert ("system/cpu_utilization_percentage" in system) == cfg.system_metrics
        assert str(cfg.system_metrics) == run.data.params["system_metrics"]
        # One spelling of the budget: tag, param and the dataset profile agree.
        assert run.data.tags["budget"] == run.data.params["budget"] == spelled
        assert run.data.tags["mlflow.source.git.commit"] == head

        inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
        assert set(inputs) == {"train", "test"}
        labelled = label_budget(ds.split_ids("train"), cfg.budget, cfg.budget_seed)
        train = inputs["train"]
        assert train.digest == subset_digest(ds, labelled) and train.source_type == "zarr"
        source = json.loads(train.source)
        assert source["uri"] == str(Path(tiny_store).resolve())
        assert (source["dataset"], source["version"]) == (ds.name, ds.version)
        profile = json.loads(train.profile)
        assert profile["budget"] == spelled
        assert profile["labelled_images"] == run.data.metrics["labels/images"] == len(labelled)
        assert inputs["test"].digest == subset_digest(ds, ds.split_ids("val"))

        # The best model is an MLflow model of the run's own experiment (not Default/mlruns).
        logged = client.get_logged_model(run.data.tags["fss.model_uri"].removeprefix("models:/"))
        assert logged.experiment_id == run.info.experiment_id
        assert logged.source_run_id == run.info.run_id and not (tmp_path / "mlruns").exists()

        saved = _strict_json((tmp_path / "runs" / result["run_name"] / RESULT).read_text())
        assert saved["run_id"] == result["run_id"]
        if budget == 0.25:  # 2 held-out images form no episode: nothing selects, no val mIoU
            assert saved["val_miou"] is None and "last checkpoint" in saved["selection"]
    # Points of one draw are nested, so different budgets have different training subsets.
    runs = client.search_runs([run.info.experiment_id])
    digests = {i.dataset.digest for r in runs for i in r.inputs.dataset_inputs}
    assert len(runs) == 2 and len(digests) == 3  # two labelled subsets, one test split

    # The best model, logged the MLflow way and registered with the study as its alias: the
    # largest budget's point, loaded from the registry, computes what its checkpoint computes.
    import mlflow
    import pandas as pd
    import torch

    from tasks.fewshot.experiment import register_study_models
    from tasks.fewshot.training import build_model, load_state

    results = pd.DataFrame([{"model": r.data.tags["model"], "budget": r.data.tags["budget"],
                             "seed": r.data.tags["seed"], "run_id": r.info.run_id}
                            for r in runs])
    # A stale process-wide MLflow URI (another store's) must not matter: ours is explicit.
    monkeypatch.setattr("mlflow.tracking._tracking_service.utils._tracking_uri",
                        f"sqlite:///{tmp_path / 'elsewhere.db'}")
    registered = register_study_models(results, "my study")
    monkeypatch.undo()  # the process-wide URI, and MLFLOW_TRACKING_URI with it
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert registered == {"panet": {"name": "fss-panet", "alias": "my-study", "version": "1",
                                    "run_id": result["run_id"]}}  # the 100 % point
    assert register_study_models(results, "my study") == registered  # no new version
    assert client.get_model_version_by_alias("fss-panet", "my-study").run_id == result["run_id"]
    loaded = mlflow.pytorch.load_model("models:/fss-panet@my-study").eval()
    own = build_model(cfg)
    own.load_state_dict(load_state(tmp_path / "runs" / result["run_name"] / "checkpoints" /
                                   "best.pt")["model"])
    own.eval()
    g = torch.Generator().manual_seed(0)
    episode = (torch.randn(1, 1, 3, 64, 64, generator=g),
               torch.randint(0, 2, (1, 1, 64, 64), generator=g), torch.randn(1, 3, 64, 64))
    with torch.no_grad():
        assert torch.allclose(loaded(*episode, 1), own(*episode, 1))


def test_report_takes_a_tracking_uri_and_names_what_is_missing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from flows.cli import main
    from tasks.study import report

    # main() quiets Prefect and Dask through the environment (os.environ.setdefault) and
    # handles SIGTERM: keep both to this test (a Dask worker log without INFO lines fails
    # tests/test_infra.py's registration check).
    monkeypatch.setenv("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")  # what main() sets,
    monkeypatch.setenv("DASK_LOGGING__DISTRIBUTED", "warning")  # undone after the test
    monkeypatch.setattr("signal.signal", lambda *a: None)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    missing = tmp_path / "nowhere" / "mlflow.db"
    assert main(["report", "--experiment", "e", "--tracking-uri", f"sqlite:///{missing}"]) == 2
    assert f"no MLflow database at {missing}" in capsys.readouterr().err
    assert not missing.exists() and not (tmp_path / "mlflow.db").exists()  # nothing created

    uri = f"sqlite:///{tmp_path / 'other' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    Tracker("budget-exp", run_name="ablation real",
            tags={report.KIND_TAG: "ablation", report.STUDY_TAG: "real"}).finish()
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    base = ["report", "--tracking-uri", uri, "--out", str(tmp_path / "reports")]
    assert main([*base, "--experiment", "budget-exp", "--study", "typo"]) == 2
    err = capsys.readouterr().err
    assert "no study 'typo' in experiment 'budget-exp'" in err and "its studies: real" in err
    assert main([*base, "--experiment", "nope"]) == 2
    assert f"no experiment 'nope' at {uri}" in capsys.readouterr().err


def test_report_writes_html_with_each_points_per_class_iou_and_overlays(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """`fss report` downloads each child's per-class IoU and overlays (cached per run) into one
    self-contained report.html beside summary.md."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    from flows.cli import main
    from tasks.study import report

    monkeypatch.setenv("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")  # as main() sets
    monkeypatch.setenv("DASK_LOGGING__DISTRIBUTED", "warning")
    monkeypatch.setattr("signal.signal", lambda *a: None)
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    parent = Tracker("html-exp", run_name="ablation pics",
                     tags={report.KIND_TAG: "ablation", report.STUDY_TAG: "pics"})
    overlays, run_ids = {}, {}
    for budget, miou in [("0.5", 0.41), ("1", 0.52)]:
        child = Tracker("html-exp", run_name=f"umt-b{budget}", parent_run_id=parent.run_id,
                        tags={"model": "umt", "budget": budget, "fold": "0", "shots": "1",
                              "ways": "1", "seed": "0", "budget_seed": "0"})
        folder = tmp_path / budget
        folder.mkdir()
        (folder / "per_class_iou.csv").write_text(
            f"class,iou\ncar,{miou - 0.1:.4f}\npedestrian,{miou + 0.1:.4f}\nmIoU,{miou:.4f}\n"
            "FB-IoU,0.7000\n")
        Image.new("RGB", (12, 6), (int(100 * miou), 20, 30)).save(folder / "overlays.png")
        overlays[budget] = (folder / "overlays.png").read_bytes()
        for f in ("per_class_iou.csv", "overlays.png"):
            child.log_artifact(folder / f, "eval/test")
        child.log_metrics({"test/miou": miou, "test/fbiou": 0.7, "labels/images": 4})
        child.finish()
        run_ids[budget] = child.run_id
    parent.finish()
    monkeypatch.delenv("MLFLOW_TRACKING_URI")

    out = tmp_path / "reports"
    assert main(["report", "--tracking-uri", uri, "--experiment", "html-exp", "--out",
                 str(out)]) == 0
    page_path = out / "pics" / "report.html"
    assert f"HTML report (tables, plot, per-class IoU, overlays): {page_path}" in (
        capsys.readouterr().out)
    assert (out / "pics" / "summary.md").exists()
    assert main(["report", "--tracking-uri", uri, "--experiment", "html-exp", "--out",
                 str(out), "--baseline", "panet"]) == 2
    assert ("--baseline 'panet': study 'pics' has no finished point of that model (its models: "
            "umt)") in capsys.readouterr().err
    page = page_path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert page.count('<img alt="pics: mIoU vs labelled images" src="data:image/png;base64,') == 1
    for budget, name in [("0.5", "umt 50% seed 0"), ("1", "umt 100% seed 0")]:
        assert f"<h3>{name}</h3>" in page and run_ids[budget] in page
        # The point's overlay grid, embedded as a JPEG of the logged PNG.
        alt = f'<img alt="test episodes of {name}: supports, query, prediction and ground truth"'
        b64 = page.split(alt, 1)[1].split('src="data:image/jpeg;base64,', 1)[1].split('"', 1)[0]
        shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))), np.int16)
        logged = np.asarray(Image.open(io.BytesIO(overlays[budget])), np.int16)
        assert shown.shape == logged.shape and np.abs(shown - logged).max() <= 8
    assert ">31.0<" in page and ">62.0<" in page  # car at 50 % and pedestrian at 100 %
    assert ">41.0 [n/a]<" in page  # the summary table: no episodes.csv, no interval

    # Cached per run: a second read does not download again.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(report, "_download", lambda *a: pytest.fail("downloaded again"))
    cached = report.run_point_artifacts(run_ids["1"])
    assert cached.overlays == overlays["1"] and list(cached.per_class["class"])[:2] == [
        "car", "pedestrian"]
