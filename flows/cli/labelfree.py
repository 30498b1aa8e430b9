"""`fss pretrain`, `fss features`, `fss pseudo`: the label-free stages."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from flows.cli.data import add_cluster_arguments
from tasks import defaults


def add_parsers(sub: Any) -> None:
    add_pretrain_parser(sub)
    add_features_parser(sub)
    add_pseudo_parser(sub)


# --- fss pretrain ----------------------------------------------------------------------------

def add_pretrain_parser(subparsers: Any) -> argparse.ArgumentParser:
    """`fss pretrain`: self-supervised dense pretraining of the default backbone."""
    p = subparsers.add_parser("pretrain", help="self-supervised dense pretraining of a backbone "
                                               "on a dataset's unlabelled training images")
    p.add_argument("--store", default=defaults.STORE, help="Zarr store path or fsspec URL")
    p.add_argument("--dataset", required=True, help="dataset name inside the store")
    p.add_argument("--out", required=True, help="output folder (backbone.pth, pretrain.json)")
    p.add_argument("--steps", type=int, default=defaults.PRETRAIN_STEPS, help="training steps")
    p.add_argument("--batch-size", type=int, default=defaults.PRETRAIN_BATCH,
                   help="images per step")
    p.add_argument("--lr", type=float, default=defaults.PRETRAIN_LR, help="learning rate")
    p.add_argument("--seed", type=int, default=defaults.SEED, help="random seed")
    p.add_argument("--image-size", type=int, help="side of each augmented view in pixels "
                                                  "(default: 0.45 of the dataset's side)")
    p.set_defaults(func=cmd_pretrain, runs_flows=True)
    return p


def cmd_pretrain(args: argparse.Namespace) -> int:
    from flows.pretrain import pretrain_flow
    from flows.runtime import prefect_api

    with prefect_api():
        r = pretrain_flow(args.store, args.dataset, args.out, steps=args.steps,
                          batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                          image_size=args.image_size)
    speed = f", {r['steps_per_s']:.2f} steps/s" if r["steps_per_s"] else ""
    print(f"pretrained backbone: {r['backbone']} ({r['device']})")
    print(f"  loss {r['loss_start']:.3f} -> {r['loss_end']:.3f} over {r['steps']} steps; "
          f"training {r['train_seconds']:.1f} s{speed}; this call {r['seconds']:.1f} s")
    print(f"  use it as an embedder: {json.dumps(r['embedder'])}")
    return 0


# --- fss features ----------------------------------------------------------------------------

def parse_embedder(text: str, backbone: str = defaults.EMBEDDER_BACKBONE,
                   layer: str = defaults.EMBEDDER_LAYER) -> dict[str, Any]:
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
    p.add_argument("--backbone", default=defaults.EMBEDDER_BACKBONE,
                   help="backbone of a checkpoint path")
    p.add_argument("--layer", default=defaults.EMBEDDER_LAYER, help="layer of a checkpoint path")


def add_features_parser(subparsers: Any) -> argparse.ArgumentParser:
    """`fss features`: embed a dataset's images with a frozen backbone."""
    p = subparsers.add_parser("features", help="embed a dataset's images (frozen backbone)")
    p.add_argument("--store", default=defaults.STORE, help="Zarr store path or fsspec URL")
    p.add_argument("--dataset", required=True, help="dataset name inside the store")
    p.add_argument("--version", help="dataset version (default: latest)")
    add_embedder_arguments(p)
    p.add_argument("--batch-size", type=int, default=defaults.FEATURES_BATCH,
                   help="images per forward pass")
    p.add_argument("--gpu", action="store_true",
                   help="each run of shards holds one Dask GPU resource")
    add_cluster_arguments(p)
    p.set_defaults(func=cmd_features, runs_flows=True)
    return p


def cmd_features(args: argparse.Namespace) -> int:
    from flows.features import run_features
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


# --- fss pseudo ------------------------------------------------------------------------------

def add_pseudo_parser(subparsers: Any) -> argparse.ArgumentParser:
    """`fss pseudo`: pseudo masks by k-means of pixel features, refined in superpixels."""
    p = subparsers.add_parser("pseudo", help="pseudo masks: k-means of pixel features")
    p.add_argument("--store", default=defaults.STORE, help="Zarr store path or fsspec URL")
    p.add_argument("--dataset", required=True, help="dataset name inside the store")
    p.add_argument("--version", help="dataset version (default: latest)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--features", help="key of a features array (fss features prints it)")
    add_embedder_arguments(p, group=src)
    p.add_argument("--gpu", action="store_true", help="features tasks request a Dask GPU")
    p.add_argument("--k", type=int, default=defaults.PSEUDO_K,
                   help="clusters (30 PASCAL, 50 COCO)")
    p.add_argument("--seed", type=int, default=defaults.SEED, help="random seed")
    p.add_argument("--sample-size", type=int, default=defaults.PSEUDO_SAMPLE_SIZE,
                   help="feature pixels sampled for k-means")
    p.add_argument("--iters", type=int, default=defaults.PSEUDO_ITERS,
                   help="maximum Lloyd iterations")
    p.add_argument("--fit-splits", default=",".join(defaults.PSEUDO_FIT_SPLITS),
                   help="splits whose pixels are clustered (comma-separated)")
    p.add_argument("--sp-scale", type=float, default=defaults.SP_SCALE,
                   help="Felzenszwalb scale")
    p.add_argument("--sp-sigma", type=float, default=defaults.SP_SIGMA,
                   help="Felzenszwalb sigma")
    p.add_argument("--sp-min-size", type=int, default=defaults.SP_MIN_SIZE,
                   help="Felzenszwalb min_size")
    p.add_argument("--no-report", action="store_true", help="skip the cluster quality report")
    p.add_argument("--report-dir", default=defaults.REPORT_DIR,
                   help="folder for the cluster quality report")
    p.add_argument("--experiment", help="also log the report to this MLflow experiment")
    add_cluster_arguments(p)
    p.set_defaults(func=cmd_pseudo, runs_flows=True)
    return p


def cmd_pseudo(args: argparse.Namespace) -> int:
    from flows.pseudo import run_pseudo
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
