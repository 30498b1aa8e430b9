"""The ingest flow: list a dataset, then write its shards in Prefect tasks on a Dask cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.fanout import (
    TASKS_PER_SLOT,
    artifact_slug,
    fan_out,
    group_units,
    shard_label,
    worker_slots,
)
from flows.runtime import task_runner
from tasks.data import ingest, store
from tasks.data.readers import Item, Reader, make_reader


def _task_run_name() -> str:
    from prefect.runtime import task_run

    p = task_run.parameters
    return f"ingest {p['name']} {shard_label(p['shards'])}"


# The store records finished shards, so Prefect's own input caching is not needed (and hashing
# the item lists would cost time for nothing). One task writes several shards: Prefect's
# per-task cost (task-run creation, state changes, events, logs: ~0.2 s of CPU over the flow,
# the worker and the API server) was most of the flow's cost per image with one task a shard
# (benchmarks/ingest.py). A retry resumes: shards already done are skipped.
@task(name="ingest-shards", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2,
      task_run_name=_task_run_name)
def ingest_shards_task(store_url: str, name: str, version: str, shards: list[int],
                       items: list[list[Item]], readers: dict[str, Reader], size: int,
                       resize: str = "square") -> list[ingest.ShardReport]:
    """Write ``shards`` one after another (``items[i]`` are the items of ``shards[i]``)."""
    return [ingest.ingest_shard(store_url, name, version, shard, shard_items, readers, size,
                                resize)
            for shard, shard_items in zip(shards, items, strict=True)]


@flow(name="ingest", flow_run_name="ingest {name}")
def ingest_flow(source: str, root: str, store_url: str, name: str,
                splits: list[str] | None = None, size: int = ingest.DEFAULT_SIZE,
                shard_size: int = ingest.DEFAULT_SHARD_SIZE, classes_file: str | None = None,
                list_file: str | None = None, progress: bool = True,
                max_pixels: int = ingest.DEFAULT_MAX_PIXELS,
                resize: str = "square") -> dict[str, Any]:
    """Ingest `splits` of a dataset into the store as one dataset version: VOC or COCO format
    under `root`, or (`source="layout"`) the dataset a layout file `root` describes, whose
    splits are the default. `resize` "pad" keeps aspect ratios (padding), "square" stretches.

    The shards still to write go out as `TASKS_PER_SLOT` tasks per Dask worker thread (one
    shard a task when there are fewer shards), each a contiguous run of shards."""
    splits = splits or ingest.default_splits(source, root)
    readers = [make_reader(source, Path(root), s, classes_file=classes_file, list_file=list_file)
               for s in splits]
    plan = ingest.plan_ingest(readers, name, size=size, shard_size=shard_size,
                              max_pixels=max_pixels, resize=resize)
    spec = plan.spec
    store.create_dataset(store_url, spec)
    done = store.done_shards(store_url, name, spec.version)
    todo = [k for k in range(spec.n_shards) if k not in done]
    groups = group_units(todo, worker_slots() * TASKS_PER_SLOT)
    results = fan_out(
        lambda shards: ingest_shards_task.submit(
            store_url, name, spec.version, shards, [plan.shard_items(k) for k in shards],
            plan.readers, size, resize),
        groups, total=spec.n_shards, done=len(done),
        artifact_key=f"ingest-{artifact_slug(name)}",
        description=f"shards of {name}/{spec.version} written", label=f"ingest {name}",
        progress=progress, weight=len)
    reports = [ingest.ShardReport(shard=k, skipped=True) for k in sorted(done)]
    reports += [r for group in results for r in group]
    summary = ingest.summarize(reports, plan, store.finalize_dataset(store_url, name,
                                                                     spec.version))
    create_markdown_artifact(key=f"ingest-{artifact_slug(name)}-summary",
                             markdown=_markdown(summary, reports),
                             description=f"ingest of {name}")
    return summary


def _markdown(summary: dict[str, Any], reports: list[ingest.ShardReport]) -> str:
    lines = [f"# Ingest of `{summary['name']}` ({summary['version']})", "",
             "| listed | ingested | quarantined | shards written | shards skipped |",
             "| --- | --- | --- | --- | --- |",
             f"| {summary['listed']} | {summary['ingested']} | {summary['quarantined']} | "
             f"{summary['shards_written']} | {summary['shards_skipped']} |"]
    bad = [q for r in reports for q in r.quarantined]
    if bad:
        lines += ["", "## Quarantined in this run", "", "| path | reason |", "| --- | --- |"]
        lines += [f"| `{q['path']}` | {q['reason']} |" for q in bad]
    return "\n".join(lines)


def run_ingest(*, workers: int = 2, dask_address: str | None = None,
               **params: Any) -> dict[str, Any]:
    """Run the ingest flow on a LocalCluster of `workers` processes or an existing scheduler."""
    runner = task_runner(workers=workers, dask_address=dask_address)
    return ingest_flow.with_options(task_runner=runner)(**params)
