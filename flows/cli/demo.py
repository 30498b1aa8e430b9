"""`fss demo`: the whole pipeline on the embedded default, in one command.

synthetic benchmark → ingest (Dask → Zarr) → self-supervised pretraining → features → k-means
pseudo masks + cluster report → label-budget ablation (UMT at 0/5/10/20/100 % over three
seeds, PANet, MetaSegNet 2-way) → summary table with intervals, the budget estimate, plot and
the command that opens MLflow on it.
Everything goes under `--workdir`; every stage is idempotent, so a rerun only reprints.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path
from typing import Any

from flows.cli.data import print_ingest_summary
from flows.cli.study import ui_hint
from tasks import defaults

STUDY = defaults.PROJECT_DIR / "configs" / "ablation-synthetic.yaml"
# --quick: a smoke run of the same stages at toy sizes.
QUICK = {"n_train": 96, "n_val": 48, "pretrain_steps": 20, "k": 12,
         "train": ["steps=6", "val_every=6", "checkpoint_every=6", "val_episodes=8",
                   "test_episodes=40", "batch_size=4"], "pseudo_steps": 6}
FULL = {"n_train": defaults.SYNTH_TRAIN, "n_val": defaults.SYNTH_VAL, "pretrain_steps": 200,
        "k": defaults.PSEUDO_K, "train": [], "pseudo_steps": None}


def add_demo_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("demo", help="the end-to-end demo on the synthetic benchmark")
    p.add_argument("--workdir", default="demo", help="where data, store and runs go")
    p.add_argument("--quick", action="store_true", help="a smoke run of a minute or two")
    p.add_argument("--workers", type=int, default=defaults.WORKERS,
                   help="LocalCluster worker processes")
    p.set_defaults(func=cmd_demo, runs_flows=True)
    return p


def cmd_demo(args: argparse.Namespace) -> int:
    return run_demo(workdir=Path(args.workdir), quick=args.quick, workers=args.workers)


def _stage(n: int, text: str) -> float:
    print(f"\n[{n}/6] {text}", flush=True)
    return time.perf_counter()


def _done(t0: float, text: str) -> None:
    print(f"      {text} ({time.perf_counter() - t0:.0f} s)", flush=True)


def demo_study(store_url: str, backbone: str, out_dir: str, quick: bool) -> tuple[dict, list]:
    """The study of configs/ablation-synthetic.yaml, pointed at the demo's files.

    The files go into `base`, so a point that sets its own (MetaSegNet from scratch:
    `backbone_checkpoint: null`) keeps it; the --quick sizes are overrides of every point.
    """
    import yaml

    study = copy.deepcopy(yaml.safe_load(STUDY.read_text()))
    sizes = QUICK if quick else FULL
    if sizes["pseudo_steps"]:
        study["models"]["umt"]["pseudo_steps"] = sizes["pseudo_steps"]
    study["base"] |= {"store": store_url, "backbone_checkpoint": backbone, "out_dir": out_dir}
    return study, list(sizes["train"])


def run_demo(workdir: Path, *, quick: bool = False, workers: int = defaults.WORKERS) -> int:
    import torch

    from flows.ablate import run_ablation
    from flows.ingest import run_ingest
    from flows.pretrain import pretrain_flow
    from flows.pseudo import run_pseudo
    from flows.runtime import prefect_api
    from tasks.data.synth import synthesize

    sizes = QUICK if quick else FULL
    # One torch thread in this process, like the Dask workers: on a small shared machine two
    # threads spin-wait for each other (pretraining measured ~6x slower with 2 threads).
    torch.set_num_threads(1)
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'mlflow.db'}")
    data, store_url = workdir / "synth", str(workdir / "store.zarr")
    start = time.perf_counter()
    with prefect_api() as api:
        print(f"Prefect API {api}; MLflow {os.environ['MLFLOW_TRACKING_URI']}; "
              f"{workers} Dask workers", flush=True)
        t = _stage(1, f"synthetic benchmark: {sizes['n_train']} train + {sizes['n_val']} val "
                      f"images in VOC and COCO formats -> {data}")
        synthesize(data, n_train=sizes["n_train"], n_val=sizes["n_val"], seed=0, progress=True)
        _done(t, "written")

        t = _stage(2, f"ingest the VOC layout over Dask into Zarr -> {store_url}")
        ingest = run_ingest(workers=workers, source="voc", root=str(data / "voc"),
                            store_url=store_url, name="synth", splits=["train", "val"])
        print_ingest_summary(ingest, time.perf_counter() - t)

        t = _stage(3, "self-supervised dense pretraining on the unlabelled training images")
        pre = pretrain_flow(store_url, "synth", str(workdir / "pretrain"),
                            steps=sizes["pretrain_steps"])
        _done(t, f"backbone {pre['backbone']}, loss {pre['loss_start']:.3f} -> "
                 f"{pre['loss_end']:.3f}")

        t = _stage(4, f"features + k-means (K={sizes['k']}) pseudo masks + cluster report")
        embedder = defaults.default_embedder(checkpoint=pre["backbone"])
        pseudo = run_pseudo(workers=workers, embedder=embedder, store_url=store_url,
                            name="synth", k=sizes["k"], report_dir=str(workdir / "reports"),
                            experiment="synthetic-clusters")
        _done(t, f"pseudo masks {pseudo['key']}; " + _cluster_line(pseudo.get("report")))

        t = _stage(5, "label-budget ablation: UMT at 0/5/10/20/100 % over 3 seeds, PANet, "
                      "MetaSegNet 2-way (one Dask task per point)")
        study, overrides = demo_study(store_url, pre["backbone"], str(workdir / "runs"), quick)
        result = run_ablation(study, workers=workers, overrides=overrides,
                              out_dir=str(workdir / "reports"))
        _done(t, f"{result['trained']} points trained, {result['skipped']} already done, "
                 f"{len(result['failed'])} failed")
        for message in result["failed"]:
            print(f"      failed: {message}")

        _stage(6, "summary (test mIoU on fold 0's novel classes, 1-way 1-shot unless noted)")
    print(result["report"])
    if quick:
        print("\n--quick: toy sizes and a few steps per point; the numbers only show that every "
              "stage ran (UMT needs a few hundred pseudo steps to leave its all-background "
              "start).")
    print(f"\nplot and tables: {Path(result['files']['plot']).parent}")
    print(f"demo finished in {(time.perf_counter() - start) / 60:.1f} min")
    print(ui_hint(result["experiment"]))
    return 1 if result["failed"] or not ingest["complete"] else 0


def _cluster_line(report: dict[str, Any] | None) -> str:
    if not report:
        return "no cluster report"
    return (f"clusters vs true classes: purity {report['purity']:.3f}, NMI {report['nmi']:.3f}, "
            f"Hungarian mIoU {report['miou']:.3f}")
