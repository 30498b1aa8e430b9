"""MetaSegNet: episode shapes, gradient flow, ablation switches and a one-episode overfit."""

from __future__ import annotations

import pytest
import torch

from models.backbones import small_resnet
from models.losses import dice_loss, downsample_labels, masked_cross_entropy, onehot_targets
from models.metasegnet import MetaSegNet


def _tiny(**kw: object) -> MetaSegNet:
    return MetaSegNet(
        backbone=small_resnet(width=8), embed_dim=16, global_dim=32, local_dim=16, **kw
    )


def _episode(
    b: int, n_ways: int, shots: int, size: int = 40
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    s = n_ways * shots
    support = torch.randn(b, s, 3, size, size)
    mask = torch.zeros(b, s, size, size, dtype=torch.long)
    for i in range(s):  # way-major: support i shows class i // shots as label i // shots + 1
        mask[:, i, 5 + i : 20 + i, 8:25] = i // shots + 1
    mask[:, :, :2] = 255
    return support, mask, torch.randn(b, 3, size, size)


@pytest.mark.parametrize(("n_ways", "shots"), [(1, 1), (1, 5), (2, 1), (2, 5)])
def test_output_shapes(n_ways: int, shots: int) -> None:
    torch.manual_seed(0)
    model = _tiny()
    support, mask, query = _episode(2, n_ways, shots)
    out = model(support, mask, query, n_ways)
    assert out.shape == (2, n_ways + 1, 40, 40)
    assert torch.isfinite(out).all()


def test_features_shape_and_norm() -> None:
    torch.manual_seed(0)
    model = _tiny().eval()
    with torch.no_grad():
        emb = model.features(torch.randn(3, 3, 40, 40))
    assert model.stride == 4
    assert emb.shape == (3, 16, 10, 10)
    torch.testing.assert_close(emb.norm(dim=1), torch.full((3, 10, 10), 4.0))


def test_gradients_reach_backbone_and_ridge_parameters() -> None:
    torch.manual_seed(0)
    model = _tiny()
    support, mask, query = _episode(1, 2, 1)
    target = torch.randint(0, 3, (1, 40, 40))
    masked_cross_entropy(model(support, mask, query, 2), target).backward()
    for p in (model.backbone.conv1.weight, model.backbone.layer4[0].conv2.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert model.base_learner.log_lambda.grad is not None
    assert model.base_learner.log_lambda.grad != 0
    assert model.base_learner.log_scale.grad != 0


@pytest.mark.parametrize("switch", [{"use_global": False}, {"use_local": False}])
def test_ablation_switches(switch: dict[str, bool]) -> None:
    torch.manual_seed(0)
    model = _tiny(**switch)
    support, mask, query = _episode(1, 2, 2)
    out = model(support, mask, query, 2)
    assert out.shape == (1, 3, 40, 40)
    out.sum().backward()
    assert model.backbone.conv1.weight.grad is not None
    if switch.get("use_global") is False:
        assert len(model.global_branch.pools) == 0
    else:
        assert model.stride == 8


# models/losses.py is shared by the models and the trainers; its checks live here.


def test_onehot_targets_zero_rows_for_ignore() -> None:
    oh = onehot_targets(torch.tensor([0, 2, 255]), 3)
    assert oh.tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 0]]
    with pytest.raises(ValueError):
        onehot_targets(torch.tensor([3]), 3)


def test_dice_loss_excludes_ignored_pixels() -> None:
    torch.manual_seed(0)
    target = torch.randint(0, 2, (2, 8, 8))
    target[:, :2] = 255
    probs = (target == 1).float()
    assert dice_loss(probs, target, from_logits=False).item() == pytest.approx(0.0)
    # Whatever is predicted on ignored pixels changes nothing.
    noisy = probs.clone()
    noisy[:, :2] = torch.rand(2, 2, 8)
    assert dice_loss(noisy, target, from_logits=False).item() == pytest.approx(0.0)
    logit = torch.randn(2, 8, 8, requires_grad=True)
    two_class = torch.stack([torch.zeros_like(logit), logit], dim=1)  # softmax = sigmoid
    loss = dice_loss(two_class, target)
    torch.testing.assert_close(loss, dice_loss(logit[:, None], target))
    loss.backward()
    assert torch.isfinite(logit.grad).all() and logit.grad[:, :2].abs().sum() == 0
    with pytest.raises(ValueError):
        dice_loss(logit, torch.full((2, 8, 8), 2))


def _object_10pct() -> torch.Tensor:
    """(1, 100, 100) target, a 10 × 100 foreground band: 1000 fg and 9000 bg pixels."""
    target = torch.zeros(1, 100, 100, dtype=torch.long)
    target[:, :10] = 1
    return target


def test_dice_loss_scores_background_too() -> None:
    """Both channels: on a 10 % object, all background beats all foreground (no fg collapse)."""
    target = _object_10pct()
    s = 1.0  # the default smoothing
    n_fg, n_bg = 1000.0, 9000.0
    all_fg = torch.ones(1, 100, 100)
    all_bg = torch.zeros(1, 100, 100)
    # All foreground: bg Dice (0 + s)/(0 + n_bg + s), fg Dice (2·n_fg + s)/(n_fg+n_fg+n_bg + s).
    exp_fg = 1 - ((s / (n_bg + s)) + (2 * n_fg + s) / (2 * n_fg + n_bg + s)) / 2
    # All background: bg Dice (2·n_bg + s)/(n_bg+n_fg+n_bg + s), fg Dice (0 + s)/(0 + n_fg + s).
    exp_bg = 1 - ((2 * n_bg + s) / (2 * n_bg + n_fg + s) + s / (n_fg + s)) / 2
    loss_fg = dice_loss(all_fg, target, from_logits=False).item()
    loss_bg = dice_loss(all_bg, target, from_logits=False).item()
    assert loss_fg == pytest.approx(exp_fg, rel=1e-5)
    assert loss_bg == pytest.approx(exp_bg, rel=1e-5)
    assert loss_fg == pytest.approx(0.909, abs=1e-3)  # s → 0: 1 - (0 + 2/11)/2
    assert loss_bg == pytest.approx(0.526, abs=1e-3)  # s → 0: 1 - (18/19 + 0)/2
    assert loss_bg < loss_fg
    # Perfect prediction → 0, also as saturated 2-channel logits.
    assert dice_loss(target.float(), target, from_logits=False).item() == pytest.approx(0.0)
    logits = torch.stack(((target == 0).float(), (target == 1).float()), 1) * 50
    assert dice_loss(logits, target).item() == pytest.approx(0.0, abs=1e-6)


def test_dice_loss_ignored_pixels_and_channel_layouts() -> None:
    g = torch.Generator().manual_seed(0)
    target = _object_10pct().repeat(2, 1, 1)
    target[:, 40:60] = 255
    probs = torch.rand(2, 100, 100, generator=g)
    flipped = probs.clone()
    flipped[:, 40:60] = 1 - flipped[:, 40:60]
    flipped[0, 50:60] = 1.0  # and some saturated
    a = dice_loss(probs, target, from_logits=False)
    torch.testing.assert_close(a, dice_loss(flipped, target, from_logits=False))
    # Ignoring 255 = dropping those rows: the same loss as on the image without them.
    kept = torch.cat((probs[:, :40], probs[:, 60:]), 1)
    torch.testing.assert_close(
        a, dice_loss(kept, torch.cat((target[:, :40], target[:, 60:]), 1), from_logits=False)
    )
    # (B, H, W), (B, 1, H, W) and (B, 2, H, W) agree, on probabilities and on logits.
    two = torch.stack((1 - probs, probs), 1)
    torch.testing.assert_close(a, dice_loss(probs[:, None], target, from_logits=False))
    torch.testing.assert_close(a, dice_loss(two, target, from_logits=False))
    logit = torch.randn(2, 100, 100, generator=g)
    ref = dice_loss(logit, target)
    torch.testing.assert_close(ref, dice_loss(logit[:, None], target))
    two_logits = torch.stack((torch.zeros_like(logit), logit), 1)  # softmax = sigmoid
    torch.testing.assert_close(ref, dice_loss(two_logits, target))
    # Own per-image, per-channel expectation (smoothing 1).
    valid = target != 255
    exp = []
    for i in range(2):
        for c, pc in ((0, 1 - probs[i]), (1, probs[i])):
            tc = (target[i] == c)[valid[i]].float()
            pv = pc[valid[i]]
            exp.append(1 - (2 * (pv * tc).sum() + 1) / (pv.sum() + tc.sum() + 1))
    torch.testing.assert_close(a, torch.stack(exp).mean())


def test_masked_cross_entropy_all_ignored_is_zero() -> None:
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    loss = masked_cross_entropy(logits, torch.full((1, 4, 4), 255))
    assert loss.item() == 0.0
    loss.backward()
    target = torch.randint(0, 3, (1, 4, 4))
    ref = torch.nn.functional.cross_entropy(logits, target)
    torch.testing.assert_close(masked_cross_entropy(logits, target), ref)


def test_downsample_labels_keeps_ignore() -> None:
    labels = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [255, 255, 2, 2], [255, 255, 2, 2]])
    out = downsample_labels(labels[None, None], (2, 2))
    assert out.tolist() == [[[[0, 1], [255, 2]]]]


def _square_image(y: int, x: int, side: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    img = 0.5 * torch.randn(3, size, size)
    img[:, y : y + side, x : x + side] += 2.0
    mask = torch.zeros(size, size, dtype=torch.long)
    mask[y : y + side, x : x + side] = 1
    return img, mask


def test_overfits_one_episode() -> None:
    # Default architecture, from scratch: a bright square on noise, different place and size in
    # support and query. Evaluated in eval mode (running BatchNorm statistics).
    torch.manual_seed(0)
    support, s_mask = _square_image(6, 8, 16, 48)
    query, q_mask = _square_image(22, 20, 18, 48)
    model = MetaSegNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    args = (support[None, None], s_mask[None, None], query[None], 1)
    for _ in range(25):
        loss = masked_cross_entropy(model(*args), q_mask[None])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        pred = model(*args).argmax(dim=1)[0]
    iou = ((pred == 1) & (q_mask == 1)).sum() / ((pred == 1) | (q_mask == 1)).sum()
    assert iou > 0.8
