"""The train flow: one training + evaluation point, tracked in MLflow.

In the Prefect UI a point's task run is named by what it does (`train umt 20% seed 1`), and a
point that was already done ends in a `Skipped` state (a kind of Completed) instead of looking
like a trained one; its log says which.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed

from flows.runtime import artifact_key
from tasks.fewshot.config import TrainConfig, from_dict
from tasks.fewshot.experiment import point_label, run_point
from tasks.study.tracking import ensure_experiment


def as_config(config: TrainConfig | dict[str, Any]) -> TrainConfig:
    """The flows' config parameter: a TrainConfig, or its dict (from JSON: the API, a caller
    that predates typed parameters), validated."""
    return config if isinstance(config, TrainConfig) else from_dict(config)


def _task_run_name(parameters: dict[str, Any]) -> str:
    return "train " + point_label(as_config(parameters["config"]))


def _flow_run_name() -> str:
    from prefect.runtime import flow_run

    return "train " + point_label(as_config(flow_run.parameters["config"]))


def describe(result: dict[str, Any]) -> str:
    """One log line for a finished point: trained or skipped, and its test mIoU."""
    what = ("skipped: already done, read back" if result.get("skipped")
            else f"trained in {result['train_seconds']:.0f} s")
    miou = result.get("test/miou")
    score = f"test mIoU {100 * miou:.2f}" if isinstance(miou, float) else "no test mIoU"
    return f"{result['run_name']}: {what}; {score}; MLflow run {result['run_id']}"


@task(name="train-evaluate", cache_policy=NO_CACHE, task_run_name=_task_run_name)
def train_point_task(config: TrainConfig, parent_run_id: str | None = None,
                     progress: bool = True) -> Any:
    """`run_point`; a point already done returns its result in a `Skipped` state."""
    result = run_point(as_config(config), parent_run_id=parent_run_id, progress=progress)
    get_run_logger().info(describe(result))
    if result.get("skipped"):
        return Completed(name="Skipped", message="already done: read back, not retrained",
                         data=result)
    return result


@flow(name="train", flow_run_name=_flow_run_name)
def train_flow(config: TrainConfig, progress: bool = True) -> dict[str, Any]:
    """Train and evaluate one config; a finished point is read back, not retrained.

    `config` is typed: Prefect validates it (a dict from the API or a deployment becomes a
    TrainConfig, a bad one fails the run before it starts) and shows its schema in the UI.
    """
    cfg = as_config(config)
    ensure_experiment(cfg.experiment)  # once, before any worker touches the tracking DB
    # submit: a task that returns a state gives its data through the future's result.
    result = train_point_task.submit(cfg, progress=progress).result()
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in result.items()
                     if k.startswith("test") and isinstance(v, float))
    create_markdown_artifact(key=artifact_key("train", cfg.experiment, point_label(cfg)),
                             markdown=f"# {result['run_name']}\n\n| metric | value |\n"
                                      f"| --- | --- |\n{rows}", description="test metrics")
    return result
