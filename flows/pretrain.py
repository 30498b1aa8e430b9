"""The pretrain flow: self-supervised dense pretraining of a backbone on unlabelled images."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.runtime import artifact_key
from tasks.labelfree.pretrain import SUMMARY_FILE, pretrain


# One coarse task: the whole training run. It picks the GPU when the worker has one; the output
# folder records completion, so Prefect's input caching is not needed.
@task(name="pretrain-dense-ssl", cache_policy=NO_CACHE,
      task_run_name="pretrain {dataset} ({options[steps]} steps)")
def pretrain_task(store_url: str, dataset: str, out_dir: str, options: dict[str, Any],
                  progress: bool = True) -> dict[str, Any]:
    t0 = time.perf_counter()
    path = pretrain(store_url, dataset, out_dir, progress=progress, **options)
    summary = json.loads((path.parent / SUMMARY_FILE).read_text())
    return {"backbone": str(path), "loss_start": summary["loss_start"],
            "loss_end": summary["loss_end"], "steps": summary["params"]["steps"],
            "train_seconds": summary["seconds"], "steps_per_s": summary["steps_per_s"],
            "device": summary["device"], "embedder": summary["embedder"],
            "seconds": time.perf_counter() - t0}


@flow(name="pretrain", flow_run_name="pretrain {dataset}")
def pretrain_flow(store_url: str, dataset: str, out_dir: str, steps: int = 300,
                  batch_size: int = 16, lr: float = 2e-3, seed: int = 0,
                  image_size: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Pretrain a backbone on the training images of ``dataset`` (no labels are read).

    A finished run with the same parameters is read back, not retrained (``seconds`` then
    covers only the check).
    """
    options = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
               "image_size": image_size}
    result = pretrain_task(store_url, dataset, str(Path(out_dir).resolve()), options,
                           progress=progress)
    create_markdown_artifact(
        key=artifact_key("pretrain", dataset),
        markdown=(f"# dense SSL pretraining of {dataset}\n\n"
                  f"backbone `{result['backbone']}`; loss {result['loss_start']:.3f} → "
                  f"{result['loss_end']:.3f} over {result['steps']} steps"),
        description="pretrained backbone")
    return result


def cmd_pretrain(args: argparse.Namespace) -> int:
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


def add_pretrain_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``fss pretrain``: self-supervised dense pretraining of the default backbone."""
    p = subparsers.add_parser("pretrain", help="self-supervised dense pretraining of a backbone "
                                               "on a dataset's unlabelled training images")
    p.add_argument("--store", default="data/store.zarr", help="Zarr store path or fsspec URL")
    p.add_argument("--dataset", required=True, help="dataset name inside the store")
    p.add_argument("--out", required=True, help="output folder (backbone.pth, pretrain.json)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, help="side of each augmented view in pixels "
                                                  "(default: 0.45 of the dataset's side)")
    p.set_defaults(func=cmd_pretrain)
