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
from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import as_completed
from tqdm.auto import tqdm

from flows.runtime import task_runner
from flows.train import train_point_task
from tasks import report
from tasks.ablation import study_from_dict
from tasks.tracking import Tracker, ensure_experiment


def _parent_tracker(name: str, experiment: str) -> Tracker:
    """The study's parent run: found again by its name, so a rerun continues it."""
    existing = report.parent_run(experiment, name)
    tags = {report.KIND_TAG: "ablation", report.STUDY_TAG: name}
    if existing is not None:
        tracker = Tracker(experiment, run_id=existing.info.run_id)
        tracker.client.update_run(tracker.run_id, status="RUNNING")
        return tracker
    return Tracker(experiment, run_name=f"ablation {name}", tags=tags)


@flow(name="ablation")
def ablation_flow(study: dict[str, Any], overrides: list[str] | None = None,
                  out_dir: str = "reports", progress: bool = True) -> dict[str, Any]:
    """Run (or resume) a study; returns its summary table and what was trained or skipped."""
    spec = study_from_dict(study, overrides)
    ensure_experiment(spec.experiment)  # once, before workers touch the tracking DB
    parent = _parent_tracker(spec.name, spec.experiment)
    parent.log_params({"study": spec.name, "points": len(spec.points)})
    annotate = dask.annotate(resources={"GPU": 1}) if spec.gpu else contextlib.nullcontext()
    with annotate:
        futures = [train_point_task.submit(cfg.to_dict(), parent.run_id, progress=False)
                   for cfg in spec.points]
    done, failed = [], []
    bar = tqdm(total=len(futures), desc=f"ablation {spec.name}", unit="point",
               disable=not progress)
    for future in as_completed(futures):
        try:
            done.append(future.result())
        except Exception as exc:  # noqa: BLE001 - one failed point must not hide the others
            failed.append(str(exc))
        bar.update()
    bar.close()
    results = report.child_results(parent.run_id)
    folder = Path(out_dir) / spec.name
    paths = report.write_summary(results, folder, title=f"{spec.name}: mIoU vs label budget")
    for path in paths.values():
        parent.log_artifact(path, "summary")
    table = report.summarize(results)
    markdown = report.to_markdown(table)
    create_markdown_artifact(markdown=f"# Ablation {spec.name}\n\n{markdown}",
                             description=f"label-budget ablation {spec.name}")
    create_table_artifact(table=table.round(2).to_dict(orient="records"),
                          description=f"label-budget ablation {spec.name}")
    parent.finish("FAILED" if failed else "FINISHED")
    return {"parent_run_id": parent.run_id, "experiment": spec.experiment,
            "points": len(spec.points), "trained": sum(not d.get("skipped") for d in done),
            "skipped": sum(bool(d.get("skipped")) for d in done), "failed": failed,
            "table": markdown, "files": {k: str(v) for k, v in paths.items()}}


def run_ablation(study: dict[str, Any], *, workers: int = 1, dask_address: str | None = None,
                 **kw: Any) -> dict[str, Any]:
    # Split the cores between worker processes so their torch threads don't oversubscribe.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    runner = task_runner(workers=workers, dask_address=dask_address)
    return ablation_flow.with_options(task_runner=runner)(study, **kw)
