"""The ingest flow: list a dataset, then write its shards in Prefect tasks on a Dask cluster."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from flows.fanout import MAX_TASKS_IN_FLIGHT, artifact_slug, fan_out, shard_groups, shard_run_name
from flows.runtime import dask_client
from tasks import defaults
from tasks.data import ingest, store
from tasks.data.readers import Item, Reader, make_reader


# Where the ~7 ms of CPU per image of one Prefect task a shard on the Dask workers went
# (benchmarks/ingest.py, part a'): every worker process imported Prefect and started its task
# engine (~4 s of CPU a worker), and every task paid Prefect's state calls, events and logs.
# Now the Prefect tasks run in the flow's process, a few per worker, each a contiguous run of
# shards that it hands to Dask as one plain function call (`ingest.ingest_shards`): the workers
# import only the store and the readers. The store records finished shards, so Prefect's input
# caching is not needed (hashing the item lists would cost time for nothing); a retry resumes,
# skipping the shards already done, and Dask reruns the call of a worker that died. The item
# lists and readers go in `quote`: Prefect would otherwise walk every item twice a task,
# looking for upstream futures (~0.2 ms of CPU an image, benchmarks/ingest.py).
@task(name="ingest-shards", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2,
      task_run_name=shard_run_name("ingest"))
def ingest_shards_task(client: Any, store_url: str, name: str, version: str, shards: list[int],
                       items: list[list[Item]], readers: dict[str, Reader], size: int,
                       resize: str = defaults.RESIZE) -> list[ingest.ShardReport]:
    """Write ``shards`` on a Dask worker of ``client`` (``items[i]`` are those of ``shards[i]``)."""
    return client.submit(ingest.ingest_shards, store_url, name, version, shards, items, readers,
                         size, resize, pure=False).result()


@flow(name="ingest", flow_run_name="ingest {name}",
      task_runner=ThreadPoolTaskRunner(max_workers=MAX_TASKS_IN_FLIGHT))
def ingest_flow(source: str, root: str, store_url: str, name: str,
                splits: list[str] | None = None, size: int = ingest.DEFAULT_SIZE,
                shard_size: int = ingest.DEFAULT_SHARD_SIZE, classes_file: str | None = None,
                list_file: str | None = None, progress: bool = True,
                max_pixels: int = ingest.DEFAULT_MAX_PIXELS,
                resize: str = defaults.RESIZE, workers: int = defaults.WORKERS,
                dask_address: str | None = None) -> dict[str, Any]:
    """Ingest `splits` of a dataset into the store as one dataset version: VOC or COCO format
    under `root`, or (`source="layout"`) the dataset a layout file `root` describes, whose
    splits are the default. `resize` "pad" keeps aspect ratios (padding), "square" stretches.

    The shards still to write go to the Dask scheduler at `dask_address` (or
    `FSS_DASK_ADDRESS`), else to a LocalCluster of `workers` processes started only when
    there is a shard to write, as `TASKS_PER_SLOT` Prefect tasks per worker thread (one shard
    a task when there are fewer shards), each a contiguous run of shards."""
    splits = splits or ingest.default_splits(source, root)
    readers = [make_reader(source, Path(root), s, classes_file=classes_file, list_file=list_file)
               for s in splits]
    plan = ingest.plan_ingest(readers, name, size=size, shard_size=shard_size,
                              max_pixels=max_pixels, resize=resize)
    spec = plan.spec
    store.create_dataset(store_url, spec)
    done = store.done_shards(store_url, name, spec.version)
    todo = [k for k in range(spec.n_shards) if k not in done]
    # A rerun with every shard done starts no cluster.
    with dask_client(workers, dask_address) if todo else contextlib.nullcontext() as client:
        results = fan_out(
            lambda shards: ingest_shards_task.submit(
                client, store_url, name, spec.version, shards,
                quote([plan.shard_items(k) for k in shards]), quote(plan.readers), size, resize),
            shard_groups(client, todo), total=spec.n_shards, done=len(done),
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


def run_ingest(*, workers: int = defaults.WORKERS, dask_address: str | None = None,
               **params: Any) -> dict[str, Any]:
    """Run the ingest flow on a LocalCluster of `workers` processes or an existing scheduler."""
    return ingest_flow(workers=workers, dask_address=dask_address, **params)
