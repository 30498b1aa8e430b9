"""The trivial baselines behave as their names say."""

from __future__ import annotations

import torch

from models.baselines import AllForeground, ColourHistogram
from models.conventions import IMAGENET_MEAN, IMAGENET_STD


def _normalise(rgb: torch.Tensor) -> torch.Tensor:
    mean = torch.as_tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.as_tensor(IMAGENET_STD).view(3, 1, 1)
    return (rgb - mean) / std


def test_all_foreground() -> None:
    logits = AllForeground()(torch.zeros(2, 1, 3, 8, 8), torch.zeros(2, 1, 8, 8).long(),
                             torch.zeros(2, 3, 8, 8))
    assert logits.shape == (2, 2, 8, 8) and (logits.argmax(1) == 1).all()
    # Its objective, the learned models' pixel cross-entropy, is lower where the truth is
    # foreground; 255 pixels count nowhere.
    target = torch.ones(2, 8, 8, dtype=torch.long)
    batch = {"support_img": torch.zeros(2, 1, 3, 8, 8),
             "support_mask": torch.ones(2, 1, 8, 8, dtype=torch.long),
             "query_img": torch.zeros(2, 3, 8, 8), "query_mask": target}
    fg = AllForeground().compute_objective(batch, 1)
    target[:, :, 4:] = 0
    half = AllForeground().compute_objective(batch, 1)
    target[:, :, 4:] = 255
    assert fg < half
    torch.testing.assert_close(AllForeground().compute_objective(batch, 1), fg)


def test_colour_histogram_separates_colours_and_ignores_255() -> None:
    red, blue = torch.tensor([0.9, 0.1, 0.1]), torch.tensor([0.1, 0.1, 0.9])
    support = torch.empty(3, 8, 8)
    support[:, :, :4], support[:, :, 4:] = red.view(3, 1, 1), blue.view(3, 1, 1)
    mask = torch.zeros(8, 8, dtype=torch.long)
    mask[:, :4] = 1  # red is the class
    mask[0, :] = 255  # ignored pixels must not count
    query = torch.empty(3, 8, 8)
    query[:, :4], query[:, 4:] = blue.view(3, 1, 1), red.view(3, 1, 1)
    logits = ColourHistogram()(_normalise(support)[None, None], mask[None, None],
                               _normalise(query)[None])
    pred = logits.argmax(1)[0]
    assert (pred[:4] == 0).all() and (pred[4:] == 1).all()
