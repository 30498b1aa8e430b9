"""The ingest flow: list a dataset, then write one shard per Prefect task on a Dask cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from tqdm.auto import tqdm

from flows.runtime import task_runner
from tasks import defaults
from tasks.data import ingest, store
from tasks.data.readers import Item, Reader, make_reader


# The store records finished shards, so Prefect's own input caching is not needed (and hashing
# a shard's item list would cost time for nothing).
@task(name="ingest-shard", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2,
      task_run_name="ingest {name} shard {shard}")
def ingest_shard_task(store_url: str, name: str, version: str, shard: int, items: list[Item],
                      readers: dict[str, Reader], size: int,
                      resize: str = "square") -> ingest.ShardReport:
    return ingest.ingest_shard(store_url, name, version, shard, items, readers, size, resize)


@flow(name="ingest", flow_run_name="ingest {name}")
def ingest_flow(source: str, root: str, store_url: str, name: str,
                splits: list[str] | None = None, size: int = ingest.DEFAULT_SIZE,
                shard_size: int = ingest.DEFAULT_SHARD_SIZE, classes_file: str | None = None,
                list_file: str | None = None, progress: bool = True,
                max_pixels: int = ingest.DEFAULT_MAX_PIXELS,
                resize: str = "square") -> dict[str, Any]:
    """Ingest `splits` of a dataset into the store as one dataset version: VOC or COCO format
    under `root`, or (`source="layout"`) the dataset a layout file `root` describes, whose
    splits are the default. `resize` "pad" keeps aspect ratios (padding), "square" stretches."""
    splits = splits or ingest.default_splits(source, root)
    readers = [make_reader(source, Path(root), s, classes_file=classes_file, list_file=list_file)
               for s in splits]
    plan = ingest.plan_ingest(readers, name, size=size, shard_size=shard_size,
                              max_pixels=max_pixels, resize=resize)
    spec = plan.spec
    store.create_dataset(store_url, spec)
    done = store.done_shards(store_url, name, spec.version)
    reports = [ingest.ShardReport(shard=k, skipped=True) for k in sorted(done)]
    futures = [
        ingest_shard_task.submit(store_url, name, spec.version, k, plan.shard_items(k),
                                 plan.readers, size, resize)
        for k in range(spec.n_shards) if k not in done
    ]
    artifact = create_progress_artifact(
        progress=100.0 * len(done) / spec.n_shards, key=f"ingest-{_key(name)}",
        description=f"shards of {name}/{spec.version} written")
    bar = tqdm(total=spec.n_shards, initial=len(done), unit="shard", disable=not progress,
               desc=f"ingest {name}")
    for future in as_completed(futures):
        reports.append(future.result())
        bar.update()
        update_progress_artifact(artifact, progress=100.0 * bar.n / spec.n_shards)
    bar.close()
    summary = ingest.summarize(reports, plan, store.finalize_dataset(store_url, name,
                                                                     spec.version))
    create_markdown_artifact(key=f"ingest-{_key(name)}-summary",
                             markdown=_markdown(summary, reports),
                             description=f"ingest of {name}")
    return summary


def _key(name: str) -> str:
    # Prefect artifact keys allow only lowercase letters, digits and dashes.
    return "".join(c if c.isalnum() else "-" for c in name.lower())


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


def run_ingest(*, workers: int = defaults.WORKERS, dask_address: str | None = None,
               **params: Any) -> dict[str, Any]:
    """Run the ingest flow on a LocalCluster of `workers` processes or an existing scheduler."""
    runner = task_runner(workers=workers, dask_address=dask_address)
    return ingest_flow.with_options(task_runner=runner)(**params)
