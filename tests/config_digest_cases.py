"""The configs whose digests (run folders, MLflow run names) must not change: every file under
configs/ and docs/byod/ (each study's every point and each UMT point's pseudo phase), the
demo's study (full and --quick) and `--set` overrides of each kind of key.

tests/config_digests.json holds their digests as the dataclass TrainConfig of commit 8477e39
computed them, regenerated from a checkout of that commit (the functions used here exist in
both):

    PYTHONPATH=<checkout> python tests/config_digest_cases.py > tests/config_digests.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA_VERSION = "synth/v1"
DEMO_FILES = ("/tmp/demo/store.zarr", "/tmp/demo/pretrain/backbone.pth", "/tmp/demo/runs")

TRAIN_CASES: list[tuple[str, list[str]]] = [
    ("configs/synthetic.yaml", []),
    ("configs/pascal5i.yaml", []),
    ("configs/coco20i.yaml", []),
    ("configs/synthetic.yaml", ["model=panet"]),
    # Integers where floats are the default: they stay integers, as they were.
    ("configs/synthetic.yaml", ["budget=1", "lr=1", "ce_weight=1", "seed=3"]),
    ("configs/synthetic.yaml", ["budget=0.2", "test_shots=[1, 5]", "model_args.embed_dim=16"]),
    ("configs/synthetic.yaml", ["optimizer=sgd", "lr=0.01", "weight_decay=0.0005", "momentum=0"]),
    ("configs/coco20i.yaml", ["fold_variant=consecutive", "fold=3", "test_ways=[1,2]"]),
    ("configs/synthetic.yaml", ["novel_classes=[car, 3]", "test_split=test", "budget_seed=7"]),
    ("configs/synthetic.yaml", ["model=umt", "pseudo=latest", "pseudo_steps=400", "budget=0",
                                "cache_features=true", "device=cpu", "threads=1"]),
    ("configs/synthetic.yaml", ["model=umt", "pseudo=abc123", "budget_mode=mixed",
                                "mixed_pseudo_fraction=0.25", "budget=0.05"]),
    ("configs/synthetic.yaml", ["system_metrics=true", "experiment=x", "out_dir=/tmp/r"]),
]
STUDY_OVERRIDES: list[tuple[str, list[str]]] = [
    ("configs/study-umt-dice-only.yaml", ["ce_weight=1"]),  # README, "Dice alone"
    ("configs/study-panet-optimiser.yaml", ["optimizer=sgd", "lr=0.01", "weight_decay=0.0005"]),
    ("configs/ablation-synthetic.yaml", ["steps=50"]),
]


def study_files() -> list[str]:
    files = sorted(ROOT.glob("configs/*.yaml")) + sorted(ROOT.glob("docs/byod/*.yaml"))
    return [str(p.relative_to(ROOT)) for p in files
            if "study" in (yaml.safe_load(p.read_text()) or {})]


def digests() -> list[dict[str, Any]]:
    """Each case's recipe and digest, computed by the code on the path."""
    from flows.cli.demo import demo_study
    from tasks.fewshot.config import TrainConfig, config_digest, load_config
    from tasks.fewshot.training import pseudo_phase_config
    from tasks.study.ablation import study_from_dict

    out: list[dict[str, Any]] = []

    def add(recipe: dict[str, Any], cfg: Any) -> None:
        out.append({"recipe": recipe, "digest": config_digest(cfg, DATA_VERSION)})
        if cfg.pseudo:  # the pseudo phase's folder is keyed on its own digest
            phase = pseudo_phase_config(cfg)
            out.append({"recipe": recipe | {"pseudo_phase": True},
                        "digest": config_digest(phase, DATA_VERSION)})

    add({"kind": "default"}, TrainConfig())
    for path, sets in TRAIN_CASES:
        add({"kind": "train", "path": path, "set": sets}, load_config(ROOT / path, sets))
    for path, sets in [(p, []) for p in study_files()] + STUDY_OVERRIDES:
        spec = yaml.safe_load((ROOT / path).read_text())
        for i, cfg in enumerate(study_from_dict(spec, sets).points):
            add({"kind": "study", "path": path, "set": sets, "point": i}, cfg)
    for quick in (False, True):
        spec, sets = demo_study(*DEMO_FILES, quick)
        for i, cfg in enumerate(study_from_dict(spec, sets).points):
            add({"kind": "demo", "quick": quick, "point": i}, cfg)
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    entries = digests()
    sys.stdout.write("[\n" + ",\n".join(json.dumps(e, sort_keys=True) for e in entries)
                     + "\n]\n")
