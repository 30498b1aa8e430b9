"""The pseudo-mask flow: k-means over Dask, one assignment task per shard, a quality report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.fanout import artifact_slug, fan_out
from flows.features import run_features as _run_features
from flows.runtime import task_runner
from tasks import defaults
from tasks.data import store
from tasks.labelfree import clustering


@task(name="kmeans", cache_policy=NO_CACHE, task_run_name="k-means {name}")
def kmeans_task(store_url: str, name: str, version: str, features_key: str,
                config: dict[str, Any]) -> clustering.KMeansResult:
    """Drives k-means from one Dask worker: sampling and Lloyd steps go out as plain Dask tasks
    (a Prefect task per step would cost more than the step itself, docs/architecture.md)."""
    from distributed import worker_client

    cfg = clustering.PseudoConfig.from_params(config)
    # worker_client secedes from the worker's thread pool, so even a single-worker cluster
    # runs the sub-tasks while this one waits for them.
    with worker_client() as client:
        return clustering.fit_kmeans(store_url, name, version, features_key, cfg, client=client)


@task(name="pseudo-assign-shard", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2,
      task_run_name="pseudo masks {name} shard {shard}")
def assign_shard_task(store_url: str, name: str, version: str, key: str,
                      shard: int) -> clustering.ShardReport:
    return clustering.assign_shard(store_url, name, version, key, shard)


@task(name="cluster-report", cache_policy=NO_CACHE, task_run_name="cluster report {name}")
def report_task(store_url: str, name: str, version: str, key: str) -> dict[str, Any] | None:
    try:
        return clustering.cluster_report(store_url, name, version, key)
    except ValueError:  # no labelled pixel at all: nothing to score against
        return None


@flow(name="pseudo", flow_run_name="pseudo masks {name} k={k}")
def pseudo_flow(store_url: str, name: str, features_key: str, version: str | None = None,
                k: int = defaults.PSEUDO_K, seed: int = defaults.SEED,
                sample_size: int = defaults.PSEUDO_SAMPLE_SIZE,
                iters: int = defaults.PSEUDO_ITERS, fit_splits: list[str] | None = None,
                superpixels: dict[str, Any] | None = None, report: bool = True,
                report_dir: str = defaults.REPORT_DIR,
                experiment: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Cluster the pixels of a features array into pseudo masks (a ``pseudo-<hash>`` group).

    ``superpixels`` may set ``scale``, ``sigma`` and ``min_size`` of the Felzenszwalb
    refinement. With ``report`` the masks are scored against the true ones (the only label
    read) and written to ``report_dir``; with ``experiment`` also logged to MLflow.
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
    timings: dict[str, float] = {}
    if key in store.list_derived(store_url, name, version, kind=clustering.KIND):
        kmeans = {"skipped": True}
    else:
        t = time.perf_counter()
        result = kmeans_task.submit(store_url, name, version, features_key,
                                    cfg.params(features_key)).result()
        clustering.create_pseudo(store_url, name, version, features_key, cfg, result)
        timings["kmeans_s"] = round(time.perf_counter() - t, 2)
        kmeans = {"skipped": False, "iterations": result.iterations,
                  "converged": result.converged, "objective": result.objective[-1]}

    t = time.perf_counter()
    n_shards = store.open_derived(store_url, name, key, version).n_shards
    done = store.done_shards(store_url, name, version, derived=key)
    todo = [s for s in range(n_shards) if s not in done]
    reports = fan_out(lambda s: assign_shard_task.submit(store_url, name, version, key, s), todo,
                      total=n_shards, done=len(done),
                      artifact_key=f"pseudo-{artifact_slug(name)}",
                      description=f"pseudo-mask shards of {name}/{version} ({key})",
                      label=f"pseudo {name}", progress=progress)
    images = sum(r.images for r in reports)
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
        scores = report_task.submit(store_url, name, version, key).result()
        if scores is not None:
            out = Path(report_dir) / name / version / key
            files = clustering.write_report(scores, out)
            summary["report"] = clustering.report_metrics(scores)
            summary["report_files"] = [str(f) for f in files]
            if experiment:
                summary["mlflow_run_id"] = clustering.log_report(
                    scores, files, experiment, {**cfg.params(features_key), "dataset": name,
                                                "version": version, "key": key})
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
    runner = task_runner(workers=workers, dask_address=dask_address)
    return {**pseudo_flow.with_options(task_runner=runner)(features_key=features_key, **params),
            **summary}
