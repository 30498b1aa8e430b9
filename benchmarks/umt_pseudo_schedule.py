"""UMT at 0 % labels: test mIoU against the length and learning rate of pseudo-training.

    .venv/bin/python benchmarks/umt_pseudo_schedule.py [--workdir demo] [--test-episodes 192]

Needs the files of `fss demo` in `--workdir` (the store with its pseudo masks and the
self-supervised backbone). Each setting is the demo study's UMT 0 % point (configs/
ablation-synthetic.yaml) with `pseudo_steps`, `lr` and `seed` changed, trained from scratch in a
temporary folder, and scored on the fold's novel classes like the ablation does. Settings run
in `--workers` processes of one torch thread each.

The last rows need no training: the PFENet prior of the frozen backbone (the highest cosine
similarity of a query pixel to the support's foreground, min-max normalised), thresholded, on
the same test episodes. The threshold is chosen on those episodes, so this is a diagnostic of
what the backbone offers, not a result.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from flows.cli.demo import demo_study
from tasks.data.folds import fold_classes
from tasks.data.store import open_dataset
from tasks.fewshot.config import TrainConfig
from tasks.fewshot.episodes import EpisodeSampler
from tasks.fewshot.metrics import SegmentationMeter, upsample_logits_to
from tasks.fewshot.training import (
    FrozenFeatureCache,
    build_model,
    evaluate_fold,
    load_state,
    make_batch,
    train,
)
from tasks.study.ablation import study_from_dict

# (pseudo_steps, lr, seed)
SETTINGS = [(60, 1e-3, 0), (200, 1e-3, 0), (400, 1e-3, 0), (400, 1e-3, 1), (200, 2e-3, 0)]
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def zero_budget_config(workdir: Path, test_episodes: int) -> TrainConfig:
    spec, overrides = demo_study(str(workdir / "store.zarr"),
                                 str(workdir / "pretrain" / "backbone.pth"),
                                 str(workdir / "runs"), quick=False)
    points = study_from_dict(spec, [*overrides, f"test_episodes={test_episodes}"]).points
    return next(p for p in points if p.model == "umt" and p.budget == 0)


def run_setting(cfg: TrainConfig, setting: tuple[int, float, int]) -> dict:
    torch.set_num_threads(1)
    pseudo_steps, lr, seed = setting
    logged: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:  # the pseudo phase goes there too
        cfg = cfg.replace(pseudo_steps=pseudo_steps, lr=lr, seed=seed,
                          checkpoint_every=10**6, val_every=pseudo_steps, out_dir=tmp)
        ds = open_dataset(cfg.store, cfg.dataset)
        t0 = time.perf_counter()
        train(cfg, Path(tmp), progress=False, dataset=ds,
              on_metrics=lambda metrics, step: logged.update(metrics))
        seconds = time.perf_counter() - t0
        model = build_model(cfg)
        model.load_state_dict(load_state(Path(tmp) / "checkpoints" / "best.pt")["model"])
        result = evaluate_fold(cfg, model, progress=False, dataset=ds)[0]
    return {"pseudo_steps": pseudo_steps, "lr": lr, "seed": seed, "miou": result.miou,
            "val_pseudo": logged["val_pseudo/miou"], "seconds": seconds}


@torch.no_grad()
def prior_only(cfg: TrainConfig) -> dict[float, float]:
    """Test mIoU of the thresholded PFENet prior of the frozen backbone."""
    torch.set_num_threads(1)
    ds = open_dataset(cfg.store, cfg.dataset)
    model = build_model(cfg).eval()
    cache = FrozenFeatureCache(model, ds, torch.device("cpu"))
    novel = fold_classes(len(ds.classes) - 1, cfg.fold, cfg.n_folds, cfg.fold_variant)
    sampler = EpisodeSampler(ds, split="val", classes=novel, ways=1, shots=1,
                             min_pixels=cfg.min_pixels, seed=cfg.test_seed)
    meters = {t: SegmentationMeter(sampler.classes) for t in THRESHOLDS}
    for start in range(0, cfg.test_episodes, 16):
        episodes = [sampler.episode(i) for i in range(start, min(start + 16, cfg.test_episodes))]
        batch = make_batch(episodes, torch.device("cpu"), cache)
        f = batch["features"]
        size = batch["support_mask"].shape[-2:]
        prior = model.prior(f["query"]["layer4"], f["support"]["layer4"],
                             batch["support_mask"], size)
        for k, ep in enumerate(episodes):
            up = upsample_logits_to(prior[k:k + 1], ep.query_original_mask.shape)[0, 0]
            for t, meter in meters.items():
                meter.update((up > t).numpy().astype(np.uint8), ep.query_original_mask,
                             ep.classes)
    return {t: m.miou() for t, m in meters.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("demo"))
    parser.add_argument("--test-episodes", type=int, default=192)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    if not (args.workdir / "pretrain" / "backbone.pth").exists():
        raise SystemExit(f"{args.workdir} holds no demo files: run `fss demo --workdir "
                         f"{args.workdir}` first")
    cfg = zero_budget_config(args.workdir.resolve(), args.test_episodes)
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        rows = list(pool.map(run_setting, [cfg] * len(SETTINGS), SETTINGS))
        priors = pool.submit(prior_only, cfg).result()
    print(f"UMT at 0 % labels, fold 0, 1-way 1-shot, {args.test_episodes} test episodes "
          f"({(time.perf_counter() - t0) / 60:.1f} min)\n")
    print("| pseudo steps | lr | seed | test mIoU (%) | val_pseudo mIoU (%) | train s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['pseudo_steps']} | {r['lr']:g} | {r['seed']} | {100 * r['miou']:.1f} | "
              f"{100 * r['val_pseudo']:.1f} | {r['seconds']:.0f} |")
    print("\nPFENet prior of the frozen backbone alone, thresholded (diagnostic):")
    print(" ".join(f"t={t}: {100 * v:.1f}" for t, v in priors.items()))


if __name__ == "__main__":
    main()
