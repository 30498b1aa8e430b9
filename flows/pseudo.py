"""The pseudo-mask flow: k-means over Dask, one assignment task per shard, a quality report."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.fanout import artifact_slug, fan_out
from flows.features import add_cluster_arguments, add_embedder_arguments, parse_embedder
from flows.features import run_features as _run_features
from flows.runtime import task_runner
from tasks.data import store
from tasks.labelfree import clustering

DEFAULT_REPORT_DIR = "reports"


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
                k: int = 30, seed: int = 0, sample_size: int = 100_000, iters: int = 50,
                fit_splits: list[str] | None = None, superpixels: dict[str, Any] | None = None,
                report: bool = True, report_dir: str = DEFAULT_REPORT_DIR,
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
                                  fit_splits=tuple(fit_splits or ["train"]), **sp)
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


def run_pseudo(*, workers: int = 2, dask_address: str | None = None,
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


def add_pseudo_parser(subparsers: Any) -> argparse.ArgumentParser:
    """`fss pseudo`: pseudo masks by k-means of pixel features, refined in superpixels."""
    p = subparsers.add_parser("pseudo", help="pseudo masks: k-means of pixel features")
    p.add_argument("--store", default="data/store.zarr", help="Zarr store path or fsspec URL")
    p.add_argument("--dataset", required=True, help="dataset name inside the store")
    p.add_argument("--version", help="dataset version (default: latest)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--features", help="key of a features array (fss features prints it)")
    add_embedder_arguments(p, group=src)
    p.add_argument("--gpu", action="store_true", help="features tasks request a Dask GPU")
    p.add_argument("--k", type=int, default=30, help="clusters (30 PASCAL, 50 COCO)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-size", type=int, default=100_000,
                   help="feature pixels sampled for k-means (default: %(default)s)")
    p.add_argument("--iters", type=int, default=50, help="maximum Lloyd iterations")
    p.add_argument("--fit-splits", default="train", help="splits whose pixels are clustered")
    p.add_argument("--sp-scale", type=float, default=100.0, help="Felzenszwalb scale")
    p.add_argument("--sp-sigma", type=float, default=0.8, help="Felzenszwalb sigma")
    p.add_argument("--sp-min-size", type=int, default=50, help="Felzenszwalb min_size")
    p.add_argument("--no-report", action="store_true", help="skip the cluster quality report")
    p.add_argument("--report-dir", default=DEFAULT_REPORT_DIR)
    p.add_argument("--experiment", help="also log the report to this MLflow experiment")
    add_cluster_arguments(p)
    p.set_defaults(func=cmd_pseudo)
    return p


def cmd_pseudo(args: argparse.Namespace) -> int:
    from flows.runtime import prefect_api

    embedder = parse_embedder(args.embedder, args.backbone, args.layer) if args.embedder else None
    with prefect_api():
        summary = run_pseudo(
            workers=args.workers, dask_address=args.dask_address, embedder=embedder,
            features_key=args.features, gpu=args.gpu, store_url=args.store, name=args.dataset,
            version=args.version, k=args.k, seed=args.seed, sample_size=args.sample_size,
            iters=args.iters, fit_splits=[s for s in args.fit_splits.split(",") if s],
            superpixels={"scale": args.sp_scale, "sigma": args.sp_sigma,
                         "min_size": args.sp_min_size},
            report=not args.no_report, report_dir=args.report_dir, experiment=args.experiment)
    if "features_run" in summary:
        from flows.features import print_features_summary

        print_features_summary(summary["features_run"])
    print_pseudo_summary(summary)
    return 0 if summary["complete"] else 1


def print_pseudo_summary(s: dict[str, Any]) -> None:
    km = s["kmeans"]
    how = ("k-means already done" if km["skipped"] else
           f"k-means {km['iterations']} iterations"
           f" ({'converged' if km['converged'] else 'not converged'})")
    print(f"pseudo masks {s['key']} of {s['name']} ({s['version']}) from {s['features']}, "
          f"K={s['k']}, seed {s['seed']}: {how}; {s['shards_written']} shards assigned, "
          f"{s['shards_skipped']} already complete")
    print("  seconds: " + ", ".join(f"{k[:-2]} {v:.1f}" for k, v in s["timings"].items()))
    print(f"  background-like clusters: {s['background_clusters'] or 'none'}")
    if s["report"]:
        r = s["report"]
        print(f"  cluster quality (all images): purity {r['purity']:.3f}  NMI {r['nmi']:.3f}  "
              f"Hungarian mIoU {r['miou']:.3f} (foreground {r['miou_fg']:.3f})")
        print(f"  report: {', '.join(s['report_files'])}")
    if s["mlflow_run_id"]:
        print(f"  MLflow run {s['mlflow_run_id']}")
    if not s["complete"]:
        print("  incomplete: rerun to resume")
