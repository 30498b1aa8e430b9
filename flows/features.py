"""The features flow: a frozen embedder over every shard of a dataset, one Prefect task a shard."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import dask
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.fanout import artifact_slug, fan_out
from flows.runtime import task_runner
from tasks import defaults
from tasks.data import store
from tasks.labelfree import features


@task(name="features-shard", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2,
      task_run_name="features {name} shard {shard}")
def extract_shard_task(store_url: str, name: str, version: str, key: str, shard: int,
                       spec: dict[str, Any], batch_size: int) -> features.ShardReport:
    return features.extract_shard(store_url, name, version, key, shard, spec, batch_size)


@flow(name="features", flow_run_name="features {name}")
def features_flow(store_url: str, name: str, embedder: dict[str, Any],
                  version: str | None = None, batch_size: int = features.DEFAULT_BATCH,
                  gpu: bool = False, progress: bool = True) -> dict[str, Any]:
    """Embed every image of a dataset version into a ``features-<hash>`` derived array.

    With ``gpu`` each shard task asks its Dask worker for one ``GPU`` resource, so GPU workers
    (started with ``--resources GPU=1``) run them one at a time per device.
    """
    t0 = time.perf_counter()
    plan = features.plan_features(store_url, name, embedder, version)
    features.create_features(plan)
    done = store.done_shards(store_url, name, plan.version, derived=plan.key)
    todo = [k for k in range(plan.n_shards) if k not in done]
    with dask.annotate(resources={"GPU": 1}) if gpu else contextlib.nullcontext():
        reports = fan_out(
            lambda k: extract_shard_task.submit(store_url, name, plan.version, plan.key, k,
                                                embedder, batch_size),
            todo, total=plan.n_shards, done=len(done),
            artifact_key=f"features-{artifact_slug(name)}",
            description=f"feature shards of {name}/{plan.version} ({plan.key})",
            label=f"features {name}", progress=progress)
    images = sum(r.images for r in reports)
    summary = store.finalize_derived(store_url, name, plan.version, plan.key)
    return {"name": name, "version": plan.version, "key": plan.key, "embedder": embedder,
            "shape": [plan.dim, plan.height, plan.width], "shards": plan.n_shards,
            "shards_written": len(todo), "shards_skipped": len(done), "images": images,
            "complete": summary["complete"], "seconds": round(time.perf_counter() - t0, 2)}


def run_features(*, workers: int = defaults.WORKERS, dask_address: str | None = None,
                 gpu: bool = False, **params: Any) -> dict[str, Any]:
    """Run the features flow on a LocalCluster of `workers` processes or an existing scheduler.

    A LocalCluster started for ``gpu`` gives each worker one ``GPU`` resource (start as many
    workers as there are GPUs); an external cluster must declare its own.
    """
    runner = task_runner(workers=workers, dask_address=dask_address)
    if gpu and runner.cluster_kwargs is not None and not (dask_address or runner.address):
        runner.cluster_kwargs["resources"] = {"GPU": 1}
    return features_flow.with_options(task_runner=runner)(gpu=gpu, **params)
