"""Segmentation losses and the label encodings they share, all honouring ``ignore_index``.

Ignored pixels (255: object boundaries in VOC, crowd regions, padding) are excluded from every
numerator *and* denominator here. The UMTFSS reference Dice loss counts them (docs/architecture.md,
known traps), which rewards predicting background on boundaries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from models.conventions import IGNORE_INDEX  # noqa: F401 - the label every loss here ignores


def pixel_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy of logits (B, C, H, W) against labels (B, H, W), ``IGNORE_INDEX``
    pixels left out: the training objective of the per-pixel classifiers (MetaSegNet, PANet)."""
    return F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)


def onehot_targets(labels: Tensor, n_classes: int, ignore_index: int = 255) -> Tensor:
    """Labels (...) in ``{0..n_classes-1, ignore_index}`` → float one-hot (..., n_classes).

    Ignored pixels become all-zero rows, so anything that sums or averages over them (masked
    average pooling, the ridge base learner's weights) leaves them out.
    """
    valid = labels != ignore_index
    if bool(((labels < 0) | (labels >= n_classes))[valid].any()):
        raise ValueError(f"labels outside 0..{n_classes - 1} (and not {ignore_index})")
    onehot = F.one_hot(torch.where(valid, labels, 0).long(), n_classes).float()
    return onehot * valid.unsqueeze(-1)


def downsample_labels(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest-neighbour resize of integer label maps (..., H, W) → (..., h, w).

    Nearest never mixes labels, so ``ignore_index`` survives as is. Cell i takes pixel
    ``floor(i·H/h)``, close to where a stride-(H/h) "same"-padded conv stack centres cell i.
    """
    lead = labels.shape[:-2]
    flat = labels.reshape(-1, 1, *labels.shape[-2:]).float()
    out = F.interpolate(flat, size=size, mode="nearest")
    return out.reshape(*lead, *size).to(labels.dtype)


def masked_cross_entropy(
    logits: Tensor, target: Tensor, ignore_index: int = 255, weight: Tensor | None = None
) -> Tensor:
    """Pixel-wise cross-entropy over non-ignored pixels: logits (B, C, H, W), target (B, H, W).

    Unlike ``F.cross_entropy``, a batch whose pixels are all ignored gives 0 (with a gradient
    path), not NaN.
    """
    if logits.shape[-2:] != target.shape[-2:]:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ")
    if not bool((target != ignore_index).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target.long(), weight=weight, ignore_index=ignore_index)


def dice_loss(
    logits_or_probs: Tensor,
    target: Tensor,
    ignore_index: int = 255,
    *,
    from_logits: bool = True,
    smooth: float = 1.0,
) -> Tensor:
    """Binary soft Dice loss over both channels (background and foreground), as UMTFSS defines it.

    ``logits_or_probs``: (B, H, W) or (B, 1, H, W) foreground scores (sigmoid applied when
    ``from_logits``; the background probability is ``1 - fg``), or (B, 2, H, W)
    background/foreground scores (softmax applied when ``from_logits``; channel 1 is the
    foreground). ``target``: (B, H, W) in ``{0, 1, ignore_index}``.

    For each image and each channel c ∈ {background, foreground}, with p_c the predicted
    probability and t_c the one-hot target, ``1 - (2Σp_c·t_c + s) / (Σp_c + Σt_c + s)``; the two
    channel losses are averaged, then the images. Scoring the background too is what keeps a
    small object from making "all foreground" the cheap answer: on a 10 % object, all foreground
    costs ≈0.91 and all background ≈0.53 (s → 0), where a foreground-only Dice gives 0.82 vs 1.

    Deviations from the reference (``weighted_dice_loss``): ignored pixels count in neither the
    overlaps nor the sizes (the reference counts their predictions in the sizes); the channel
    losses are averaged, not summed (half the reference's scale); sizes are Σp, not Σp², and
    smoothing ``s`` replaces the reference's ``eps`` clamp; a 2-channel input is a softmax
    rather than two independent sigmoids.
    """
    x = logits_or_probs
    if x.dim() == 4 and x.shape[1] == 2:
        probs = x.softmax(dim=1) if from_logits else x
        bg, fg = probs[:, 0], probs[:, 1]
    elif x.dim() == 4 and x.shape[1] == 1:
        fg = x[:, 0].sigmoid() if from_logits else x[:, 0]
        bg = 1 - fg
    elif x.dim() == 3:
        fg = x.sigmoid() if from_logits else x
        bg = 1 - fg
    else:
        raise ValueError(f"expected (B, H, W), (B, 1, H, W) or (B, 2, H, W), got {tuple(x.shape)}")
    if fg.shape != target.shape:
        raise ValueError(f"prediction {tuple(fg.shape)} and target {tuple(target.shape)} differ")
    valid = target != ignore_index
    if bool(((target != 0) & (target != 1) & valid).any()):
        raise ValueError(f"dice_loss is binary: target must be 0, 1 or {ignore_index}")

    valid = valid.to(fg.dtype)
    p = torch.stack((bg, fg), dim=1) * valid.unsqueeze(1)  # (B, 2, H, W)
    t = torch.stack((target == 0, target == 1), dim=1).to(fg.dtype) * valid.unsqueeze(1)
    dims = tuple(range(2, p.dim()))
    inter = (p * t).sum(dims)
    dice = (2 * inter + smooth) / (p.sum(dims) + t.sum(dims) + smooth)  # (B, 2)
    return (1 - dice).mean(dim=1).mean()
