"""One experiment point: train, evaluate on the test fold, and track everything in MLflow.

A point is identified by its config, the data version and the code; its run folder is named
after them, so a rerun of a finished point is a no-op and a crashed one resumes from its last
checkpoint (and continues the same MLflow run).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import yaml
from filelock import FileLock

from tasks.data.store import Dataset, open_dataset
from tasks.fewshot.config import TrainConfig, config_digest
from tasks.fewshot.episodes import label_budget
from tasks.fewshot.overlays import render_grid
from tasks.fewshot.training import (
    EvalResult,
    build_model,
    evaluate_fold,
    save_initial,
    train,
)
from tasks.jsonsafe import write_json, write_text
from tasks.loop import load_state
from tasks.malloc import large_buffers_on_heap
from tasks.study.tracking import (
    TEST_CLASSES_TAG,
    TEST_DROPPED_TAG,
    TEST_EPISODES_TAG,
    Tracker,
    code_version,
)

RESULT = "result.json"
MODEL_INPUTS = ("model(support_img, support_mask, query_img, n_ways) -> logits (B, n_ways + 1, "
                "H, W): support_img (B, S, 3, H, W) and query_img (B, 3, H, W) float32 "
                "normalised with the ImageNet mean/std, support_mask (B, S, H, W) int64 "
                "episode labels (255 ignored); tasks.fewshot.episodes.batch_to_tensors builds them")


def budget_str(budget: float) -> str:
    """The one spelling of a budget, in tags, params and tables: 0.2, 0.05, 1, 0."""
    return repr(float(budget)).removesuffix(".0")


def point_label(cfg: TrainConfig) -> str:
    """A point in words, for run names: `umt 20% seed 1`, plus the fold, ways and shots and the
    budget draw where they are not the defaults (`panet 5% fold 2 1w5s seed 0 draw 3`)."""
    parts = [cfg.model, f"{100 * cfg.budget:g}%"]
    if cfg.fold:
        parts.append(f"fold {cfg.fold}")
    if (cfg.ways, cfg.shots) != (1, 1):
        parts.append(f"{cfg.ways}w{cfg.shots}s")
    parts.append(f"seed {cfg.seed}")
    if cfg.budget_seed != cfg.seed:
        parts.append(f"draw {cfg.budget_seed}")
    return " ".join(parts)


def point_tags(cfg: TrainConfig) -> dict[str, str]:
    return {"model": cfg.model, "budget": budget_str(cfg.budget), "fold": str(cfg.fold),
            "shots": str(cfg.shots), "ways": str(cfg.ways), "seed": str(cfg.seed),
            "budget_seed": str(cfg.budget_seed)}


def run_name(cfg: TrainConfig, data_version: str) -> str:
    """Readable and unique: the point's tags plus a hash of everything that defines it."""
    return (f"{cfg.model}-f{cfg.fold}-{cfg.ways}w{cfg.shots}s-b{cfg.budget:g}-s{cfg.seed}"
            f"-{config_digest(cfg, data_version)}")


def metric_prefix(cfg: TrainConfig, result: EvalResult) -> str:
    """`test/` for the point's own setting, `test/<w>w<s>s/` for the extra ones."""
    if (result.ways, result.shots) == (cfg.ways, cfg.shots):
        return "test"
    return f"test/{result.ways}w{result.shots}s"


def run_point(cfg: TrainConfig, *, parent_run_id: str | None = None,
              progress: bool = True) -> dict[str, Any]:
    """Train and evaluate one point; returns its result (read back when already done)."""
    ds = open_dataset(cfg.store, cfg.dataset)
    name = run_name(cfg, f"{ds.name}/{ds.version}")
    run_dir = Path(cfg.out_dir) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    # A second process on the same point waits here, then reads the first one's result.
    # An ablation's points train on Dask workers, whose malloc settings fault in every tensor.
    with FileLock(run_dir / ".lock"), large_buffers_on_heap():
        return _run_point_locked(cfg, ds, name, run_dir, parent_run_id, progress)


def _run_point_locked(cfg: TrainConfig, ds: Dataset, name: str, run_dir: Path,
                      parent_run_id: str | None, progress: bool) -> dict[str, Any]:
    if (run_dir / RESULT).exists():
        return json.loads((run_dir / RESULT).read_text()) | {"skipped": True}
    state_file = run_dir / "mlflow_run.json"
    run_id = json.loads(state_file.read_text())["run_id"] if state_file.exists() else None
    # The MLflow name reads well when the runs table cuts it (the budget comes second); the
    # folder's hash closes it, so two points of one label stay apart.
    tracker = Tracker(cfg.experiment, run_id=run_id,
                      run_name=f"{point_label(cfg)} ({name.rsplit('-', 1)[-1]})",
                      tags=point_tags(cfg), parent_run_id=parent_run_id)
    write_json(state_file, {"run_id": tracker.run_id})
    if run_id is not None:  # resumed: running again (a crash left it FAILED)
        tracker.client.update_run(run_id, status="RUNNING")
    try:
        if cfg.system_metrics:  # until tracker.finish, whichever way the point ends
            tracker.start_system_metrics()
        tracker.log_params(_flat(cfg.to_dict()) | {
            "budget": budget_str(cfg.budget),  # as in the tag: one spelling
            "data.name": ds.name, "data.version": ds.version,
            "data.fingerprint": ds.fingerprint, "code.version": code_version()})
        tracker.client.log_inputs(tracker.run_id, datasets=data_inputs(cfg, ds))
        write_text(run_dir / "config.yaml", yaml.safe_dump({"train": cfg.to_dict()}))
        if cfg.budget > 0 or cfg.pseudo:
            fit = train(cfg, run_dir, on_metrics=tracker.log_metrics,
                        on_checkpoint=tracker.flush, progress=progress, dataset=ds)
        else:  # no labels and no pseudo tasks: the model as initialised is the point
            fit = save_initial(cfg, run_dir)
        model = build_model(cfg)
        best = run_dir / "checkpoints" / "best.pt"
        model.load_state_dict(load_state(best)["model"])
        results = evaluate_fold(cfg, model, keep_samples=8, progress=progress, dataset=ds)
        labels = {"labels/images": fit.labels["images"], "labels/pixels": fit.labels["pixels"]}
        summary: dict[str, Any] = {"run_id": tracker.run_id, "run_name": name,
                                   "tags": point_tags(cfg), "best_step": fit.best_step,
                                   "val_miou": fit.best_val_miou, "train_seconds": fit.seconds,
                                   "selection": fit.selection} | labels
        for r in results:
            prefix = metric_prefix(cfg, r)
            tracker.log_metrics(r.metrics(prefix) | {f"{prefix}/episodes": r.episodes},
                                step=fit.steps)
            summary[f"{prefix}/miou"], summary[f"{prefix}/fbiou"] = r.miou, r.fbiou
            write_eval_artifacts(run_dir / "eval" / prefix.replace("/", "_"), r, ds.classes)
        own = next((r for r in results if metric_prefix(cfg, r) == "test"), results[0])
        summary["dropped_classes"] = own.dropped
        tracker.set_tags({TEST_CLASSES_TAG: ",".join(own.per_class),
                          TEST_DROPPED_TAG: ",".join(own.dropped),
                          TEST_EPISODES_TAG: own.test_key,
                          "selection": fit.selection})
        best_val = {"val/best_miou": fit.best_val_miou} if math.isfinite(fit.best_val_miou) else {}
        tracker.log_metrics({"best_step": fit.best_step, "train/seconds": fit.seconds} | labels
                            | best_val)
        tracker.log_artifact(run_dir / "config.yaml")
        tracker.log_artifact(best, "checkpoints")
        summary["model_uri"] = tracker.log_model(model.cpu(), metadata={
            "point": point_label(cfg), "inputs": MODEL_INPUTS, "n_ways": cfg.ways,
            "image_size": ds.size, "classes": ds.classes})
        for folder in sorted((run_dir / "eval").iterdir()):
            for f in sorted(folder.iterdir()):
                tracker.log_artifact(f, f"eval/{folder.name}")
        write_json(run_dir / RESULT, summary)
        tracker.finish()
        return summary
    except BaseException:
        tracker.finish("FAILED")
        raise


def subset_digest(ds: Dataset, ids: list[str]) -> str:
    """16 hex digits naming a set of images of one dataset version (order does not matter)."""
    blob = json.dumps({"dataset": ds.name, "version": ds.version, "ids": sorted(ids)})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def data_inputs(cfg: TrainConfig, ds: Dataset) -> list[Any]:
    """A point's MLflow dataset inputs: the labelled training subset its budget draws (context
    `train`: the only masks it may read) and its test split (context `test`), each with the
    store URL and dataset version as the source and a digest of its image ids."""
    from mlflow.entities import Dataset as MlflowDataset
    from mlflow.entities import DatasetInput, InputTag

    store = cfg.store if "://" in cfg.store else str(Path(cfg.store).resolve())
    source = json.dumps({"uri": store, "dataset": ds.name, "version": ds.version,
                         "fingerprint": ds.fingerprint})
    train_ids = ds.split_ids("train")
    labelled = label_budget(train_ids, cfg.budget, cfg.budget_seed)
    test_ids = ds.split_ids(cfg.test_split)
    subsets = [
        ("train", f"{ds.name} {ds.version} labelled {100 * cfg.budget:g}%", labelled,
         {"budget": budget_str(cfg.budget), "budget_seed": cfg.budget_seed,
          "labelled_images": len(labelled), "train_images": len(train_ids)}),
        ("test", f"{ds.name} {ds.version} {cfg.test_split}", test_ids,
         {"images": len(test_ids)}),
    ]
    return [DatasetInput(
        dataset=MlflowDataset(name=name, digest=subset_digest(ds, ids), source_type="zarr",
                              source=source, profile=json.dumps(profile)),
        tags=[InputTag("mlflow.data.context", context)])
        for context, name, ids, profile in subsets]


def write_eval_artifacts(folder: Path, r: EvalResult, class_names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "per_class_iou.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "iou"])
        w.writerows([[k, f"{v:.4f}"] for k, v in r.per_class.items()])
        w.writerows([["mIoU", f"{r.miou:.4f}"], ["FB-IoU", f"{r.fbiou:.4f}"]])
    # One row per (episode, episode class): the paired bootstrap of tasks/study/intervals.py
    # resamples these, and the same episode index is the same test episode in every point.
    with open(folder / "episodes.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["episode", "class_id", "class", "intersection", "union"])
        w.writerows([[e, c, class_names[c], i, u] for e, c, i, u in r.episode_rows])
    if r.samples:
        render_grid([ep for ep, _ in r.samples], [p for _, p in r.samples],
                    folder / "overlays.png", class_names=class_names)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def registered_name(model: str) -> str:
    """The registry entry of a model family; each study points an alias at its version."""
    return f"fss-{model}"


def register_study_models(results: Any, study: str) -> dict[str, dict[str, str]]:
    """Register one trained point per model of a study, under `fss-<model>` with the study as
    its alias: the largest budget, and of its seeds the one with the best mIoU on its held-out
    labelled images (`val/best_miou`; the test fold never chooses). `results` are the study's
    finished points (tasks.study.report.child_results). Points logged without a model are passed
    over. Returns model -> name, alias, version, run id."""
    import re

    from mlflow.tracking import MlflowClient

    from tasks.study.tracking import MODEL_URI_TAG, register_model, tracking_uri

    client = MlflowClient(tracking_uri())
    alias = re.sub(r"[^\w-]+", "-", study).strip("-") or "study"
    if re.fullmatch(r"[vV]\d+|latest", alias, flags=re.IGNORECASE):
        alias = f"study-{alias}"  # reserved alias names
    out: dict[str, dict[str, str]] = {}
    for model, group in results.groupby("model"):
        top = group[group["budget"].astype(float) == group["budget"].astype(float).max()]
        candidates = []
        for run_id in top["run_id"]:
            run = client.get_run(run_id)
            if MODEL_URI_TAG in run.data.tags:
                score = run.data.metrics.get("val/best_miou", -math.inf)
                candidates.append((-score, int(run.data.tags.get("seed", 0)), run))
        if not candidates:
            continue
        run = min(candidates, key=lambda c: c[:2])[2]
        name = registered_name(str(model))
        version = register_model(run.data.tags[MODEL_URI_TAG], name, alias, run.info.run_id)
        out[str(model)] = {"name": name, "alias": alias, "version": version,
                           "run_id": run.info.run_id}
    return out
