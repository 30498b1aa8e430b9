"""The pseudo-mask flow: k-means over Dask, pseudo masks in runs of shards, a quality report."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from flows.fanout import MAX_TASKS_IN_FLIGHT, artifact_slug, fan_out, shard_groups, shard_run_name
from flows.features import run_features as _run_features
from flows.runtime import dask_client
from tasks import defaults
from tasks.data import store
from tasks.labelfree import clustering

# Every task below runs in the flow's process and gives Dask plain functions only, so the
# workers never import Prefect (why: the comment above flows/ingest.py's ingest_shards_task).


@task(name="kmeans", cache_policy=NO_CACHE, task_run_name="k-means {name}")
def kmeans_task(client: Any, store_url: str, name: str, version: str, features_key: str,
                cfg: clustering.PseudoConfig) -> clustering.KMeansResult:
    """Drives k-means from the flow's process: sampling and Lloyd steps go to the workers of
    ``client`` as plain Dask tasks, each sample piece staying on the worker that drew it (a
    Prefect task per step would cost more than the step itself, docs/architecture.md)."""
    return clustering.fit_kmeans(store_url, name, version, features_key, cfg, client=client)


@task(name="pseudo-assign-shards", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2,
      task_run_name=shard_run_name("pseudo masks"))
def assign_shards_task(client: Any, store_url: str, name: str, version: str, key: str,
                       shards: list[int]) -> list[clustering.ShardReport]:
    """Pseudo masks of ``shards`` on a Dask worker of ``client`` (done shards are skipped, so
    a retry resumes)."""
    return client.submit(clustering.assign_shards, store_url, name, version, key, shards,
                         pure=False).result()


@task(name="cluster-report", cache_policy=NO_CACHE, task_run_name="cluster report {name}")
def report_task(client: Any, store_url: str, name: str, version: str,
                key: str) -> dict[str, Any] | None:
    """The cluster quality report, one pass over the store on a Dask worker of ``client``."""
    try:
        return client.submit(clustering.cluster_report, store_url, name, version, key,
                             pure=False).result()
    except ValueError:  # no labelled pixel at all: nothing to score against
        return None


@flow(name="pseudo", flow_run_name="pseudo masks {name} k={k}",
      task_runner=ThreadPoolTaskRunner(max_workers=MAX_TASKS_IN_FLIGHT))
def pseudo_flow(store_url: str, name: str, features_key: str, version: str | None = None,
                k: int = defaults.PSEUDO_K, seed: int = defaults.SEED,
                sample_size: int = defaults.PSEUDO_SAMPLE_SIZE,
                iters: int = defaults.PSEUDO_ITERS, fit_splits: list[str] | None = None,
                superpixels: dict[str, Any] | None = None, report: bool = True,
                report_dir: str = defaults.REPORT_DIR,
                experiment: str | None = None, progress: bool = True,
                workers: int = defaults.WORKERS,
                dask_address: str | None = None) -> dict[str, Any]:
    """Cluster the pixels of a features array into pseudo masks (a ``pseudo-<hash>`` group).

    ``superpixels`` may set ``scale``, ``sigma`` and ``min_size`` of the Felzenszwalb
    refinement. With ``report`` the masks are scored against the true ones (the only label
    read) and written to ``report_dir``; with ``experiment`` also logged to MLflow.

    k-means, the shards still to assign (in contiguous runs, `flows.fanout.shard_groups`) and
    the report go to the Dask scheduler at `dask_address` (or `FSS_DASK_ADDRESS`), else to a
    LocalCluster of `workers` processes started only when one of them is left to do.
    """
    t0 = time.perf_counter()
    version = store.resolve_version(store_url, name, version)
    fattrs = store.derived_attrs(store_url, name, version, features_key)
    if not fattrs.get("complete"):
        raise store.StoreError(f"features {features_key} of {name}/{version} are incomplete: "
                               "rerun `fss features` first")
    sp = {f"sp_{k_}": v for k_, v in (superpixels or {}).items()}
    cfg = clustering.PseudoConfig(k=k, seed=seed, sample_size=sample_size, iters=iters,
                                  fit_splits=tuple(fit_splits or defaults.PSEUDO_FIT_SPLITS), **sp)
    key = clustering.pseudo_key(features_key, cfg)
    fit = key not in store.list_derived(store_url, name, version, kind=clustering.KIND)
    # Derived arrays of one dataset version share its shards.
    n_shards = store.open_derived(store_url, name, features_key, version).n_shards
    done = set() if fit else store.done_shards(store_url, name, version, derived=key)
    todo = [s for s in range(n_shards) if s not in done]
    timings: dict[str, float] = {}
    kmeans: dict[str, Any] = {"skipped": True}
    # Dask work: k-means, the shards still to assign, the report. With none of it left (a rerun
    # without a report) no cluster starts.
    with (dask_client(workers, dask_address) if fit or todo or report
          else contextlib.nullcontext()) as client:
        if fit:
            t = time.perf_counter()
            result = kmeans_task.submit(client, store_url, name, version, features_key,
                                        cfg).result()
            clustering.create_pseudo(store_url, name, version, features_key, cfg, result)
            timings["kmeans_s"] = round(time.perf_counter() - t, 2)
            kmeans = {"skipped": False, "iterations": result.iterations,
                      "converged": result.converged, "objective": result.objective[-1]}

        t = time.perf_counter()
        results = fan_out(
            lambda shards: assign_shards_task.submit(client, store_url, name, version, key,
                                                     shards),
            shard_groups(client, todo), total=n_shards, done=len(done),
            artifact_key=f"pseudo-{artifact_slug(name)}",
            description=f"pseudo-mask shards of {name}/{version} ({key})",
            label=f"pseudo {name}", progress=progress, weight=len)
        images = sum(r.images for group in results for r in group)
        final = clustering.finalize_pseudo(store_url, name, version, key)
        if todo:
            timings["assign_s"] = round(time.perf_counter() - t, 2)
        attrs = store.derived_attrs(store_url, name, version, key)
        summary: dict[str, Any] = {
            "name": name, "version": version, "key": key, "features": features_key, "k": k,
            "seed": seed, "kmeans": kmeans, "shards": n_shards, "shards_written": len(todo),
            "shards_skipped": len(done), "images": images, "complete": final["complete"],
            "background_clusters": attrs.get("background", {}).get("clusters", []),
            "report": None, "report_files": [], "mlflow_run_id": None}
        if report and final["complete"]:
            t = time.perf_counter()
            scores = report_task.submit(client, store_url, name, version, key).result()
            if scores is not None:
                out = Path(report_dir) / name / version / key
                files = clustering.write_report(scores, out)
                summary["report"] = clustering.report_metrics(scores)
                summary["report_files"] = [str(f) for f in files]
                if experiment:
                    summary["mlflow_run_id"] = clustering.log_report(
                        scores, files, experiment, {**cfg.params(features_key),
                                                    "dataset": name, "version": version,
                                                    "key": key})
                create_markdown_artifact(key=f"pseudo-{artifact_slug(name)}-report",
                                         markdown=_markdown(summary, scores),
                                         description=f"cluster quality of {key}")
            timings["report_s"] = round(time.perf_counter() - t, 2)
    summary["timings"] = {**timings, "total_s": round(time.perf_counter() - t0, 2)}
    return summary


def _markdown(summary: dict[str, Any], scores: dict[str, Any]) -> str:
    lines = [f"# Pseudo masks `{summary['key']}` of `{summary['name']}`", "",
             "| images | purity | NMI | Hungarian mIoU | mIoU (fg) |",
             "| --- | --- | --- | --- | --- |"]
    for split, s in [("all", scores["all"]), *scores["splits"].items()]:
        lines.append(f"| {split} | {s['purity']:.3f} | {s['nmi']:.3f} | {s['miou']:.3f} | "
                     f"{s['miou_fg']:.3f} |")
    return "\n".join(lines)


def run_pseudo(*, workers: int = defaults.WORKERS, dask_address: str | None = None,
               embedder: dict[str, Any] | None = None, features_key: str | None = None,
               gpu: bool = False, **params: Any) -> dict[str, Any]:
    """Run the pseudo flow (after the features flow when an embedder is given instead of a key).

    Both flows are idempotent: features already in the store are not recomputed.
    """
    if (embedder is None) == (features_key is None):
        raise ValueError("give exactly one of features_key and embedder")
    summary: dict[str, Any] = {}
    if embedder is not None:
        feats = _run_features(workers=workers, dask_address=dask_address, gpu=gpu,
                              store_url=params["store_url"], name=params["name"],
                              embedder=embedder, version=params.get("version"),
                              progress=params.get("progress", True))
        if not feats["complete"]:
            raise store.StoreError(f"features {feats['key']} are incomplete: rerun to resume")
        features_key = feats["key"]
        summary["features_run"] = feats
    return {**pseudo_flow(features_key=features_key, workers=workers, dask_address=dask_address,
                          **params), **summary}
