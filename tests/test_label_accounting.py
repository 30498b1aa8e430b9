"""Label accounting: a point at label budget b may read the labels of its labelled subset only.

Two stores hold the same images and ids and differ only in the masks of the images outside the
budget (every `train` image not in `label_budget(train ids, b, budget_seed)`, and every `val`
image: the test split). Training the same config on each must give bit-identical checkpoints
and identical metrics: nothing outside the subset (masks, class pixel counts, eligibility) may
reach training or checkpoint selection.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tasks.data import ingest, store
from tasks.data.synth import synthesize
from tasks.fewshot.config import TrainConfig
from tasks.fewshot.episodes import label_budget
from tasks.fewshot.training import load_state, train

N_CLASSES = 20  # synthetic benchmark: foreground ids 1..20, 255 ignored
CORRUPTION_SEED = 1234


def _ingest(voc_root: Path, url: str) -> None:
    """The project's ingest, in this process (as in conftest's `tiny_store`)."""
    ingest.ingest_dataset("voc", str(voc_root), url, "synth", splits=["train", "val"], size=64,
                          shard_size=32)


def _corrupt_masks(voc_root: Path, ids: list[str], seed: int) -> None:
    """Rewrite the palette PNG masks of `ids` with other valid labels, deterministically.

    Every foreground id c becomes c % 20 + 1 (another class), and two random blocks of random
    classes are painted over each mask (255 pixels are kept), so both the labels and the
    per-class pixel counts (eligibility) of these images change.
    """
    rng = np.random.default_rng(seed)
    for image_id in sorted(ids):
        path = voc_root / "SegmentationClass" / f"{image_id}.png"
        with Image.open(path) as png:
            assert png.mode == "P"
            palette = png.getpalette()
            label = np.array(png)
        out = label.copy()
        fg = (label >= 1) & (label <= N_CLASSES)
        out[fg] = label[fg] % N_CLASSES + 1
        h, w = label.shape
        for _ in range(2):
            bh, bw = rng.integers(h // 5, h // 2 + 1), rng.integers(w // 5, w // 2 + 1)
            y, x = rng.integers(0, h - bh + 1), rng.integers(0, w - bw + 1)
            block = out[y : y + bh, x : x + bw]
            block[block != 255] = rng.integers(1, N_CLASSES + 1)
        new = Image.fromarray(out, mode="P")
        new.putpalette(palette)
        new.save(path)


def _config(url: str, tmp_path: Path, loader_workers: int = 0) -> TrainConfig:
    return TrainConfig(
        model="metasegnet", store=url, dataset="synth", fold=0, budget=0.2, steps=6,
        batch_size=2, checkpoint_every=2, val_every=2, val_episodes=4, test_episodes=4,
        test_shots=[1], min_pixels=64, threads=1, experiment="test",
        loader_workers=loader_workers,
        model_args={"embed_dim": 16, "global_dim": 32, "local_dim": 16},
        out_dir=str(tmp_path / "runs"))


def test_labels_outside_the_budget_do_not_reach_training(tmp_path: Path) -> None:
    synth = tmp_path / "synth"
    # 150 training images: budget 0.2 labels 30, and its held-out share (6 at val_fraction 0.2)
    # holds base classes in two images or more, so checkpoint selection really runs.
    synthesize(synth, n_train=150, n_val=16, size=96, seed=5)
    clean_voc, dirty_voc = synth / "voc", tmp_path / "voc-corrupted"
    clean_url, dirty_url = str(tmp_path / "clean.zarr"), str(tmp_path / "dirty.zarr")
    _ingest(clean_voc, clean_url)
    clean = store.open_dataset(clean_url, "synth")

    # The labelled subset, from the config as built (budget_seed may follow `seed`).
    cfg_clean = _config(clean_url, tmp_path)
    train_ids = clean.split_ids("train")
    labelled = set(label_budget(train_ids, cfg_clean.budget, cfg_clean.budget_seed))
    assert 0 < len(labelled) < len(train_ids)
    outside = sorted(set(train_ids) - labelled) + sorted(clean.split_ids("val"))

    shutil.copytree(clean_voc, dirty_voc)
    _corrupt_masks(dirty_voc, outside, CORRUPTION_SEED)
    _ingest(dirty_voc, dirty_url)
    dirty = store.open_dataset(dirty_url, "synth")

    # Same ids and images; masks equal inside the subset, and really corrupted outside it.
    for split in ("train", "val"):
        assert dirty.split_ids(split) == clean.split_ids(split)
    assert list(clean.quarantine["id"]) == list(dirty.quarantine["id"]) == []
    for image_id in clean.ids:
        assert np.array_equal(clean.image(image_id), dirty.image(image_id)), image_id
    for image_id in sorted(labelled):
        assert np.array_equal(clean.original_mask(image_id), dirty.original_mask(image_id))
        assert np.array_equal(clean.pixels(image_id), dirty.pixels(image_id))
    changed = [i for i in outside
               if not np.array_equal(clean.original_mask(i), dirty.original_mask(i))]
    assert len(changed) == len(outside)
    assert any(not np.array_equal(clean.pixels(i), dirty.pixels(i))
               for i in clean.split_ids("val"))

    # Train the same point on each store.
    # Read ahead by two loader processes (tasks/fewshot/loader.py): prefetching must read only
    # what the in-process loop of the clean run reads, and train the same weights.
    cfg_dirty = _config(dirty_url, tmp_path, loader_workers=2)
    assert cfg_dirty.budget_seed == cfg_clean.budget_seed
    metrics: dict[str, list[tuple[int, str, float]]] = {"clean": [], "dirty": []}
    results = {}
    for name, cfg in (("clean", cfg_clean), ("dirty", cfg_dirty)):
        def hook(m: dict[str, float], step: int, name: str = name) -> None:
            metrics[name].extend((step, k, float(v)) for k, v in sorted(m.items()))

        results[name] = train(cfg, tmp_path / name, on_metrics=hook, progress=False)
    assert any(k.startswith("val/") for _, k, _ in metrics["clean"]), (
        "validation never ran: the held-out labelled images form no episode; use more images")

    problems = []
    for ckpt in ("best.pt", "last.pt"):
        a = load_state(tmp_path / "clean" / "checkpoints" / ckpt)["model"]
        b = load_state(tmp_path / "dirty" / "checkpoints" / ckpt)["model"]
        assert a.keys() == b.keys()
        differ = [k for k in a if not torch.equal(a[k], b[k])]
        if differ:
            problems.append(f"{ckpt}: {len(differ)}/{len(a)} tensors differ, e.g. {differ[:3]}")
    if metrics["clean"] != metrics["dirty"]:
        diff = [(x, y) for x, y in zip(metrics["clean"], metrics["dirty"], strict=False)
                if x != y]
        problems.append(f"metrics differ (clean, dirty): {diff[:4]}")
    rc, rd = results["clean"], results["dirty"]
    if (rc.best_step, rc.best_val_miou) != (rd.best_step, rd.best_val_miou):
        problems.append(f"best step/val mIoU: clean {(rc.best_step, rc.best_val_miou)}, "
                        f"dirty {(rd.best_step, rd.best_val_miou)}")
    assert not problems, "labels outside the budget reached training:\n" + "\n".join(problems)
