"""Trivial few-shot baselines: every table reports them so a learned model's number has a floor.

Both take the same inputs as the learned models (ImageNet-normalised images, episode masks with
labels 0..N and 255) and return (B, N + 1, H, W) scores. Neither has parameters to train; their
``compute_objective`` (the learned models' pixel cross-entropy) scores them on a batch.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from models.conventions import IMAGENET_MEAN, IMAGENET_STD
from models.losses import pixel_cross_entropy

_MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


class _Baseline(nn.Module):
    def compute_objective(self, batch: Mapping[str, Tensor], n_ways: int) -> Tensor:
        """Pixel cross-entropy of the query (keys as in ``MetaSegNet.compute_objective``)."""
        logits = self(batch["support_img"], batch["support_mask"], batch["query_img"], n_ways)
        return pixel_cross_entropy(logits, batch["query_mask"])


class AllForeground(_Baseline):
    """Predicts episode class 1 everywhere: the floor of any 1-way model."""

    def forward(self, support_img: Tensor, support_mask: Tensor, query_img: Tensor,
                n_ways: int = 1) -> Tensor:
        b, _, h, w = query_img.shape
        logits = torch.zeros(b, n_ways + 1, h, w, device=query_img.device)
        logits[:, 1] = 1.0
        return logits


class ColourHistogram(_Baseline):
    """Per-pixel colour likelihood: RGB histograms of each class's support pixels.

    A pixel goes to the class whose (Laplace-smoothed) colour histogram gives it the highest
    probability. On the synthetic benchmark colour alone is ambiguous by design, so this shows
    how much a learned model gains beyond colour.
    """

    def __init__(self, bins: int = 8):
        super().__init__()
        self.bins = bins

    def _codes(self, img: Tensor) -> Tensor:
        rgb = (img * _STD.to(img.device) + _MEAN.to(img.device)).clamp(0, 1)
        q = (rgb * self.bins).long().clamp(max=self.bins - 1)
        return (q[:, 0] * self.bins + q[:, 1]) * self.bins + q[:, 2]  # (B, H, W)

    def forward(self, support_img: Tensor, support_mask: Tensor, query_img: Tensor,
                n_ways: int = 1) -> Tensor:
        b, s = support_img.shape[:2]
        n_codes = self.bins**3
        codes = self._codes(support_img.flatten(0, 1)).view(b, -1)
        labels = support_mask.reshape(b, -1)
        hist = torch.ones(b, n_ways + 1, n_codes, device=query_img.device)  # Laplace smoothing
        valid = labels != 255
        index = labels.clamp(max=n_ways) * n_codes + codes
        flat = hist.view(b, -1)
        flat.scatter_add_(1, torch.where(valid, index, 0), valid.float())
        prob = hist / hist.sum(-1, keepdim=True)
        q = self._codes(query_img).view(b, -1)  # (B, HW)
        scores = torch.gather(prob.log(), 2, q.unsqueeze(1).expand(-1, n_ways + 1, -1))
        return scores.view(b, n_ways + 1, *query_img.shape[-2:])


BASELINES: dict[str, type[nn.Module]] = {"all-foreground": AllForeground,
                                         "colour-histogram": ColourHistogram}
