"""`fss data synth`, `fss ingest`, `fss store inspect`: datasets into and out of the store."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from tasks import defaults


def add_cluster_arguments(p: argparse.ArgumentParser,
                          workers: int = defaults.WORKERS) -> None:
    """`--workers N` (a LocalCluster) or `--dask-address ADDR` (an existing scheduler)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--workers", type=int, default=workers, help="LocalCluster worker processes")
    g.add_argument("--dask-address", help="existing Dask scheduler (or env FSS_DASK_ADDRESS)")


def add_parsers(sub: Any) -> None:
    data = sub.add_parser("data", help="datasets").add_subparsers(dest="action", required=True,
                                                                  metavar="ACTION")
    s = data.add_parser("synth", help="write the synthetic benchmark in VOC and COCO formats")
    s.add_argument("--out", default=defaults.SYNTH_OUT, help="output folder")
    s.add_argument("--train", type=int, default=defaults.SYNTH_TRAIN, help="training images")
    s.add_argument("--val", type=int, default=defaults.SYNTH_VAL, help="validation images")
    s.add_argument("--size", type=int, default=defaults.SYNTH_SIZE, help="image side in pixels")
    s.add_argument("--seed", type=int, default=defaults.SEED, help="random seed")
    s.set_defaults(func=cmd_synth)

    i = sub.add_parser("ingest", help="ingest a VOC- or COCO-format dataset, or any dataset a "
                                      "layout file describes, into the store")
    src = i.add_mutually_exclusive_group(required=True)
    src.add_argument("--source", choices=["voc", "coco"], help="a VOC- or COCO-format dataset")
    src.add_argument("--layout", help="a layout file (YAML: root, images, masks, splits, "
                                      "classes, background, ignore, ...)")
    i.add_argument("--root", help="dataset root folder (with --source)")
    i.add_argument("--split", help="comma-separated splits (default: train,val, or the "
                                   "layout's splits)")
    i.add_argument("--store", default=defaults.STORE, help="Zarr store path or fsspec URL")
    i.add_argument("--name", required=True, help="dataset name inside the store")
    i.add_argument("--size", type=int, default=defaults.INGEST_SIZE, help="canonical image side")
    i.add_argument("--resize", choices=defaults.RESIZE_MODES, default=defaults.RESIZE,
                   help="square: stretch to size x size (HSNet); pad: keep the aspect ratio, "
                        "longest side to size, pad the rest (PFENet; padding is ignored)")
    i.add_argument("--shard-size", type=int, default=defaults.SHARD_SIZE,
                   help="images per shard and per task")
    i.add_argument("--classes", help="class list file (one name per line, line 0 background)")
    i.add_argument("--list", help="VOC list file overriding ImageSets/Segmentation/<split>.txt")
    add_cluster_arguments(i)
    i.set_defaults(func=cmd_ingest, runs_flows=True)

    st = sub.add_parser("store", help="the Zarr store").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    ins = st.add_parser("inspect", help="datasets, counts, classes, quarantine and sizes")
    ins.add_argument("store", nargs="?", default=defaults.STORE,
                     help="Zarr store path or fsspec URL")
    ins.add_argument("--json", action="store_true", help="print the inspection as JSON")
    ins.set_defaults(func=cmd_inspect)


def _splits(text: str) -> list[str]:
    return [s for s in (p.strip() for p in text.split(",")) if s]


def cmd_synth(args: argparse.Namespace) -> int:
    from tasks.data.synth import synthesize

    t0 = time.perf_counter()
    summary = synthesize(args.out, n_train=args.train, n_val=args.val, size=args.size,
                         seed=args.seed, progress=True)
    counts = summary["counts"]
    print(f"synthetic benchmark in {args.out} ({time.perf_counter() - t0:.1f} s): "
          f"images {counts['images']}, instances {counts['instances']}, "
          f"images with 2+ classes {counts['images_with_2plus_classes']}")
    print(f"  VOC layout:  {Path(args.out) / 'voc'}\n  COCO layout: {Path(args.out) / 'coco'}")
    return 0


def _ingest_source(args: argparse.Namespace) -> tuple[str, str, list[str]]:
    """(source, root, splits) of `fss ingest`; a bad layout file fails here, at once."""
    if not args.layout:
        if not args.root:
            raise ValueError("ingest --source needs --root (the dataset folder)")
        return args.source, str(Path(args.root).resolve()), _splits(args.split or "train,val")
    from tasks.data.layout import LayoutError, load_layout

    if args.root or args.classes or args.list:
        raise ValueError("a layout file names the root, the files and the classes: drop "
                         "--root, --classes and --list")
    path = str(Path(args.layout).resolve())
    layout, _ = load_layout(path)
    splits = _splits(args.split) if args.split else list(layout.splits)
    unknown = [s for s in splits if s not in layout.splits]
    if unknown:
        raise LayoutError(f"{path}: splits: --split {unknown[0]!r} is not one of the "
                          f"layout's splits {layout.splits}")
    return "layout", path, splits


def cmd_ingest(args: argparse.Namespace) -> int:
    from flows.ingest import run_ingest
    from flows.runtime import prefect_api

    t0 = time.perf_counter()
    source, root, splits = _ingest_source(args)
    with prefect_api():
        summary = run_ingest(
            workers=args.workers, dask_address=args.dask_address, source=source, root=root,
            store_url=args.store, name=args.name, splits=splits, size=args.size,
            shard_size=args.shard_size, classes_file=args.classes, list_file=args.list,
            resize=args.resize)
    print_ingest_summary(summary, time.perf_counter() - t0)
    return 0 if summary["complete"] else 1


def print_ingest_summary(summary: dict[str, Any], seconds: float) -> None:
    s = summary
    print(f"ingested {s['name']} ({s['version']}) in {seconds:.1f} s: "
          f"{s['shards_written']} shards written, {s['shards_skipped']} already complete")
    bare = f" ({s['unlabelled']} without a mask)" if s.get("unlabelled") else ""
    print(f"  ingested {s['ingested']}{bare} + quarantined {s['quarantined']} = "
          f"{s['ingested'] + s['quarantined']} of {s['listed']} listed"
          + ("" if s["complete"] else f" ({s['pending']} pending: rerun to resume)"))
    if s["quarantined"]:
        print("  see the quarantine with: fss store inspect STORE")


def cmd_inspect(args: argparse.Namespace) -> int:
    from tasks.data.store import inspect_store

    info = inspect_store(args.store)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    if not info["datasets"]:
        print(f"{args.store}: no datasets")
    for name, versions in info["datasets"].items():
        for version, v in versions.items():
            mark = " (latest)" if v["latest"] else ""
            mib = sum(v["bytes"].values()) / 2**20
            pad = " (aspect kept, padded)" if v.get("resize") == "pad" else ""
            print(f"{name} {version}{mark}: {v['ingested']} ingested + {v['quarantined']} "
                  f"quarantined of {v['listed']} listed, {v['pending']} pending; "
                  f"{v['size']} px{pad}; {mib:.1f} MiB")
            print("  splits: " + ", ".join(f"{k} {n}" for k, n in v["splits"].items()))
            print(f"  classes ({len(v['classes']) - 1}): " + ", ".join(v["classes"][1:]))
            print("  bytes: " + ", ".join(f"{k} {b / 2**20:.1f} MiB"
                                          for k, b in v["bytes"].items()))
            for q in v["quarantine"]:
                print(f"  quarantined {q['path']}: {q['reason']}")
    return 0
