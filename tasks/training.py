"""Episodic training and protocol evaluation of the few-shot models (plain functions).

Training is seeded and, on CPU, bit-for-bit reproducible: episode i depends only on the
sampler's seed and i, the global RNG state is checkpointed, so a resumed run ends with the same
weights as an uninterrupted one. Checkpoints are selected on held-out *base*-class episodes of
the validation split, never on the test fold.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from models.backbones import build_backbone, load_checkpoint
from models.metasegnet import MetaSegNet
from models.panet import PANet
from models.umt import UMTTransformer
from tasks.config import TrainConfig
from tasks.embeddings import to_input
from tasks.episodes import Episode, EpisodeSampler, batch_to_tensors, label_budget
from tasks.folds import base_classes, fold_classes
from tasks.metrics import SegmentationMeter, upsample_logits_to
from tasks.pseudo_tasks import PseudoEpisodeSampler
from tasks.store import Dataset, list_derived, open_dataset, open_derived

MetricsHook = Callable[[dict[str, float], int], None]


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_model(cfg: TrainConfig) -> nn.Module:
    backbone = build_backbone(cfg.backbone)
    if cfg.backbone_checkpoint:
        load_checkpoint(backbone, cfg.backbone_checkpoint)
    args = dict(cfg.model_args)
    if cfg.model == "metasegnet":
        return MetaSegNet(backbone=backbone, **args)
    if cfg.model == "panet":
        args.pop("align_weight", None)
        return PANet(backbone=backbone, **args)
    return UMTTransformer(backbone, **args)


class FrozenFeatureCache:
    """Backbone taps of each image, computed once and kept in memory (float32).

    A frozen backbone yields the same features at every step, so training and evaluation of
    the UMT model can skip it. Features are kept in float32; they differ from the batched
    uncached pass only by float rounding (~1e-7), so results match to that precision.
    """

    def __init__(self, model: UMTTransformer, ds: Dataset, device: torch.device):
        if not model.freeze_backbone:
            raise ValueError("cache_features needs a frozen backbone (model_args.freeze_backbone)")
        self.model, self.ds, self.device = model, ds, device
        self._feats: dict[str, dict[str, torch.Tensor]] = {}

    def _get(self, image_id: str) -> dict[str, torch.Tensor]:
        if image_id not in self._feats:
            img = to_input(self.ds.image(image_id)[None]).to(self.device)
            with torch.no_grad():
                self._feats[image_id] = {k: v[0] for k, v in self.model.extract(img).items()}
        return self._feats[image_id]

    def batch(self, episodes: Sequence[Episode]) -> dict[str, dict[str, torch.Tensor]]:
        queries = [self._get(ep.query_id) for ep in episodes]
        supports = [[self._get(i) for i in ep.support_ids] for ep in episodes]
        return {
            "query": {k: torch.stack([q[k] for q in queries]) for k in queries[0]},
            "support": {k: torch.stack([torch.stack([f[k] for f in row]) for row in supports])
                        for k in queries[0]},
        }


def forward_logits(model: nn.Module, batch: dict[str, Any], ways: int) -> torch.Tensor:
    """(B, ways + 1, H, W) logits of the query, whatever the model.

    `batch["features"]`, when present, holds cached frozen-backbone taps (UMT only).
    """
    if isinstance(model, UMTTransformer):
        if "features" in batch:
            return model(None, batch["support_mask"], None, features=batch["features"])
        return model(batch["support_img"], batch["support_mask"], batch["query_img"])
    return model(batch["support_img"], batch["support_mask"], batch["query_img"], n_ways=ways)


def training_loss(model: nn.Module, batch: dict[str, Any], ways: int,
                  cfg: TrainConfig) -> torch.Tensor:
    target = batch["query_mask"]
    if isinstance(model, UMTTransformer):
        return model.loss(forward_logits(model, batch, ways), target, ce_weight=cfg.ce_weight)
    if isinstance(model, PANet):
        align_weight = float(cfg.model_args.get("align_weight", 1.0))
        if align_weight > 0:
            logits, align = model(batch["support_img"], batch["support_mask"],
                                  batch["query_img"], n_ways=ways, return_align_loss=True)
            return F.cross_entropy(logits, target, ignore_index=255) + align_weight * align
    return F.cross_entropy(forward_logits(model, batch, ways), target, ignore_index=255)


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def make_batch(episodes: Sequence[Episode], device: torch.device,
               cache: FrozenFeatureCache | None = None) -> dict[str, Any]:
    batch: dict[str, Any] = _to(batch_to_tensors(episodes), device)
    if cache is not None:
        batch["features"] = cache.batch(episodes)
    return batch


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    # Mixed precision on GPUs only; CPU runs stay in float32 so they are reproducible.
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --- checkpoints -------------------------------------------------------------------------------


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomic write: a crash mid-save leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


# --- evaluation --------------------------------------------------------------------------------


@dataclass
class EvalResult:
    miou: float
    fbiou: float
    per_class: dict[str, float]
    episodes: int
    ways: int
    shots: int
    seconds: float
    samples: list[tuple[Episode, np.ndarray]] = field(default_factory=list)

    def metrics(self, prefix: str) -> dict[str, float]:
        out = {f"{prefix}/miou": self.miou, f"{prefix}/fbiou": self.fbiou}
        out |= {f"{prefix}/iou/{name}": v for name, v in self.per_class.items()}
        return out


@torch.no_grad()
def evaluate(model: nn.Module, sampler: EpisodeSampler, *, episodes: int,
             class_names: Sequence[str], device: torch.device, scoring: str = "pfenet",
             batch_size: int = 16, keep_samples: int = 0, progress: bool = False,
             desc: str = "evaluate", cache: FrozenFeatureCache | None = None) -> EvalResult:
    """Score `episodes` episodes of `sampler` by the protocol of DESIGN.md.

    mIoU sums intersections and unions per class over all episodes before dividing; FB-IoU is
    the mean of accumulated foreground and background IoU; 255 pixels are ignored. With
    `scoring="pfenet"` logits are upsampled to each label's original size. The classes scored
    are the sampler's usable ones (a class without enough eligible images has no episodes).
    """
    model.eval()
    meter = SegmentationMeter(sampler.classes)
    samples: list[tuple[Episode, np.ndarray]] = []
    t0 = time.perf_counter()
    bar = tqdm(total=episodes, desc=desc, unit="ep", disable=not progress, leave=False)
    for start in range(0, episodes, batch_size):
        batch_eps = [sampler.episode(i) for i in range(start, min(start + batch_size, episodes))]
        batch = make_batch(batch_eps, device, cache)
        with _autocast(device):
            logits = forward_logits(model, batch, sampler.ways).float()
        for k, ep in enumerate(batch_eps):
            if scoring == "pfenet":
                target = ep.query_original_mask
                pred = upsample_logits_to(logits[k:k + 1], target.shape).argmax(1)[0]
            else:
                target, pred = ep.query_mask, logits[k].argmax(0)
            pred = pred.cpu().numpy().astype(np.uint8)
            meter.update(pred, target, ep.classes)
            if len(samples) < keep_samples:
                samples.append((ep, logits[k].argmax(0).cpu().numpy().astype(np.uint8)))
        bar.update(len(batch_eps))
    bar.close()
    per_class = {class_names[c]: v for c, v in meter.per_class().items()}
    return EvalResult(miou=meter.miou(), fbiou=meter.fbiou(), per_class=per_class,
                      episodes=episodes, ways=sampler.ways, shots=sampler.shots,
                      seconds=time.perf_counter() - t0, samples=samples)


# --- training ----------------------------------------------------------------------------------


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    best_step: int
    best_val_miou: float
    history: list[tuple[int, float]]
    seconds: float
    resumed_from: int = 0


def episodes_for_step(sampler: EpisodeSampler, step: int, batch_size: int) -> list[Episode]:
    return [sampler.episode(step * batch_size + b) for b in range(batch_size)]


def make_samplers(cfg: TrainConfig, ds: Dataset
                  ) -> tuple[EpisodeSampler | None, EpisodeSampler | None]:
    """Training episodes on the labelled budget's images, validation on held-out images;
    both draw only base classes of the fold. Budget 0 has neither (no label is read)."""
    if cfg.budget == 0:
        return None, None
    n_classes = len(ds.classes) - 1
    base = base_classes(n_classes, cfg.fold, cfg.n_folds, cfg.fold_variant)
    labelled = label_budget(ds.split_ids("train"), cfg.budget, cfg.budget_seed)
    common = dict(classes=base, ways=cfg.ways, shots=cfg.shots, min_pixels=cfg.min_pixels)
    train = EpisodeSampler(ds, split="train", image_ids=labelled, seed=cfg.seed, **common)
    val = EpisodeSampler(ds, split="val", seed=cfg.seed + 10_000, **common)
    return train, val


def pseudo_sampler(cfg: TrainConfig, ds: Dataset,
                   seed: int | None = None) -> PseudoEpisodeSampler | None:
    """Pseudo meta-tasks over all (unlabelled) training images, when the config names them."""
    if not cfg.pseudo:
        return None
    key = cfg.pseudo
    if key == "latest":
        groups = [k for k, a in list_derived(cfg.store, ds.name, ds.version, kind="pseudo").items()
                  if a.get("complete")]
        if len(groups) != 1:
            raise ValueError(f"pseudo: latest needs exactly one complete pseudo-mask group in "
                             f"{ds.name}/{ds.version}, found {groups or 'none'}: name one")
        key = groups[0]
    derived = open_derived(cfg.store, ds.name, key, ds.version)
    return PseudoEpisodeSampler(ds, derived, split="train", shots=cfg.shots,
                                min_pixels=cfg.min_pixels, top_k=cfg.pseudo_top_k,
                                seed=cfg.seed + 20_000 if seed is None else seed)


def total_steps(cfg: TrainConfig) -> int:
    """finetune: `pseudo_steps` (+ `steps` with labels), so the 0 % model is exactly the
    pseudo-training phase every labelled budget starts from. Otherwise `steps`."""
    if cfg.pseudo and cfg.budget_mode == "finetune":
        return cfg.pseudo_steps + (cfg.steps if cfg.budget > 0 else 0)
    return cfg.steps


def episode_stream(cfg: TrainConfig, step: int) -> str:
    """Which episodes step `step` trains on: "pseudo" or "labelled".

    No pseudo tasks: labelled. Budget 0: pseudo (`pseudo_steps` of them in finetune mode,
    `steps` in mixed mode). finetune: `pseudo_steps` pseudo steps, then `steps` labelled ones
    (pseudo-train, then meta-train, as the UMTFSS code does). mixed: the `steps` interleave, a
    `mixed_pseudo_fraction` share of them pseudo, evenly spread.
    """
    if not cfg.pseudo:
        return "labelled"
    if cfg.budget == 0:
        return "pseudo"
    if cfg.budget_mode == "finetune":
        return "pseudo" if step < cfg.pseudo_steps else "labelled"
    f = cfg.mixed_pseudo_fraction
    return "pseudo" if math.floor((step + 1) * f) > math.floor(step * f) else "labelled"


def train(cfg: TrainConfig, run_dir: Path, *, on_metrics: MetricsHook | None = None,
          on_checkpoint: Callable[[], None] | None = None, progress: bool = True,
          stop_after: int | None = None, dataset: Dataset | None = None) -> TrainResult:
    """Train (or resume) a run in `run_dir`; returns when all `total_steps(cfg)` are done.

    `on_checkpoint` runs after each checkpoint (the tracker flushes its metrics there, so a
    resumed run has no gap). `stop_after` ends this call after that many steps (tests
    simulate a crash at a known point with it). `dataset`, when the caller has it open, is
    reused (with its warm shard cache) instead of opened again.
    """
    t0 = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    ds = dataset if dataset is not None else open_dataset(cfg.store, cfg.dataset)
    train_sampler, val_sampler = make_samplers(cfg, ds)
    samplers = {"labelled": train_sampler, "pseudo": pseudo_sampler(cfg, ds)}
    # Label-free monitor: how well the model fits pseudo episodes it was not trained on (other
    # seed, same unlabelled images). Logged only; it never selects a checkpoint.
    pseudo_val = pseudo_sampler(cfg, ds, seed=cfg.seed + 30_000) if samplers["pseudo"] else None
    if samplers["labelled"] is None and samplers["pseudo"] is None:
        raise ValueError("budget 0 without pseudo tasks has nothing to train on")
    total = total_steps(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(device)
    cache = feature_cache(cfg, model, ds, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(total))
    last_path, best_path = run_dir / "checkpoints" / "last.pt", run_dir / "checkpoints" / "best.pt"
    step, best_step, best_val, history = 0, 0, -1.0, []
    if last_path.exists():
        state = load_state(last_path)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        step, best_step, best_val = state["step"], state["best_step"], state["best_val"]
        history = [tuple(h) for h in state["history"]]
    resumed_from = step
    emit = on_metrics or (lambda metrics, s: None)
    bar = tqdm(total=total, initial=step, desc=f"train {cfg.model}", unit="step",
               disable=not progress)
    done_here = 0
    while step < total:
        model.train()
        sampler = samplers[episode_stream(cfg, step)]
        batch = make_batch(episodes_for_step(sampler, step, cfg.batch_size), device, cache)
        with _autocast(device):
            loss = training_loss(model, batch, cfg.ways, cfg)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        done_here += 1
        history.append((step, float(loss.item())))
        emit({"train/loss": history[-1][1], "train/lr": sched.get_last_lr()[0]}, step)
        bar.update()
        bar.set_postfix(loss=f"{history[-1][1]:.3f}")
        if pseudo_val is not None and (step % cfg.val_every == 0 or step == total):
            fit = evaluate(model, pseudo_val, episodes=cfg.val_episodes,
                           class_names=pseudo_val.class_names(), device=device,
                           scoring="hsnet", cache=cache)
            emit({"val_pseudo/miou": fit.miou, "val_pseudo/fbiou": fit.fbiou}, step)
        # Without labels (budget 0) nothing may select a checkpoint: the last one is kept.
        if val_sampler is None and step == total:
            best_step = step
            save_checkpoint(best_path, {"model": model.state_dict(), "step": step,
                                        "config": cfg.to_dict()})
        elif val_sampler is not None and (step % cfg.val_every == 0 or step == total):
            val = evaluate(model, val_sampler, episodes=cfg.val_episodes,
                           class_names=ds.classes, device=device, scoring="hsnet", cache=cache)
            emit({"val/miou": val.miou, "val/fbiou": val.fbiou}, step)
            if val.miou > best_val:
                best_val, best_step = val.miou, step
                save_checkpoint(best_path, {"model": model.state_dict(), "step": step,
                                            "config": cfg.to_dict()})
        if step % cfg.checkpoint_every == 0 or step == total:
            if on_checkpoint is not None:  # before the file: metrics up to it survive a crash
                on_checkpoint()
            save_checkpoint(last_path, {
                "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "rng": torch.get_rng_state(), "step": step,
                "best_step": best_step, "best_val": best_val, "history": history,
                "config": cfg.to_dict()})
        if stop_after is not None and done_here >= stop_after:
            break
    bar.close()
    if val_sampler is None:
        best_val = float("nan")  # nothing was validated: no labels
    return TrainResult(run_dir=run_dir, steps=step, best_step=best_step, best_val_miou=best_val,
                       history=history, seconds=time.perf_counter() - t0,
                       resumed_from=resumed_from)


def feature_cache(cfg: TrainConfig, model: nn.Module, ds: Dataset,
                  device: torch.device) -> FrozenFeatureCache | None:
    if not cfg.cache_features:
        return None
    if not isinstance(model, UMTTransformer):
        raise ValueError("cache_features applies to the UMT model's frozen backbone only")
    return FrozenFeatureCache(model, ds, device)


def save_initial(cfg: TrainConfig, run_dir: Path) -> TrainResult:
    """Budget 0 without pseudo tasks: no labelled episode exists, so the point is the model as
    initialised (its backbone possibly self-supervised): the untrained floor."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    save_checkpoint(run_dir / "checkpoints" / "best.pt",
                    {"model": model.state_dict(), "step": 0, "config": cfg.to_dict()})
    return TrainResult(run_dir=run_dir, steps=0, best_step=0, best_val_miou=float("nan"),
                       history=[], seconds=0.0)


def _warmup_cosine(total: int, warmup_frac: float = 0.05) -> Callable[[int], float]:
    warmup = max(1, int(total * warmup_frac))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return factor


def eval_settings(cfg: TrainConfig) -> Iterator[tuple[int, int]]:
    """(ways, shots) pairs scored on the test fold."""
    for ways in cfg.test_ways or [cfg.ways]:
        if cfg.model == "umt" and ways != 1:
            continue
        for shots in cfg.test_shots:
            yield ways, shots


def evaluate_fold(cfg: TrainConfig, model: nn.Module, *, keep_samples: int = 0,
               progress: bool = True, dataset: Dataset | None = None) -> list[EvalResult]:
    """Evaluate on the fold's novel classes (validation split) for every test setting."""
    device = pick_device(cfg.device)
    model.to(device)
    ds = dataset if dataset is not None else open_dataset(cfg.store, cfg.dataset)
    novel = fold_classes(len(ds.classes) - 1, cfg.fold, cfg.n_folds, cfg.fold_variant)
    cache = feature_cache(cfg, model, ds, device)
    results = []
    for ways, shots in eval_settings(cfg):
        sampler = EpisodeSampler(ds, split="val", classes=novel, ways=ways, shots=shots,
                                 min_pixels=cfg.min_pixels, seed=cfg.test_seed)
        results.append(evaluate(model, sampler, episodes=cfg.test_episodes,
                                class_names=ds.classes, device=device, scoring=cfg.scoring,
                                keep_samples=keep_samples, progress=progress,
                                desc=f"test {ways}-way {shots}-shot", cache=cache))
    return results


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
