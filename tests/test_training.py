"""Configs, exact resume of training, and a tracked point in a real (SQLite) MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tasks.fewshot.config import TrainConfig, apply_overrides, load_config
from tasks.fewshot.training import build_model, load_state, train

TINY = {"metasegnet": {"embed_dim": 16, "global_dim": 32, "local_dim": 16},
        "panet": {},
        "umt": {"dim": 32, "n_fg_protos": 4, "n_bg_protos": 6, "heads": 2,
                "freeze_backbone": False}}


def _cfg(url: str, tmp_path: Path, model: str = "metasegnet", **kw) -> TrainConfig:
    base = dict(model=model, store=url, dataset="synth", fold=0, steps=4, batch_size=2,
                checkpoint_every=2, val_every=2, val_episodes=4, test_episodes=6,
                test_shots=[1], min_pixels=64, model_args=TINY[model], experiment="test",
                out_dir=str(tmp_path / "runs"))
    return TrainConfig(**(base | kw))


def test_config_file_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "study.yaml"
    path.write_text("train:\n  model: panet\n  steps: 50\n  model_args: {scale: 10}\n")
    cfg = load_config(path, ["steps=7", "budget=0.2", "model_args.scale=5", "test_shots=[5]"])
    assert (cfg.model, cfg.steps, cfg.budget, cfg.test_shots) == ("panet", 7, 0.2, [5])
    assert cfg.model_args == {"scale": 5}
    with pytest.raises(ValueError, match="stepz: unknown key"):
        load_config(path, ["stepz=3"])
    with pytest.raises(ValueError, match="budget"):
        load_config(path, ["budget=1.5"])
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides({}, ["steps"])
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("model", ["metasegnet", "umt"])
def test_resume_after_crash_gives_identical_weights(tiny_store: str, tmp_path: Path,
                                                    model: str) -> None:
    cfg = _cfg(tiny_store, tmp_path, model)
    straight = train(cfg, tmp_path / "straight", progress=False)
    crashed = train(cfg, tmp_path / "crashed", progress=False, stop_after=3)
    assert crashed.steps == 3  # died after step 3; the last checkpoint is step 2
    resumed = train(cfg, tmp_path / "crashed", progress=False)
    assert resumed.resumed_from == 2 and resumed.steps == 4
    a = load_state(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = load_state(tmp_path / "crashed" / "checkpoints" / "last.pt")
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    assert [h[1] for h in straight.history] == [h[1] for h in resumed.history]


def test_point_is_tracked_in_mlflow_and_rerun_is_noop(
        tiny_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    from tasks.fewshot.experiment import run_point

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    cfg = _cfg(tiny_store, tmp_path, "panet", budget=0.5, test_shots=[1, 2])
    result = run_point(cfg, progress=False)
    client = MlflowClient(uri)
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["model"] == "panet" and run.data.tags["budget"] == "0.5"
    assert {"test/miou", "test/fbiou", "test/1w2s/miou", "train/loss", "val/miou"} <= set(
        run.data.metrics)
    assert any(k.startswith("test/iou/") for k in run.data.metrics)
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == cfg.steps
    assert run.data.params["budget"] == "0.5" and run.data.params["data.version"].startswith("v-")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "checkpoints", "eval"} <= artifacts
    evals = {a.path for a in client.list_artifacts(run.info.run_id, "eval/test")}
    assert {"eval/test/per_class_iou.csv", "eval/test/overlays.png",
            "eval/test/episodes.csv"} <= evals
    assert 0.0 <= result["test/miou"] <= 1.0
    assert run.data.metrics["labels/images"] == 20 and run.data.metrics["labels/pixels"] > 0
    assert run.data.tags["budget_seed"] == "0" and "held-out" in run.data.tags["selection"]
    assert run.info.run_name == f"panet 50% seed 0 ({result['run_name'].rsplit('-', 1)[-1]})"
    # The per-episode rows recompute the logged mIoU: sums per class, then the mean.
    import pandas as pd

    rows = pd.read_csv(tmp_path / "runs" / result["run_name"] / "eval" / "test" / "episodes.csv")
    sums = rows.groupby("class")[["intersection", "union"]].sum()
    sums = sums[sums["union"] > 0]
    assert (sums["intersection"] / sums["union"]).mean() == pytest.approx(result["test/miou"])
    assert rows["episode"].nunique() == cfg.test_episodes

    again = run_point(cfg, progress=False)
    assert again["skipped"] and again["run_id"] == result["run_id"]
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_checkpoint_config_rebuilds_the_model(tiny_store: str, tmp_path: Path) -> None:
    cfg = _cfg(tiny_store, tmp_path, "metasegnet", steps=2)
    train(cfg, tmp_path / "r", progress=False)
    state = load_state(tmp_path / "r" / "checkpoints" / "best.pt")
    model = build_model(TrainConfig(**state["config"]))
    model.load_state_dict(state["model"])  # strict: the saved config describes the weights
    assert json.dumps(state["config"])  # plain data, loadable with weights_only=True


def test_cached_frozen_features_train_identically(tiny_store: str, tmp_path: Path) -> None:
    frozen = TINY["umt"] | {"freeze_backbone": True}
    plain = _cfg(tiny_store, tmp_path, "umt", model_args=frozen)
    cached = _cfg(tiny_store, tmp_path, "umt", model_args=frozen, cache_features=True)
    a = train(plain, tmp_path / "plain", progress=False)
    b = train(cached, tmp_path / "cached", progress=False)
    # Per-image backbone passes differ from batched ones only by float rounding (~1e-7).
    assert [h[1] for h in b.history] == pytest.approx([h[1] for h in a.history], rel=1e-4)
    assert b.best_val_miou == pytest.approx(a.best_val_miou, abs=1e-3)
    with pytest.raises(ValueError, match="frozen backbone"):
        train(_cfg(tiny_store, tmp_path, "umt", cache_features=True), tmp_path / "x",
              progress=False)


def test_budget_seed_follows_seed_unless_given() -> None:
    assert TrainConfig(seed=3).budget_seed == 3
    assert TrainConfig(seed=3, budget_seed=0).budget_seed == 0
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="adam")
    with pytest.raises(ValueError, match="val_fraction"):
        TrainConfig(val_fraction=1.0)


def test_labels_read_are_counted_and_selection_uses_held_out_labelled_images(
        tiny_store: str, tmp_path: Path) -> None:
    from tasks.data.store import open_dataset
    from tasks.fewshot.episodes import hold_out, label_budget
    from tasks.fewshot.training import labelled_data

    ds = open_dataset(tiny_store, "synth")
    cfg = _cfg(tiny_store, tmp_path, "panet", budget=0.5, seed=2)
    data = labelled_data(cfg, ds)
    subset = label_budget(ds.split_ids("train"), 0.5, 2)
    train_ids, held = hold_out(subset, cfg.val_fraction)
    assert data.images == len(subset) == 20
    assert data.pixels == sum(int(ds.pixels(i).sum()) for i in subset)
    assert data.train.image_ids == sorted(train_ids)
    assert data.val.image_ids == sorted(held) and data.val.split == "train"
    assert "held-out" in data.selection
    tiny = labelled_data(_cfg(tiny_store, tmp_path, "panet", budget=0.1, min_pixels=1), ds)
    assert tiny.val is None and tiny.selection.startswith("last checkpoint")
    none = labelled_data(_cfg(tiny_store, tmp_path, "panet", budget=0.0), ds)
    assert (none.images, none.pixels, none.train) == (0, 0, None)


def test_sgd_trains_and_resumes(tiny_store: str, tmp_path: Path) -> None:
    cfg = _cfg(tiny_store, tmp_path, "panet", optimizer="sgd", steps=2)
    result = train(cfg, tmp_path / "sgd", progress=False)
    state = load_state(tmp_path / "sgd" / "checkpoints" / "last.pt")
    assert result.steps == 2 and "momentum_buffer" in str(state["optimizer"]["state"])


def test_named_novel_classes_replace_the_fold(tiny_store: str, tmp_path: Path) -> None:
    from tasks.data.store import open_dataset
    from tasks.fewshot.training import evaluate_fold, split_classes

    ds = open_dataset(tiny_store, "synth")
    named = _cfg(tiny_store, tmp_path, "panet", novel_classes=[ds.classes[3], 7])
    base, novel = split_classes(named, ds)
    assert novel == [3, 7] and sorted(base + novel) == list(range(1, len(ds.classes)))
    with pytest.raises(ValueError, match="not a foreground class"):
        split_classes(_cfg(tiny_store, tmp_path, "panet", novel_classes=["nope"]), ds)
    with pytest.raises(ValueError, match="test_split"):
        _cfg(tiny_store, tmp_path, "panet", test_split="train")
    model = build_model(named)
    (result,) = evaluate_fold(named, model, progress=False, dataset=ds)
    assert {c for _, c, _, _ in result.episode_rows} <= {3, 7}
    # Another split to test on: the test episodes come from it (here a missing one).
    with pytest.raises(ValueError, match="no ingested image in that split"):
        evaluate_fold(_cfg(tiny_store, tmp_path, "panet", test_split="test"), model,
                      progress=False, dataset=ds)
