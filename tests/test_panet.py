"""PANet baseline: masked average pooling, prototypes, cosine matching and the PAR loss."""

from __future__ import annotations

import pytest
import torch

from models.backbones import small_resnet
from models.panet import PANet, cosine_logits, masked_average_pool, soft_masks


def _episode(
    b: int, n_ways: int, shots: int, size: int = 40
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    s = n_ways * shots
    mask = torch.zeros(b, s, size, size, dtype=torch.long)
    for i in range(s):
        mask[:, i, 4 + i : 24 + i, 6:30] = i // shots + 1
    mask[:, :, -3:] = 255
    return torch.randn(b, s, 3, size, size), mask, torch.randn(b, 3, size, size)


def test_masked_average_pool_by_hand() -> None:
    feats = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[10.0, 20.0], [30.0, 40.0]]]])  # (1,2,2,2)
    masks = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]], [[0.0, 0.5], [0.0, 1.0]]]])  # (1,2,2,2)
    protos = masked_average_pool(feats, masks, eps=0.0)
    expected = torch.tensor(
        [[[(1 + 3) / 2, (10 + 30) / 2], [(0.5 * 2 + 4) / 1.5, (0.5 * 20 + 40) / 1.5]]]
    )
    torch.testing.assert_close(protos, expected)
    empty = masked_average_pool(feats, torch.zeros(1, 1, 2, 2))
    assert torch.equal(empty, torch.zeros(1, 1, 2))


def test_soft_masks_are_coverage_and_skip_ignore() -> None:
    labels = torch.tensor([[[0, 1, 1, 1], [0, 255, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]]])
    m = soft_masks(labels, 2, (2, 2))
    torch.testing.assert_close(m[0, 1], torch.tensor([[0.25, 1.0], [0.0, 0.0]]))
    torch.testing.assert_close(m[0, 0], torch.tensor([[0.5, 0.0], [1.0, 1.0]]))


def test_prototypes_average_over_images_containing_the_class() -> None:
    model = PANet(backbone=small_resnet(width=8))
    feats = torch.zeros(1, 3, 2, 4, 4)
    feats[0, 0, :, :2] = 1.0  # image 0: class-1 region has value 1, background 0
    feats[0, 1, :, :2] = 3.0  # image 1: class-1 region has value 3
    feats[0, 2] = 7.0  # image 2: only background, value 7
    mask = torch.zeros(1, 3, 4, 4, dtype=torch.long)
    mask[0, :2, :2] = 1
    protos = model.prototypes(feats, mask, n_ways=1)
    # Class 1 from images 0 and 1 only; background from all three: (0 + 0 + 7) / 3.
    torch.testing.assert_close(protos[0, 1], torch.full((2,), 2.0))
    torch.testing.assert_close(protos[0, 0], torch.full((2,), 7 / 3), atol=1e-4, rtol=0)


def test_cosine_identical_features_peak_at_matching_prototype() -> None:
    torch.manual_seed(0)
    protos = torch.randn(1, 3, 8)
    feats = protos[0, 2].reshape(1, 8, 1, 1).expand(1, 8, 2, 3)
    logits = cosine_logits(feats, protos, scale=20.0)
    assert logits.shape == (1, 3, 2, 3)
    assert (logits.argmax(dim=1) == 2).all()
    torch.testing.assert_close(logits[0, 2], torch.full((2, 3), 20.0))


@pytest.mark.parametrize(("n_ways", "shots"), [(1, 1), (2, 3)])
def test_shapes_and_align_loss(n_ways: int, shots: int) -> None:
    torch.manual_seed(0)
    model = PANet(backbone=small_resnet(width=8))
    support, mask, query = _episode(2, n_ways, shots)
    logits = model(support, mask, query, n_ways)
    assert logits.shape == (2, n_ways + 1, 40, 40)
    logits, align = model(support, mask, query, n_ways, return_align_loss=True)
    assert align.dim() == 0 and torch.isfinite(align)
    (logits.logsumexp(dim=1).mean() + align).backward()
    assert model.backbone.conv1.weight.grad.abs().sum() > 0


def test_align_loss_skips_classes_the_query_does_not_show() -> None:
    torch.manual_seed(0)
    model = PANet(backbone=small_resnet(width=8))
    support, mask, query = _episode(1, 1, 2)
    feats = model.features(torch.cat([support[0], query]))
    s_feats, q_feats = feats[:2][None], feats[2:]
    all_bg = torch.zeros(1, 2, *q_feats.shape[-2:])
    all_bg[:, 0] = 1.0  # the query prediction is background everywhere
    loss = model.align_loss(all_bg, q_feats, s_feats, mask, n_ways=1)
    assert loss.item() == 0.0
    some_fg = all_bg.clone()
    some_fg[:, 1, 2:4, 2:4] = 2.0
    loss = model.align_loss(some_fg, q_feats, s_feats, mask, n_ways=1)
    assert loss.item() > 0
    loss.backward()
    assert model.backbone.layer4[0].conv1.weight.grad.abs().sum() > 0


def test_objective_is_cross_entropy_plus_weighted_alignment() -> None:
    torch.manual_seed(0)
    support, mask, query = _episode(2, 1, 1)
    target = mask[:, 0]
    batch = {"support_img": support, "support_mask": mask, "query_img": query,
             "query_mask": target}
    for weight in (0.0, 0.5):
        model = PANet(backbone=small_resnet(width=8), align_weight=weight).eval()
        logits, align = model(support, mask, query, 1, return_align_loss=True)
        ce = torch.nn.functional.cross_entropy(logits, target, ignore_index=255)
        assert align > 0
        torch.testing.assert_close(model.compute_objective(batch, 1), ce + weight * align)
