"""The ablation flow: models × budgets × folds × shots × seeds, one coarse task per point.

Each point trains and evaluates in a Dask worker (holding one GPU when the study says so) and
becomes an MLflow child run under one parent run per study. Finished points are read back, not
retrained, so a crashed sweep resumes and a widened sweep trains only its new points.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import dask
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import as_completed
from tqdm.auto import tqdm

from flows.runtime import artifact_key, task_runner
from flows.train import describe, train_point_task
from tasks import defaults
from tasks.fewshot.experiment import register_study_models
from tasks.study import report
from tasks.study.ablation import StudySpec, study_from_dict
from tasks.study.tracking import Tracker, ensure_experiment


def _parent_tracker(name: str, experiment: str) -> Tracker:
    """The study's parent run: found again by its name, so a rerun continues it."""
    existing = report.parent_run(experiment, name)
    tags = {report.KIND_TAG: "ablation", report.STUDY_TAG: name}
    if existing is not None:
        tracker = Tracker(experiment, run_id=existing.info.run_id)
        tracker.client.update_run(tracker.run_id, status="RUNNING")
        return tracker
    return Tracker(experiment, run_name=f"ablation {name}", tags=tags)


SUMMARY_TABLE = "summary/summary_table.json"


@flow(name="ablation", flow_run_name="ablation {study.study}")
def ablation_flow(study: StudySpec, overrides: list[str] | None = None,
                  out_dir: str = defaults.REPORT_DIR, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) a study; returns its summary table and what was trained or skipped.

    `study` is typed (Prefect validates it and shows its schema); its points are validated
    here, all of them before any runs (`run_ablation` has checked them before the flow starts).
    """
    logger = get_run_logger()
    spec = study_from_dict(study, overrides)
    logger.info("study %s: %d points, MLflow experiment %r", spec.name, len(spec.points),
                spec.experiment)
    ensure_experiment(spec.experiment)  # once, before workers touch the tracking DB
    parent = _parent_tracker(spec.name, spec.experiment)
    parent.log_params({"study": spec.name, "points": len(spec.points)})
    annotate = dask.annotate(resources={"GPU": 1}) if spec.gpu else contextlib.nullcontext()
    with annotate:
        futures = [train_point_task.submit(cfg, parent.run_id, progress=False)
                   for cfg in spec.points]
    done, failed = [], []
    bar = tqdm(total=len(futures), desc=f"ablation {spec.name}", unit="point",
               disable=not progress)
    for future in as_completed(futures):
        try:
            done.append(future.result())
            logger.info(describe(done[-1]))
        except Exception as exc:  # noqa: BLE001 - one failed point must not hide the others
            failed.append(str(exc))
            logger.error("point failed: %s", exc)
        bar.update()
    bar.close()
    counts = {"points": len(spec.points), "trained": sum(not d.get("skipped") for d in done),
              "skipped": sum(bool(d.get("skipped")) for d in done), "failed": len(failed)}
    logger.info("study %s: %s", spec.name, ", ".join(f"{v} {k}" for k, v in counts.items()))
    results = report.child_results(parent.run_id)
    folder = Path(out_dir) / spec.name
    summary = report.build_summary(results, report.load_episodes(results))
    paths = report.write_summary(summary, results, folder,
                                 title=f"{spec.name}: mIoU vs labelled images",
                                 points=report.load_point_artifacts(results))
    _log_summary(parent, summary, paths)
    registered = register_study_models(results, spec.name)
    for model, r in registered.items():
        logger.info("%s: registered %s version %s, alias %r (run %s)", model, r["name"],
                    r["version"], r["alias"], r["run_id"])
    table = report.table_markdown(summary.table)
    markdown = report.to_markdown(summary)
    runs = (f"{counts['points']} points: {counts['trained']} trained, {counts['skipped']} "
            f"skipped (already done, read back), {counts['failed']} failed")
    create_markdown_artifact(key=artifact_key("ablation", spec.name),
                             markdown=f"# Ablation {spec.name}\n\n{runs}\n\n{markdown}",
                             description=f"label-budget ablation {spec.name}: {runs}")
    create_table_artifact(key=artifact_key("ablation", spec.name, "table"),
                          table=_records(summary.table),
                          description=f"label-budget ablation {spec.name}")
    parent.finish("FAILED" if failed else "FINISHED")
    return {"parent_run_id": parent.run_id, "experiment": spec.experiment,
            "points": counts["points"], "trained": counts["trained"],
            "skipped": counts["skipped"], "failed": failed, "registered": registered,
            "table": table, "report": markdown, "files": {k: str(v) for k, v in paths.items()}}


def _log_summary(parent: Tracker, summary: report.Summary, paths: dict[str, Path]) -> None:
    """On the parent run: the files, the table as an MLflow table (browsable in the UI), the
    per-budget mIoU and the budget estimates as metrics."""
    for path in paths.values():
        parent.log_artifact(path, "summary")
    # log_table appends to an existing table: a resumed or widened study replaces it instead.
    _delete_artifact(parent, SUMMARY_TABLE)
    parent.client.log_table(parent.run_id, data=summary.table, artifact_file=SUMMARY_TABLE)
    parent.log_metrics(report.summary_metrics(summary))
    parent.flush()


def _delete_artifact(tracker: Tracker, path: str) -> None:
    """Remove one artifact of a run, where the artifact store allows it (local, S3, the MLflow
    artifact proxy); elsewhere the table is appended to, as MLflow does."""
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    folder = Path(path).parent.as_posix()
    if all(a.path != path for a in tracker.client.list_artifacts(tracker.run_id, folder)):
        return
    uri = tracker.client.get_run(tracker.run_id).info.artifact_uri
    with contextlib.suppress(MlflowException, NotImplementedError, OSError):
        get_artifact_repository(uri).delete_artifacts(path)


def _records(table: Any) -> list[dict[str, Any]]:
    """Rows for a Prefect table artifact: rounded, and None for n/a (JSON has no NaN)."""
    rounded = table.round(2).astype(object)
    return rounded.where(rounded.notna(), None).to_dict(orient="records")


def run_ablation(study: StudySpec | dict[str, Any], *,
                 workers: int = defaults.ABLATION_WORKERS, dask_address: str | None = None,
                 overrides: list[str] | None = None, **kw: Any) -> dict[str, Any]:
    """Validate the study and every point (a ConfigError before any cluster or run starts),
    then run the ablation flow on a Dask task runner."""
    spec = study_from_dict(study, overrides).spec
    # Split the cores between worker processes so their torch threads don't oversubscribe.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    runner = task_runner(workers=workers, dask_address=dask_address)
    return ablation_flow.with_options(task_runner=runner)(spec, overrides=overrides, **kw)
