"""The features flow: a frozen embedder over every shard of a dataset, one Prefect task a shard."""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path
from typing import Any

import dask
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.fanout import artifact_slug, fan_out
from flows.runtime import task_runner
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


def run_features(*, workers: int = 2, dask_address: str | None = None, gpu: bool = False,
                 **params: Any) -> dict[str, Any]:
    """Run the features flow on a LocalCluster of `workers` processes or an existing scheduler.

    A LocalCluster started for ``gpu`` gives each worker one ``GPU`` resource (start as many
    workers as there are GPUs); an external cluster must declare its own.
    """
    runner = task_runner(workers=workers, dask_address=dask_address)
    if gpu and runner.cluster_kwargs is not None and not (dask_address or runner.address):
        runner.cluster_kwargs["resources"] = {"GPU": 1}
    return features_flow.with_options(task_runner=runner)(gpu=gpu, **params)


def parse_embedder(text: str, backbone: str = "small_resnet",
                   layer: str = "layer4") -> dict[str, Any]:
    """An embedder spec from JSON text, a JSON file, or a checkpoint path (with backbone/layer)."""
    text = text.strip()
    if text.startswith("{"):
        return json.loads(text)
    path = Path(text)
    if not path.exists():
        raise FileNotFoundError(f"embedder {text!r} is neither JSON nor an existing file")
    if path.suffix == ".json":
        return json.loads(path.read_text())
    return {"kind": "backbone", "backbone": backbone, "layer": layer,
            "checkpoint": str(path.resolve())}


def add_embedder_arguments(p: argparse.ArgumentParser, group: Any | None = None) -> None:
    """``--embedder`` (required, or one option of ``group``) and how to read a checkpoint."""
    (group or p).add_argument("--embedder", required=group is None,
                              help="spec as JSON, a .json file, or a backbone checkpoint path")
    p.add_argument("--backbone", default="small_resnet",
                   help="backbone of a checkpoint path (default: %(default)s)")
    p.add_argument("--layer", default="layer4", help="layer of a checkpoint path")


def add_cluster_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes")
    g.add_argument("--dask-address", help="existing Dask scheduler (or env FSS_DASK_ADDRESS)")


def add_features_parser(subparsers: Any) -> argparse.ArgumentParser:
    """`fss features`: embed a dataset's images with a frozen backbone."""
    p = subparsers.add_parser("features", help="embed a dataset's images (frozen backbone)")
    p.add_argument("--store", default="data/store.zarr", help="Zarr store path or fsspec URL")
    p.add_argument("--dataset", required=True, help="dataset name inside the store")
    p.add_argument("--version", help="dataset version (default: latest)")
    add_embedder_arguments(p)
    p.add_argument("--batch-size", type=int, default=features.DEFAULT_BATCH)
    p.add_argument("--gpu", action="store_true",
                   help="request one Dask GPU resource per shard task")
    add_cluster_arguments(p)
    p.set_defaults(func=cmd_features)
    return p


def cmd_features(args: argparse.Namespace) -> int:
    from flows.runtime import prefect_api

    spec = parse_embedder(args.embedder, args.backbone, args.layer)
    with prefect_api():
        summary = run_features(workers=args.workers, dask_address=args.dask_address,
                               gpu=args.gpu, store_url=args.store, name=args.dataset,
                               embedder=spec, version=args.version, batch_size=args.batch_size)
    print_features_summary(summary)
    return 0 if summary["complete"] else 1


def print_features_summary(s: dict[str, Any]) -> None:
    d, h, w = s["shape"]
    print(f"features {s['key']} of {s['name']} ({s['version']}) in {s['seconds']:.1f} s: "
          f"{s['shards_written']} shards written ({s['images']} images), "
          f"{s['shards_skipped']} already complete")
    print(f"  {d} x {h} x {w} float16 per image; embedder {json.dumps(s['embedder'])}")
    if not s["complete"]:
        print("  incomplete: rerun to resume")
