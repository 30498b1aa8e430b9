"""The features flow: a frozen embedder over every shard of a dataset, in runs of shards on Dask."""

from __future__ import annotations

import contextlib
import time
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from flows.fanout import MAX_TASKS_IN_FLIGHT, artifact_slug, fan_out, shard_groups, shard_run_name
from flows.runtime import dask_client
from tasks import defaults
from tasks.data import store
from tasks.labelfree import features

GPU = {"GPU": 1}  # the Dask resource a GPU worker declares, once per device


# As in the ingest flow (flows/ingest.py): the Prefect tasks run in the flow's process and each
# hands a contiguous run of shards to Dask as one plain call, so the workers never import
# Prefect. The store's done flags make a retry resume; Dask reruns the call of a dead worker.
@task(name="features-shards", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2,
      task_run_name=shard_run_name("features"))
def extract_shards_task(client: Any, store_url: str, name: str, version: str, key: str,
                        shards: list[int], spec: dict[str, Any], batch_size: int,
                        gpu: bool = False) -> list[features.ShardReport]:
    """Embed ``shards`` on a Dask worker of ``client``, one holding a ``GPU`` with ``gpu``."""
    return client.submit(features.extract_shards, store_url, name, version, key, shards, spec,
                         batch_size, resources=GPU if gpu else None, pure=False).result()


@flow(name="features", flow_run_name="features {name}",
      task_runner=ThreadPoolTaskRunner(max_workers=MAX_TASKS_IN_FLIGHT))
def features_flow(store_url: str, name: str, embedder: dict[str, Any],
                  version: str | None = None, batch_size: int = features.DEFAULT_BATCH,
                  gpu: bool = False, progress: bool = True, workers: int = defaults.WORKERS,
                  dask_address: str | None = None) -> dict[str, Any]:
    """Embed every image of a dataset version into a ``features-<hash>`` derived array.

    The shards still to embed go to the Dask scheduler at `dask_address` (or
    `FSS_DASK_ADDRESS`), else to a LocalCluster of `workers` processes started only when there
    is a shard to embed, in contiguous runs (`flows.fanout.shard_groups`). With ``gpu`` each
    run asks its Dask worker for one ``GPU`` resource, so GPU workers (started with
    ``--resources GPU=1``) run them one at a time per device; a LocalCluster started for it
    gives each worker one ``GPU`` (start as many workers as there are GPUs).
    """
    t0 = time.perf_counter()
    plan = features.plan_features(store_url, name, embedder, version)
    features.create_features(plan)
    done = store.done_shards(store_url, name, plan.version, derived=plan.key)
    todo = [k for k in range(plan.n_shards) if k not in done]
    # A rerun with every shard done starts no cluster.
    with (dask_client(workers, dask_address, resources=GPU if gpu else None) if todo
          else contextlib.nullcontext()) as client:
        results = fan_out(
            lambda shards: extract_shards_task.submit(client, store_url, name, plan.version,
                                                      plan.key, shards, embedder, batch_size,
                                                      gpu),
            shard_groups(client, todo), total=plan.n_shards, done=len(done),
            artifact_key=f"features-{artifact_slug(name)}",
            description=f"feature shards of {name}/{plan.version} ({plan.key})",
            label=f"features {name}", progress=progress, weight=len)
    images = sum(r.images for group in results for r in group)
    summary = store.finalize_derived(store_url, name, plan.version, plan.key)
    return {"name": name, "version": plan.version, "key": plan.key, "embedder": embedder,
            "shape": [plan.dim, plan.height, plan.width], "shards": plan.n_shards,
            "shards_written": len(todo), "shards_skipped": len(done), "images": images,
            "complete": summary["complete"], "seconds": round(time.perf_counter() - t0, 2)}


def run_features(*, workers: int = defaults.WORKERS, dask_address: str | None = None,
                 **params: Any) -> dict[str, Any]:
    """Run the features flow on a LocalCluster of `workers` processes or an existing scheduler
    (`gpu=True` among ``params``: see `features_flow`)."""
    return features_flow(workers=workers, dask_address=dask_address, **params)
