"""Episode samplers and label budgets: what a training step or a test episode is made of.

An N-way K-shot episode (docs/architecture.md, "Protocol") draws N distinct classes, a query image
holding at least one of them and, for each class, K support images (all different from the query)
whose masks show only that class. Episode class ``j`` is labelled ``j + 1``; every other class,
base or novel, becomes background 0; the ignore label 255 stays 255.

Sampling scheme (the same for training and testing, and for 1-way and N-way):

1. the N classes are drawn uniformly without replacement from the sampler's usable classes, in
   random order (so no class is tied to a fixed episode label);
2. the query is drawn uniformly from the images eligible for *any* of those classes;
3. each class's K supports are drawn uniformly from its eligible images other than the query.

For 1-way testing this is "class first, then a query among its images": every class gets an
equal expected share of the test episodes whatever its image count, so frequent classes do not
dominate the per-class sums behind mIoU. An image is *eligible* for a class when it holds at
least ``min_pixels`` pixels of it at the label's original resolution (2*32*32 by default, as in
PFENet/HSNet). Randomness depends only on ``(seed, index)``: episode ``i`` is the same whichever
worker draws it and in whatever order, so evaluation splits across workers reproducibly.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import count

import numpy as np
import torch

from models.conventions import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from tasks.data.store import Dataset

log = logging.getLogger(__name__)


@dataclass
class Episode:
    """One N-way K-shot episode, labels already mapped to episode labels 0..N (255 kept)."""

    classes: list[int]  # absolute class ids; episode class j is labelled j + 1
    support_ids: list[str]  # ways * shots ids, class-major: [c0 s0, c0 s1, ..., c1 s0, ...]
    query_id: str
    support_images: np.ndarray  # (S, H, W, 3) uint8, canonical size
    support_masks: np.ndarray  # (S, H, W) uint8: only the support's own class (j+1), 255 kept
    query_image: np.ndarray  # (H, W, 3) uint8
    query_mask: np.ndarray  # (H, W) uint8, episode labels 0..N, 255 kept
    query_original_mask: np.ndarray  # (h, w) uint8, same labels at the label's original size
    # (top, left, height, width) of the query inside the canonical square (`Dataset.box`):
    # crop the logits to it before upsampling them to query_original_mask's size. None: all.
    query_box: tuple[int, int, int, int] | None = None

    @property
    def ways(self) -> int:
        return len(self.classes)

    @property
    def shots(self) -> int:
        return len(self.support_ids) // len(self.classes)


def label_budget(ids: Sequence[str], fraction: float, seed: int = 0) -> list[str]:
    """The labelled subset of ``ids`` for a budget ``fraction`` in [0, 1].

    One fixed permutation of the sorted, de-duplicated ids per ``seed``; a fraction keeps its
    first ``round(fraction * N)`` ids (rounded half up, at least one when fraction > 0), in
    permutation order. Budgets of one seed are therefore nested prefixes: 5 % ⊂ 10 % ⊂ 20 % ⊂
    100 %, which keeps an ablation's budgets comparable (a larger budget only adds labels).
    """
    if isinstance(fraction, bool) or not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(f"label budget fraction must be in [0, 1], got {fraction!r}")
    pool = sorted({str(i) for i in ids})
    if fraction == 0 or not pool:
        return []
    n = max(1, math.floor(fraction * len(pool) + 0.5))
    order = np.random.default_rng(seed).permutation(len(pool))
    return [pool[k] for k in order[:n]]


def hold_out(labelled: Sequence[str], fraction: float) -> tuple[list[str], list[str]]:
    """Split a labelled subset (in ``label_budget`` order) into (train, held-out) ids.

    Every position ``p`` with ``floor((p + 1) * fraction) > floor(p * fraction)`` is held out
    (positions 4, 9, 14, ... at 0.2), so the held-out share is spread evenly along the
    permutation and both parts stay nested across the budgets of one draw.
    """
    train, held = [], []
    for p, image_id in enumerate(labelled):
        (held if math.floor((p + 1) * fraction) > math.floor(p * fraction) else train).append(
            image_id)
    return train, held


def _label_map(labels: dict[int, int]) -> np.ndarray:
    """Lookup table absolute id -> episode label: the given ids, 255 -> 255, all else 0."""
    lut = np.zeros(256, np.uint8)
    lut[IGNORE_INDEX] = IGNORE_INDEX
    for c, label in labels.items():
        lut[c] = label
    return lut


class EpisodeSampler:
    """Deterministic N-way K-shot episodes from one split of a store dataset.

    ``classes`` are the classes episodes may draw as foreground (a fold's base classes for
    training, its novel classes for testing); ``image_ids`` restricts the pool (a label budget).
    Classes with fewer than ``shots + 1`` eligible images cannot form an episode and are dropped
    with a logged warning (``drop_level``; see ``dropped_classes``); fewer than ``ways`` usable
    classes is an error.
    """

    def __init__(self, dataset: Dataset, *, split: str, classes: Sequence[int], ways: int = 1,
                 shots: int = 1, min_pixels: int = 2 * 32 * 32,
                 image_ids: Sequence[str] | None = None, seed: int = 0,
                 drop_level: int = logging.WARNING):
        if ways < 1 or shots < 1:
            raise ValueError(f"ways and shots must be at least 1, got ways={ways} shots={shots}")
        if min_pixels < 1:
            raise ValueError(f"min_pixels must be at least 1 (an image must hold the class), "
                             f"got {min_pixels}")
        n_classes = len(dataset.classes)
        # Sorted: the same class set draws the same episodes whatever order it was given in.
        wanted = sorted(int(c) for c in classes)
        bad = [c for c in wanted if not 1 <= c < n_classes]
        if bad or not wanted or len(set(wanted)) != len(wanted):
            raise ValueError(f"classes must be distinct foreground ids in 1..{n_classes - 1}, "
                             f"got {list(classes)}")
        split_ids = dataset.split_ids(split)
        if image_ids is None:
            pool = sorted(split_ids)
        else:
            pool = sorted({str(i) for i in image_ids})
            outside = sorted(set(pool) - set(split_ids))
            if outside:
                raise ValueError(f"{len(outside)} image_ids are not ingested images of split "
                                 f"{split!r} of {dataset.name}: {outside[:5]}")
        self.dataset = dataset
        self.split = split
        self.ways, self.shots = int(ways), int(shots)
        self.min_pixels = int(min_pixels)
        self.seed = int(seed)
        self.image_ids: list[str] = pool
        rows = np.asarray([dataset.row(i) for i in pool], dtype=np.int64)
        pixels = dataset.class_pixels[rows] if len(rows) else np.zeros((0, n_classes), np.int64)
        # Sorted id lists: eligibility, and so every episode, is independent of input order.
        self.eligible: dict[int, list[str]] = {
            c: [pool[k] for k in np.flatnonzero(pixels[:, c] >= self.min_pixels)] for c in wanted
        }
        self.classes: list[int] = [c for c in wanted if len(self.eligible[c]) > self.shots]
        self.dropped_classes: list[int] = [c for c in wanted if c not in self.classes]
        if self.dropped_classes:
            counts = {c: len(self.eligible[c]) for c in self.dropped_classes}
            log.log(drop_level, "%s/%s: dropping classes with fewer than %d images of >= %d px "
                    "(class: eligible images) %s", dataset.name, split, self.shots + 1,
                    self.min_pixels, counts)
        if len(self.classes) < self.ways:
            raise ValueError(
                f"{self.ways}-way {self.shots}-shot episodes need {self.ways} classes with at "
                f"least {self.shots + 1} images holding >= {self.min_pixels} px of the class; "
                f"split {split!r} of {dataset.name} ({len(pool)} images) has "
                f"{len(self.classes)}: {self.classes} (dropped {self.dropped_classes})"
            )

    def draw(self, index: int) -> tuple[list[int], list[str], str]:
        """The classes, support ids and query id of episode ``index``, without reading pixels."""
        if index < 0:
            raise ValueError(f"episode index must be >= 0, got {index}")
        rng = np.random.default_rng([self.seed, int(index)])
        classes = [self.classes[k] for k in rng.choice(len(self.classes), self.ways,
                                                       replace=False)]
        candidates = (self.eligible[classes[0]] if self.ways == 1
                      else sorted(set().union(*(self.eligible[c] for c in classes))))
        query = candidates[int(rng.integers(len(candidates)))]
        supports: list[str] = []
        for c in classes:
            others = [i for i in self.eligible[c] if i != query]
            supports += [others[k] for k in rng.choice(len(others), self.shots, replace=False)]
        return classes, supports, query

    def digest(self, n: int) -> str:
        """What episodes ``0 .. n - 1`` are, as 16 hex digits: the dataset version and every
        episode's classes, supports and query. Two runs whose test digests agree were scored on
        the same episodes, which is what lets a bootstrap pair them (`tasks/study/intervals.py`)."""
        h = hashlib.sha256(f"{self.dataset.name}/{self.dataset.version}\n".encode())
        for index in range(n):
            classes, supports, query = self.draw(index)
            h.update(f"{classes}|{supports}|{query}\n".encode())
        return h.hexdigest()[:16]

    def episode(self, index: int) -> Episode:
        """Episode ``index``: depends only on ``(seed, index)``."""
        classes, support_ids, query_id = self.draw(index)
        ds = self.dataset
        k = self.shots
        support_masks = []
        for j, c in enumerate(classes):
            own = _label_map({c: j + 1})  # a support shows only its own class
            support_masks += [own[ds.mask(i)] for i in support_ids[j * k:(j + 1) * k]]
        lut = _label_map({c: j + 1 for j, c in enumerate(classes)})
        return Episode(
            classes=classes,
            support_ids=support_ids,
            query_id=query_id,
            support_images=np.stack([ds.image(i) for i in support_ids]),
            support_masks=np.stack(support_masks),
            query_image=ds.image(query_id),
            query_mask=lut[ds.mask(query_id)],
            query_original_mask=lut[ds.original_mask(query_id)],
            query_box=ds.box(query_id),
        )

    def episodes(self, n: int, start: int = 0) -> Iterator[Episode]:
        """Episodes ``start .. start + n - 1`` (a worker's slice of a test run)."""
        return (self.episode(i) for i in range(start, start + n))

    def __iter__(self) -> Iterator[Episode]:
        """An endless stream of episodes 0, 1, 2, ... (a training stream; slice it)."""
        return (self.episode(i) for i in count())


def episodes_for_step(sampler: EpisodeSampler, step: int, batch_size: int) -> list[Episode]:
    """The episodes training step ``step`` draws: ``step * batch_size + b`` for each ``b``, so a
    step's batch depends only on the sampler's seed and the step (and may be read ahead)."""
    return [sampler.episode(step * batch_size + b) for b in range(batch_size)]


@functools.cache
def _normalised() -> np.ndarray:
    """(3, 256) float32: pixel value v of channel c normalised, ((v / 255) - mean) / std.

    Computed with the float32 operations a whole image took before (each correctly rounded,
    so the same bits per value), then looked up: twice as fast as the arithmetic over a batch
    and without its temporaries (the loader's main cost at 473 px).
    """
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1)
    values = torch.arange(256, dtype=torch.float32).expand(3, 256)
    return ((values / 255 - mean) / std).numpy()


def batch_to_tensors(episodes: Sequence[Episode]) -> dict[str, torch.Tensor]:
    """Stack episodes of one shape into model inputs.

    ``support_img`` (B, S, 3, H, W) and ``query_img`` (B, 3, H, W) float32 normalised with the
    ImageNet mean/std; ``support_mask`` (B, S, H, W) and ``query_mask`` (B, H, W) int64 episode
    labels (255 kept); ``classes`` (B, N) int64 absolute class ids, for per-class scoring.
    """
    if not episodes:
        raise ValueError("batch_to_tensors needs at least one episode")
    shapes = {(e.support_images.shape, e.query_image.shape, len(e.classes)) for e in episodes}
    if len(shapes) != 1:
        raise ValueError(f"episodes of one batch must share ways, shots and size, got {shapes}")
    def images(a: np.ndarray) -> torch.Tensor:
        # uint8 (..., H, W, 3) -> float32 (..., 3, H, W) in channels-last memory, as
        # `movedim(-1, -3).float()` lays it out: a table lookup per channel (_normalised).
        lut = _normalised()
        out = np.empty(a.shape, np.float32)
        for c in range(3):
            np.take(lut[c], a[..., c], out=out[..., c])
        return torch.from_numpy(out).movedim(-1, -3)

    return {
        "support_img": images(np.stack([e.support_images for e in episodes])),
        "support_mask": torch.from_numpy(np.stack([e.support_masks for e in episodes])).long(),
        "query_img": images(np.stack([e.query_image for e in episodes])),
        "query_mask": torch.from_numpy(np.stack([e.query_mask for e in episodes])).long(),
        "classes": torch.tensor([e.classes for e in episodes], dtype=torch.int64),
    }
