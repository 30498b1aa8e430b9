"""The train flow: one training + evaluation point, tracked in MLflow."""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tasks.config import from_dict
from tasks.experiment import run_point
from tasks.tracking import ensure_experiment


@task(name="train-evaluate", cache_policy=NO_CACHE)
def train_point_task(config: dict[str, Any], parent_run_id: str | None = None,
                     progress: bool = True) -> dict[str, Any]:
    return run_point(from_dict(config), parent_run_id=parent_run_id, progress=progress)


@flow(name="train")
def train_flow(config: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    """Train and evaluate one config; a finished point is read back, not retrained."""
    cfg = from_dict(config)
    ensure_experiment(cfg.experiment)  # once, before any worker touches the tracking DB
    result = train_point_task(cfg.to_dict(), progress=progress)
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in result.items()
                     if k.startswith("test") and isinstance(v, float))
    create_markdown_artifact(markdown=f"# {result['run_name']}\n\n| metric | value |\n"
                                      f"| --- | --- |\n{rows}", description="test metrics")
    return result
