"""The protocol's metrics (docs/architecture.md, "Protocol"): class mIoU and FB-IoU over test
episodes.

mIoU: for each class, intersections and unions are *summed over every episode* it appears in
and divided once at the end (PFENet/HSNet), then averaged over the fold's classes. This is not
the mean of per-episode IoUs: a large object weighs more than a small one. A class whose
accumulated union is zero (never drawn, or drawn only where neither the label nor the
prediction holds it) has no IoU and is left out of the mean rather than counted as 0 or 1.
FB-IoU: foreground (label > 0) and background (label 0) IoU, each accumulated over all
episodes, averaged. Pixels labelled 255 are ignored everywhere.

A meter holds only integer sums, so meters of workers that scored disjoint episodes merge
exactly into the meter a single worker would have produced.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from models.conventions import IGNORE_INDEX


def _numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _iou(inter: np.ndarray | int, union: np.ndarray | int) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(inter, np.float64) / np.asarray(union, np.float64)


class SegmentationMeter:
    """Accumulates per-class and foreground/background intersections and unions."""

    def __init__(self, classes: Sequence[int]):
        self.classes: list[int] = [int(c) for c in classes]
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be distinct, got {list(classes)}")
        self._pos = {c: k for k, c in enumerate(self.classes)}
        n = len(self.classes)
        self.intersection = np.zeros(n, np.int64)
        self.union = np.zeros(n, np.int64)
        self.class_episodes = np.zeros(n, np.int64)  # episodes each class took part in
        self.fb_intersection = np.zeros(2, np.int64)  # [background, foreground]
        self.fb_union = np.zeros(2, np.int64)
        self.n_episodes = 0

    def update(self, pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor,
               episode_classes: Sequence[int]) -> list[tuple[int, int, int]]:
        """Add one episode: ``pred`` and ``target`` (H, W) in episode labels 0..N (target may
        hold 255); episode label j+1 belongs to absolute class ``episode_classes[j]``.

        Returns the episode's (class id, intersection, union) per episode class: the rows that
        a bootstrap over episodes resamples (``tasks/study/intervals.py``)."""
        p, t = _numpy(pred), _numpy(target)
        if p.shape != t.shape or p.ndim != 2:
            raise ValueError(f"pred and target must be (H, W) of one shape, got {p.shape} and "
                             f"{t.shape}: upsample the logits to the label's size first")
        unknown = [c for c in episode_classes if int(c) not in self._pos]
        if unknown:
            raise ValueError(f"episode classes {unknown} are not among this meter's classes "
                             f"{self.classes}")
        valid = t != IGNORE_INDEX
        p, t = p[valid], t[valid]
        rows = []
        for j, c in enumerate(episode_classes):
            pj, tj = p == j + 1, t == j + 1
            k = self._pos[int(c)]
            inter, union = np.count_nonzero(pj & tj), np.count_nonzero(pj | tj)
            self.intersection[k] += inter
            self.union[k] += union
            self.class_episodes[k] += 1
            rows.append((int(c), int(inter), int(union)))
        for k, (pk, tk) in enumerate(((p == 0, t == 0), (p > 0, t > 0))):
            self.fb_intersection[k] += np.count_nonzero(pk & tk)
            self.fb_union[k] += np.count_nonzero(pk | tk)
        self.n_episodes += 1
        return rows

    def per_class(self) -> dict[int, float]:
        """IoU of each class with a non-zero accumulated union."""
        iou = _iou(self.intersection, self.union)
        return {c: float(iou[k]) for k, c in enumerate(self.classes) if self.union[k] > 0}

    def miou(self) -> float:
        """Mean over the scored classes of summed-intersection / summed-union (nan if none)."""
        scores = list(self.per_class().values())
        return float(np.mean(scores)) if scores else float("nan")

    def fbiou(self) -> float:
        """Mean of accumulated background and foreground IoU (a side without pixels is left
        out; nan before any pixel was scored)."""
        scored = self.fb_union > 0
        if not scored.any():
            return float("nan")
        return float(_iou(self.fb_intersection[scored], self.fb_union[scored]).mean())

    def summary(self) -> dict[str, float]:
        """Flat metrics for logging: ``miou``, ``fbiou``, ``episodes``, ``iou/<class id>``."""
        out = {"miou": self.miou(), "fbiou": self.fbiou(), "episodes": float(self.n_episodes)}
        out.update({f"iou/{c}": v for c, v in self.per_class().items()})
        return out

    def merge(self, other: SegmentationMeter) -> None:
        """Add another meter's sums (same classes): split evaluation combines exactly."""
        if other.classes != self.classes:
            raise ValueError(f"cannot merge meters over different classes: {self.classes} vs "
                             f"{other.classes}")
        self.intersection += other.intersection
        self.union += other.union
        self.class_episodes += other.class_episodes
        self.fb_intersection += other.fb_intersection
        self.fb_union += other.fb_union
        self.n_episodes += other.n_episodes


def episode_iou(pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor,
                ways: int) -> float:
    """Mean IoU over the episode's classes 1..ways in one episode (for display, not scoring);
    a class absent from both prediction and label is left out (nan if all are)."""
    p, t = _numpy(pred), _numpy(target)
    valid = t != IGNORE_INDEX
    p, t = p[valid], t[valid]
    scores = []
    for label in range(1, ways + 1):
        union = np.count_nonzero((p == label) | (t == label))
        if union:
            scores.append(np.count_nonzero((p == label) & (t == label)) / union)
    return float(np.mean(scores)) if scores else float("nan")


def upsample_logits_to(logits: torch.Tensor, size: tuple[int, int],
                       box: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """Bilinear (align_corners=False) resize of (B, C, h, w) logits to ``size`` (H, W).

    Score at the label's original size (preset "pfenet": the default) or at the canonical size
    (preset "hsnet"); take the argmax *after* resizing so that boundaries are interpolated.
    ``box`` (top, left, height, width: ``Dataset.box``, ``Episode.query_box``) is where the
    image lies in the canonical square: the logits are cropped to it first, so the padding of
    a resize "pad" dataset is cut away and the image alone is stretched back to ``size``. A
    box covering the whole square (every "square" dataset) changes nothing.
    """
    if logits.ndim != 4:
        raise ValueError(f"logits must be (B, C, h, w), got shape {tuple(logits.shape)}")
    if box is not None:
        top, left, h, w = (int(v) for v in box)
        if top < 0 or left < 0 or h < 1 or w < 1 or top + h > logits.shape[-2] or (
                left + w > logits.shape[-1]):
            raise ValueError(f"box {tuple(box)} is not inside the logits' "
                             f"{tuple(logits.shape[-2:])}")
        logits = logits[..., top:top + h, left:left + w]
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
