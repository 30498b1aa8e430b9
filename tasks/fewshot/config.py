"""Experiment configs: YAML files under `configs/`, overridden with `--set key=value`."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

MODELS = ("metasegnet", "panet", "umt")
OPTIMIZERS = ("adamw", "sgd")


@dataclass
class TrainConfig:
    """One training run (a point of an ablation): model, data, episodes, optimisation."""

    model: str = "metasegnet"
    store: str = "data/store.zarr"
    dataset: str = "synth"
    fold: int = 0
    n_folds: int = 4
    fold_variant: str = "auto"
    # Names or ids of the classes to test on; replaces the fold (the rest are base classes).
    novel_classes: list[str | int] | None = None
    test_split: str = "val"  # the split the novel classes are tested on
    ways: int = 1
    shots: int = 1
    budget: float = 1.0  # fraction of training images whose masks may be used
    # Which images are labelled: one draw of nested subsets (5 % ⊂ 10 % ⊂ ...) per budget
    # seed; None follows `seed`, so every seed of a study also resamples the labelled subset.
    budget_seed: int | None = None
    # Share of a point's labelled images held out from training to select its checkpoint
    # (never the test split); too few to form episodes, and the last checkpoint is kept.
    val_fraction: float = 0.2
    min_pixels: int = 2 * 32 * 32  # region floor at original resolution
    # Pseudo meta-tasks (fss pseudo): the pseudo-mask group's key, or "latest" for the only one.
    pseudo: str | None = None
    budget_mode: str = "finetune"  # with pseudo tasks and labels: "finetune" or "mixed"
    # finetune: pseudo steps before the `steps` labelled ones; at budget 0 they are all there is
    pseudo_steps: int = 0
    mixed_pseudo_fraction: float = 0.5  # mixed: share of the `steps` that are pseudo episodes
    pseudo_top_k: int = 10  # supports come from the k most similar images of the cluster
    steps: int = 1000
    batch_size: int = 8
    optimizer: str = "adamw"  # "adamw", or "sgd" with `momentum` (PANet's reference)
    lr: float = 1e-3
    momentum: float = 0.9  # sgd only
    weight_decay: float = 1e-4
    seed: int = 0
    backbone: str = "small_resnet"
    backbone_checkpoint: str | None = None
    model_args: dict[str, Any] = field(default_factory=dict)
    ce_weight: float = 0.0  # UMT: Dice (the paper's loss) + ce_weight x cross-entropy
    cache_features: bool = False  # UMT, frozen backbone: compute backbone features once
    checkpoint_every: int = 200
    val_every: int = 200
    val_episodes: int = 100
    test_episodes: int = 1000
    test_shots: list[int] = field(default_factory=lambda: [1, 5])
    test_ways: list[int] | None = None  # default: the training ways
    test_seed: int = 321
    scoring: str = "pfenet"  # "pfenet": original-size labels; "hsnet": resized labels
    device: str = "auto"
    threads: int = 0  # torch threads on CPU; 0 = torch's default
    # Processes that read the next steps' episodes while a step trains (threads inside a Dask
    # worker); 0 reads each batch when its step starts; null: by device (`loader.workers_for`:
    # 0 on CPU, 4 on CUDA). Same batches either way, so not part of the run name's digest.
    loader_workers: int | None = None
    # MLflow system metrics (system/cpu_utilization_percentage, memory, disk, network, GPU with
    # nvidia-ml-py) sampled while the point trains and evaluates, every
    # MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (10); not part of the run name's digest.
    system_metrics: bool = False
    experiment: str = "fss"
    out_dir: str = "runs"

    def __post_init__(self) -> None:
        if self.budget_seed is None:
            self.budget_seed = self.seed
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, not {self.model!r}")
        if not 0.0 <= self.budget <= 1.0:
            raise ValueError(f"budget is a fraction in [0, 1], got {self.budget}")
        if self.test_split == "train":
            raise ValueError("test_split cannot be 'train': the labelled images come from it")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction is a share in [0, 1), got {self.val_fraction}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, not {self.optimizer!r}")
        if self.scoring not in ("pfenet", "hsnet"):
            raise ValueError(f"scoring must be 'pfenet' or 'hsnet', not {self.scoring!r}")
        if self.model == "umt" and self.ways != 1:
            raise ValueError("the UMT Transformer is a 1-way model (ways: 1)")
        if self.budget_mode not in ("finetune", "mixed"):
            raise ValueError(f"budget_mode is 'finetune' or 'mixed', not {self.budget_mode!r}")
        if self.pseudo and self.ways != 1:
            raise ValueError("pseudo meta-tasks are 1-way episodes (ways: 1)")
        if self.pseudo and self.budget_mode == "finetune" and self.pseudo_steps < 1:
            raise ValueError("budget_mode finetune needs pseudo_steps >= 1")
        if self.loader_workers is not None and self.loader_workers < 0:
            raise ValueError(f"loader_workers must be >= 0, got {self.loader_workers}")
        for name in ("steps", "batch_size", "ways", "shots", "checkpoint_every", "val_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def config_digest(cfg: TrainConfig, data_version: str) -> str:
    """8 hex digits of everything that defines a trained model: its config (less where it is
    written and tracked, and whether system metrics are) and the data version."""
    config = cfg.to_dict() | {"out_dir": None, "experiment": None}
    # What is tracked and how batches are read, not what is trained: digests stay as they were.
    del config["system_metrics"], config["loader_workers"]
    blob = json.dumps({"config": config, "data": data_version}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def parse_value(text: str) -> Any:
    """`--set` values are YAML scalars: 0.2, true, null, [1, 5] and plain strings all work."""
    return yaml.safe_load(text)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key=value` (dotted keys reach into mappings such as `model_args.dim=64`)."""
    out = dict(data)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {item!r}")
        node = out
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node[p] = dict(node.get(p) or {})
            node = node[p]
        node[leaf] = parse_value(value)
    return out


def from_dict(data: dict[str, Any]) -> TrainConfig:
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
    return TrainConfig(**data)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a study's YAML (its `train:` section if it has one) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"config file {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a config is a YAML mapping")
        data = dict(data.get("train", data))
    return from_dict(apply_overrides(data, overrides or []))
