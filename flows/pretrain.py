"""The pretrain flow: self-supervised dense pretraining of a backbone on unlabelled images."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.runtime import artifact_key
from tasks import defaults
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
def pretrain_flow(store_url: str, dataset: str, out_dir: str,
                  steps: int = defaults.PRETRAIN_STEPS, batch_size: int = defaults.PRETRAIN_BATCH,
                  lr: float = defaults.PRETRAIN_LR, seed: int = defaults.SEED,
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
