"""Defaults that the tasks, the flows and `fss` share, each written once.

The task functions take these in their signatures (or dataclass fields), the flows and the
deployments pass them on, and the CLI shows them in its help. This module imports only the
standard library, because `fss --help` reads it without importing torch, Prefect, Dask or Zarr
(the task modules that use these values import all of those).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

STORE = "data/store.zarr"  # Zarr store path or fsspec URL
REPORT_DIR = "reports"  # summary tables, plots and cluster reports
SEED = 0

# Dask LocalCluster worker processes: the data stages fan out runs of shards; an ablation
# runs one training per worker, so one keeps a small machine usable.
WORKERS = 2
ABLATION_WORKERS = 1

# `fss data synth`: the synthetic benchmark
SYNTH_TRAIN = 600
SYNTH_VAL = 200
SYNTH_SIZE = 144  # image side in pixels
SYNTH_OUT = "data/synth"

# `fss ingest`: the canonical image side, images per shard (and per Dask task), resize modes
INGEST_SIZE = 144
SHARD_SIZE = 64
RESIZE_MODES = ("square", "pad")
RESIZE = "square"

# The frozen embedder of `fss features` / `fss pseudo` when a checkpoint path is given
EMBEDDER_BACKBONE = "small_resnet"
EMBEDDER_LAYER = "layer4"
FEATURES_BATCH = 16  # images per forward pass


def default_embedder(checkpoint: str | None = None) -> dict[str, Any]:
    """The embedder spec of the default backbone (randomly initialised without a checkpoint)."""
    spec: dict[str, Any] = {"kind": "backbone", "backbone": EMBEDDER_BACKBONE,
                            "layer": EMBEDDER_LAYER}
    return spec if checkpoint is None else {**spec, "checkpoint": checkpoint}


# `fss pretrain`: self-supervised dense pretraining
PRETRAIN_STEPS = 300
PRETRAIN_BATCH = 16
PRETRAIN_LR = 2e-3

# `fss pseudo`: k-means of pixel features, refined in Felzenszwalb superpixels
PSEUDO_K = 30  # 30 for PASCAL, 50 for COCO
PSEUDO_SAMPLE_SIZE = 100_000  # feature pixels drawn over the fitting images
PSEUDO_ITERS = 50  # maximum Lloyd iterations
PSEUDO_FIT_SPLITS = ("train",)
SP_SCALE = 100.0
SP_SIGMA = 0.8
SP_MIN_SIZE = 50

# Local services on 127.0.0.1
PREFECT_PORT = 4200  # `fss server start`
MLFLOW_UI_PORT = 5000  # `fss ui`

# Prefect deployments: prefect.yaml at the project root, applied by `fss deploy`. Both pools run
# each flow run as a subprocess on the worker's host; GPU hosts serve fss-gpu.
PROJECT_DIR = Path(__file__).resolve().parents[1]
PREFECT_FILE = PROJECT_DIR / "prefect.yaml"
WORK_POOLS: dict[str, str] = {
    "fss-cpu": "data stages (ingest, features, pseudo masks) on CPU hosts",
    "fss-gpu": "training, pretraining and ablations on GPU hosts (one worker per GPU)",
}
