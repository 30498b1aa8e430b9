"""Episodic training and protocol evaluation of the few-shot models (plain functions).

Training is seeded and, on CPU, bit-for-bit reproducible: episode i depends only on the
sampler's seed and i, the global RNG state is checkpointed, so a resumed run ends with the same
weights as an uninterrupted one. Checkpoints are selected on held-out *base*-class episodes of
the validation split, never on the test fold.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock
from torch import nn
from tqdm.auto import tqdm

from models.backbones import build_backbone, load_checkpoint
from models.metasegnet import MetaSegNet
from models.panet import PANet
from models.umt import UMTTransformer
from tasks.data.folds import base_classes, fold_classes
from tasks.data.store import Dataset, list_derived, open_dataset, open_derived
from tasks.fewshot.config import TrainConfig, config_digest
from tasks.fewshot.episodes import (
    Episode,
    EpisodeSampler,
    hold_out,
    label_budget,
)
from tasks.fewshot.loader import EpisodeIds, StepBatch, step_batches, workers_for
from tasks.fewshot.metrics import SegmentationMeter, upsample_logits_to
from tasks.labelfree.embeddings import to_input
from tasks.labelfree.pseudo_tasks import PseudoEpisodeSampler
from tasks.loop import TrainingLoop, load_state, save_checkpoint

log = logging.getLogger(__name__)

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
        return PANet(backbone=backbone, **args)
    return UMTTransformer(backbone, ce_weight=cfg.ce_weight, **args)


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

    def batch(self, episodes: Sequence[Episode | EpisodeIds]) -> dict[str, dict[str, torch.Tensor]]:
        queries = [self._get(ep.query_id) for ep in episodes]
        supports = [[self._get(i) for i in ep.support_ids] for ep in episodes]
        return {
            "query": {k: torch.stack([q[k] for q in queries]) for k in queries[0]},
            "support": {k: torch.stack([torch.stack([f[k] for f in row]) for row in supports])
                        for k in queries[0]},
        }


def forward_logits(model: nn.Module, batch: dict[str, Any], ways: int) -> torch.Tensor:
    """(B, ways + 1, H, W) logits of the query, whatever the model: every model takes
    (support_img, support_mask, query_img, n_ways). `batch["features"]`, when present, holds
    cached frozen-backbone taps that stand in for the images (UMT only)."""
    cached = {"features": batch["features"]} if "features" in batch else {}
    return model(batch.get("support_img"), batch["support_mask"], batch.get("query_img"),
                 n_ways=ways, **cached)


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def make_batch(episodes: Sequence[Episode] | StepBatch, device: torch.device,
               cache: FrozenFeatureCache | None = None) -> dict[str, Any]:
    """Model inputs on `device`: of episodes, or of a step's batch from the loader."""
    loaded = episodes if isinstance(episodes, StepBatch) else StepBatch.of(-1, episodes)
    batch: dict[str, Any] = _to(loaded.tensors, device)
    if cache is not None:
        batch["features"] = cache.batch(loaded.episodes)
    return batch


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    # Mixed precision on GPUs only; CPU runs stay in float32 so they are reproducible.
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


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
    # (episode, class id, intersection, union) per episode class: what a bootstrap resamples
    episode_rows: list[tuple[int, int, int, int]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # fold classes too rare to be scored
    # The test episodes and the scoring rule, hashed (`evaluate_fold`): equal keys, the same
    # test, so pairable runs.
    test_key: str = ""

    def metrics(self, prefix: str) -> dict[str, float]:
        out = {f"{prefix}/miou": self.miou, f"{prefix}/fbiou": self.fbiou}
        out |= {f"{prefix}/iou/{name}": v for name, v in self.per_class.items()}
        return out


@torch.no_grad()
def evaluate(model: nn.Module, sampler: EpisodeSampler, *, episodes: int,
             class_names: Sequence[str], device: torch.device, scoring: str = "pfenet",
             batch_size: int = 16, keep_samples: int = 0, progress: bool = False,
             desc: str = "evaluate", cache: FrozenFeatureCache | None = None) -> EvalResult:
    """Score `episodes` episodes of `sampler` by the protocol of docs/architecture.md.

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
    episode_rows: list[tuple[int, int, int, int]] = []
    for start in range(0, episodes, batch_size):
        batch_eps = [sampler.episode(i) for i in range(start, min(start + batch_size, episodes))]
        batch = make_batch(batch_eps, device, cache)
        with _autocast(device):
            logits = forward_logits(model, batch, sampler.ways).float()
        for k, ep in enumerate(batch_eps):
            if scoring == "pfenet":
                target = ep.query_original_mask
                pred = upsample_logits_to(logits[k:k + 1], target.shape,
                                          box=ep.query_box).argmax(1)[0]
            else:
                target, pred = ep.query_mask, logits[k].argmax(0)
            pred = pred.cpu().numpy().astype(np.uint8)
            episode_rows += [(start + k, c, inter, union)
                             for c, inter, union in meter.update(pred, target, ep.classes)]
            if len(samples) < keep_samples:
                samples.append((ep, logits[k].argmax(0).cpu().numpy().astype(np.uint8)))
        bar.update(len(batch_eps))
    bar.close()
    per_class = {class_names[c]: v for c, v in meter.per_class().items()}
    return EvalResult(miou=meter.miou(), fbiou=meter.fbiou(), per_class=per_class,
                      episodes=episodes, ways=sampler.ways, shots=sampler.shots,
                      seconds=time.perf_counter() - t0, samples=samples,
                      episode_rows=episode_rows,
                      dropped=[class_names[c] for c in sampler.dropped_classes])


# --- training ----------------------------------------------------------------------------------


@dataclass
class TrainResult:
    run_dir: Path
    steps: int  # the point's steps so far, a pseudo phase's included
    best_step: int
    best_val_miou: float
    history: list[tuple[int, float]]
    seconds: float
    resumed_from: int = 0
    labels: dict[str, int] = field(default_factory=lambda: {"images": 0, "pixels": 0})
    selection: str = "last checkpoint: no labels"
    log: list[tuple[int, dict[str, float]]] = field(default_factory=list)  # what was emitted


@dataclass
class LabelledData:
    """All that a point may read of labels: its labelled subset, split into training and
    held-out images, with the samplers over them (None where there is nothing to draw)."""

    train: EpisodeSampler | None
    val: EpisodeSampler | None
    selection: str  # how the point's checkpoint is chosen, in words (logged)
    images: int  # labelled images read (training + held out)
    pixels: int  # annotated pixels in them, at original resolution


def split_classes(cfg: TrainConfig, ds: Dataset) -> tuple[list[int], list[int]]:
    """(base, novel) class ids: `novel_classes` (names or ids) when the config names them, the
    fold's classes otherwise; base classes are all other foreground classes."""
    n_classes = len(ds.classes) - 1
    if not cfg.novel_classes:
        return (base_classes(n_classes, cfg.fold, cfg.n_folds, cfg.fold_variant),
                fold_classes(n_classes, cfg.fold, cfg.n_folds, cfg.fold_variant))
    ids = {name: k for k, name in enumerate(ds.classes)}
    novel = []
    for c in cfg.novel_classes:
        k = ids.get(c) if isinstance(c, str) else c
        if k is None or not 1 <= k <= n_classes:
            raise ValueError(f"novel_classes: {c!r} is not a foreground class of {ds.name} "
                             f"(classes 1..{n_classes}: {', '.join(ds.classes[1:])})")
        novel.append(k)
    if len(set(novel)) == n_classes:
        raise ValueError("novel_classes leaves no base class to train on")
    return [c for c in range(1, n_classes + 1) if c not in novel], sorted(set(novel))


def labelled_data(cfg: TrainConfig, ds: Dataset) -> LabelledData:
    """The label accounting of a point at budget b: every mask, pixel count and eligibility list
    that training and checkpoint selection read comes from here.

    The labelled subset is the first round(b·N) training images of one seeded permutation
    (`label_budget`, draw `budget_seed`); a `val_fraction` share of it, spread evenly along the
    permutation (`hold_out`), is held out from training to select the checkpoint on base-class
    episodes. The validation split is the test split and is never read here. When the held-out
    images cannot form an episode (budget too small), nothing selects: the last checkpoint is
    kept. Budget 0 reads no label at all.
    """
    labelled = label_budget(ds.split_ids("train"), cfg.budget, cfg.budget_seed)
    if not labelled:
        return LabelledData(None, None, "last checkpoint: no labels", 0, 0)
    train_ids, held_out = hold_out(labelled, cfg.val_fraction)
    common = dict(split="train", ways=cfg.ways, shots=cfg.shots, min_pixels=cfg.min_pixels,
                  classes=split_classes(cfg, ds)[0])
    train = EpisodeSampler(ds, image_ids=train_ids, seed=cfg.seed, **common)
    val, selection = None, "last checkpoint: no labelled image held out (budget too small)"
    if held_out:
        try:
            # A handful of held-out images leaves most classes out: that is expected, not news.
            val = EpisodeSampler(ds, image_ids=held_out, seed=cfg.seed + 10_000,
                                 drop_level=logging.DEBUG, **common)
            selection = f"best val/miou on {len(held_out)} held-out labelled images"
        except ValueError:
            selection = (f"last checkpoint: the {len(held_out)} held-out labelled images form "
                         f"no {cfg.ways}-way {cfg.shots}-shot episode (budget too small)")
    rows = [ds.row(i) for i in labelled]
    return LabelledData(train, val, selection, images=len(labelled),
                        pixels=int(ds.class_pixels[rows].sum()))


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


def two_phase(cfg: TrainConfig) -> bool:
    """finetune with pseudo tasks: a pseudo phase shared by every budget, then with labels
    (budget > 0) a labelled phase that starts from its final weights."""
    return bool(cfg.pseudo) and cfg.budget_mode == "finetune"


def total_steps(cfg: TrainConfig) -> int:
    """The point's steps: finetune `pseudo_steps` (+ `steps` with labels), otherwise `steps`."""
    if two_phase(cfg):
        return cfg.pseudo_steps + (cfg.steps if cfg.budget > 0 else 0)
    return cfg.steps


def episode_stream(cfg: TrainConfig, step: int) -> str:
    """Which episodes step `step` of the point trains on: "pseudo" or "labelled".

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


# Keys that leave the pseudo phase unchanged: one pseudo phase serves every budget of a seed.
_LABELLED_ONLY = ("budget", "budget_seed", "val_fraction", "steps", "test_episodes",
                  "test_shots", "test_ways", "test_seed", "scoring", "threads")


def pseudo_phase_config(cfg: TrainConfig) -> TrainConfig:
    """The config of `cfg`'s pseudo phase: that of its 0 % point, labelled-only keys reset."""
    defaults = TrainConfig()
    return cfg.replace(**{k: getattr(defaults, k) for k in _LABELLED_ONLY} | {"budget": 0.0})


def pseudo_phase_dir(cfg: TrainConfig, ds: Dataset) -> Path:
    phase = pseudo_phase_config(cfg)
    digest = config_digest(phase, f"{ds.name}/{ds.version}")
    return Path(cfg.out_dir) / "pseudo-phase" / f"{cfg.model}-s{cfg.seed}-{digest}"


@dataclass
class Phase:
    """One optimisation schedule (warm-up + cosine over its own `steps`) in one folder."""

    steps: int
    stream: Callable[[int], EpisodeSampler | PseudoEpisodeSampler]  # local step -> sampler
    val: EpisodeSampler | None  # selects the checkpoint; None keeps the last one
    offset: int = 0  # steps before this phase in the point (for logged step numbers)
    init: dict[str, torch.Tensor] | None = None  # weights to start from


def make_optimizer(cfg: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def run_phase(cfg: TrainConfig, phase: Phase, run_dir: Path, *, model: nn.Module, ds: Dataset,
              device: torch.device, cache: FrozenFeatureCache | None,
              pseudo_val: PseudoEpisodeSampler | None, emit: MetricsHook,
              on_checkpoint: Callable[[], None] | None = None, progress: bool = True,
              stop_after: int | None = None) -> TrainResult:
    """Train (or resume) one phase in `run_dir`: the one loop of every model and budget."""
    t0 = time.perf_counter()
    best_path = run_dir / "checkpoints" / "best.pt"
    # Seeded per phase: a phase's steps do not depend on what ran before it in this process.
    torch.manual_seed(cfg.seed)
    if phase.init is not None:
        model.load_state_dict(phase.init)
    loop = TrainingLoop(model, functools.partial(make_optimizer, cfg), steps=phase.steps,
                        checkpoint=run_dir / "checkpoints" / "last.pt",
                        desc=f"train {cfg.model}", progress=progress)
    best_step, best_val = 0, -1.0
    history: list[tuple[int, float]] = []
    log: list[tuple[int, dict[str, float]]] = []
    state = loop.resume()
    if state is not None:
        best_step, best_val = state["best_step"], state["best_val"]
        history = [tuple(h) for h in state["history"]]
        log = [(s, dict(m)) for s, m in state.get("log", [])]
    resumed_from = loop.step

    def record(metrics: dict[str, float], local_step: int) -> None:
        log.append((phase.offset + local_step, metrics))
        emit(metrics, phase.offset + local_step)

    def save_best(step: int) -> None:
        save_checkpoint(best_path, {"model": model.state_dict(), "step": phase.offset + step,
                                    "config": cfg.to_dict()})

    # Batches of the coming steps are read while this one trains (tasks/fewshot/loader.py).
    batches = step_batches(phase.stream, cfg.batch_size, range(loop.step, phase.steps),
                           workers=workers_for(cfg.loader_workers, device),
                           pin_memory=device.type == "cuda")

    def objective(step: int) -> dict[str, torch.Tensor]:
        ready = next(batches)
        if ready.step != step:  # the loader and the loop must agree on where the phase is
            raise RuntimeError(f"loader at step {ready.step}, training at step {step}")
        batch = make_batch(ready, device, cache)
        with _autocast(device):
            return {"loss": model.compute_objective(batch, cfg.ways)}

    def after_step(step: int, parts: Mapping[str, torch.Tensor]) -> None:
        nonlocal best_step, best_val
        history.append((phase.offset + step, float(parts["loss"].item())))
        record({"train/loss": history[-1][1], "train/lr": loop.lr()}, step)
        validate = step % cfg.val_every == 0 or step == phase.steps
        if pseudo_val is not None and validate:
            fit = evaluate(model, pseudo_val, episodes=cfg.val_episodes,
                           class_names=pseudo_val.class_names(), device=device,
                           scoring="hsnet", cache=cache)
            record({"val_pseudo/miou": fit.miou, "val_pseudo/fbiou": fit.fbiou}, step)
        if phase.val is None and step == phase.steps:  # nothing selects: the last one is kept
            best_step = phase.offset + step
            save_best(step)
        elif phase.val is not None and validate:
            val = evaluate(model, phase.val, episodes=cfg.val_episodes,
                           class_names=ds.classes, device=device, scoring="hsnet", cache=cache)
            record({"val/miou": val.miou, "val/fbiou": val.fbiou}, step)
            if val.miou > best_val:
                best_val, best_step = val.miou, phase.offset + step
                save_best(step)

    try:
        loop.run(objective, checkpoint_every=cfg.checkpoint_every, after_step=after_step,
                 extra_state=lambda: {"best_step": best_step, "best_val": best_val,
                                      "history": history, "log": log, "config": cfg.to_dict()},
                 before_checkpoint=on_checkpoint,  # before the file: metrics up to it survive
                 stop_after=stop_after, step_offset=phase.offset)
    finally:
        batches.close()
    return TrainResult(run_dir=run_dir, steps=phase.offset + loop.step, best_step=best_step,
                       best_val_miou=best_val if phase.val is not None else float("nan"),
                       history=history, seconds=time.perf_counter() - t0,
                       resumed_from=phase.offset + resumed_from, log=log)


def train(cfg: TrainConfig, run_dir: Path, *, on_metrics: MetricsHook | None = None,
          on_checkpoint: Callable[[], None] | None = None, progress: bool = True,
          stop_after: int | None = None, dataset: Dataset | None = None) -> TrainResult:
    """Train (or resume) a point in `run_dir`; returns when all `total_steps(cfg)` are done.

    finetune with pseudo tasks trains the pseudo phase once per seed and pseudo setting, in
    `out_dir/pseudo-phase/` (under a file lock: concurrent points wait for it, then reuse it).
    The 0 % point is that phase; a labelled budget starts from its final weights with a fresh
    optimiser and its own warm-up + cosine schedule over `steps`, and only checkpoints of this
    labelled phase compete for `best.pt`. `on_checkpoint` runs after each checkpoint (the
    tracker flushes its metrics there, so a resumed run has no gap). `stop_after` ends this
    call after that many steps (tests simulate a crash with it). `dataset`, when the caller has
    it open, is reused (with its warm shard cache) instead of opened again.
    """
    t0 = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    ds = dataset if dataset is not None else open_dataset(cfg.store, cfg.dataset)
    labelled = labelled_data(cfg, ds)
    pseudo = pseudo_sampler(cfg, ds)
    if labelled.train is None and pseudo is None:
        raise ValueError("budget 0 without pseudo tasks has nothing to train on")
    # Label-free monitor: how well the model fits pseudo episodes it was not trained on (other
    # seed, same unlabelled images). Logged only; it never selects a checkpoint.
    pseudo_val = pseudo_sampler(cfg, ds, seed=cfg.seed + 30_000) if pseudo else None
    emit = on_metrics or (lambda metrics, s: None)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(device)
    cache = feature_cache(cfg, model, ds, device)
    run = functools.partial(run_phase, cfg, model=model, ds=ds, device=device, cache=cache,
                            pseudo_val=pseudo_val, progress=progress)
    accounting = {"labels": {"images": labelled.images, "pixels": labelled.pixels},
                  "selection": labelled.selection}
    log.info("%s at budget %g: %d labelled images (%d labelled pixels), checkpoint selection: "
             "%s", cfg.model, cfg.budget, labelled.images, labelled.pixels, labelled.selection)
    if not two_phase(cfg):
        samplers = {"labelled": labelled.train, "pseudo": pseudo}
        phase = Phase(cfg.steps, lambda s: samplers[episode_stream(cfg, s)], labelled.val)
        result = run(phase, run_dir, emit=emit, on_checkpoint=on_checkpoint,
                     stop_after=stop_after)
        return dataclasses.replace(result, seconds=time.perf_counter() - t0, **accounting)

    phase_dir = pseudo_phase_dir(cfg, ds)
    phase_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(phase_dir / ".lock"):  # a point training it now: wait, then reuse it
        log.info("pseudo phase (%d steps) in %s", cfg.pseudo_steps, phase_dir)
        first = run(Phase(cfg.pseudo_steps, lambda s: pseudo, None), phase_dir,
                    emit=lambda metrics, s: None, stop_after=stop_after)
    last_path = run_dir / "checkpoints" / "last.pt"
    if not last_path.exists():  # the labelled phase has not started: show the pseudo curves
        for step, metrics in first.log:
            emit(metrics, step)
    if first.steps < cfg.pseudo_steps or cfg.budget == 0:
        if first.steps == cfg.pseudo_steps:  # the 0 % point is the pseudo phase
            state = load_state(phase_dir / "checkpoints" / "best.pt")
            save_checkpoint(run_dir / "checkpoints" / "best.pt", state | {"config": cfg.to_dict()})
        return dataclasses.replace(first, run_dir=run_dir, seconds=time.perf_counter() - t0,
                                   **accounting)
    # A labelled phase that has started resumes from its own last.pt instead.
    init = None if last_path.exists() else load_state(phase_dir / "checkpoints" / "last.pt")
    phase = Phase(cfg.steps, lambda s: labelled.train, labelled.val, offset=cfg.pseudo_steps,
                  init=None if init is None else init["model"])
    left = None if stop_after is None else stop_after - (first.steps - first.resumed_from)
    result = run(phase, run_dir, emit=emit, on_checkpoint=on_checkpoint, stop_after=left)
    return dataclasses.replace(result, seconds=time.perf_counter() - t0, **accounting)


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


def eval_settings(cfg: TrainConfig) -> Iterator[tuple[int, int]]:
    """(ways, shots) pairs scored on the test fold."""
    for ways in cfg.test_ways or [cfg.ways]:
        if cfg.model == "umt" and ways != 1:
            continue
        for shots in cfg.test_shots:
            yield ways, shots


def evaluate_fold(cfg: TrainConfig, model: nn.Module, *, keep_samples: int = 0,
               progress: bool = True, dataset: Dataset | None = None) -> list[EvalResult]:
    """Evaluate on the novel classes (`test_split`) for every test setting."""
    device = pick_device(cfg.device)
    model.to(device)
    ds = dataset if dataset is not None else open_dataset(cfg.store, cfg.dataset)
    novel = split_classes(cfg, ds)[1]
    if not ds.split_ids(cfg.test_split):
        raise ValueError(f"test_split {cfg.test_split!r}: {ds.name} has no ingested image in "
                         f"that split (ingest it with --split)")
    cache = feature_cache(cfg, model, ds, device)
    results = []
    for ways, shots in eval_settings(cfg):
        sampler = EpisodeSampler(ds, split=cfg.test_split, classes=novel, ways=ways, shots=shots,
                                 min_pixels=cfg.min_pixels, seed=cfg.test_seed)
        result = evaluate(model, sampler, episodes=cfg.test_episodes, class_names=ds.classes,
                          device=device, scoring=cfg.scoring, keep_samples=keep_samples,
                          progress=progress, desc=f"test {ways}-way {shots}-shot", cache=cache)
        result.test_key = f"{cfg.scoring}-{sampler.digest(cfg.test_episodes)}"
        results.append(result)
    return results
