"""Tests for the UMTFSS few-shot segmentation Transformer (models/umt.py)."""

from __future__ import annotations

import pytest
import torch

from models.umt import UMTTransformer, sine_positional_encoding, support_cells

H = W = 64  # 8 x 8 feature cells at output stride 8


def _backbone(dilated: bool = True):
    from models.backbones import small_resnet

    return small_resnet(width=8, dilated=dilated)


def _model(dilated: bool = True, **kw) -> UMTTransformer:
    torch.manual_seed(0)
    kw = {"dim": 32, "heads": 4, "n_fg_protos": 5, "n_bg_protos": 8, **kw}
    return UMTTransformer(_backbone(dilated), **kw)


def _episode(b: int = 2, k: int = 1, h: int = H, w: int = W, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    support_img = torch.randn(b, k, 3, h, w, generator=g)
    query_img = torch.randn(b, 3, h, w, generator=g)
    support_mask = torch.zeros(b, k, h, w, dtype=torch.long)
    support_mask[..., 8:40, 16:48] = 1
    support_mask[..., :4, :] = 255
    return support_img, support_mask, query_img


def _cross_attention_padding(model: UMTTransformer) -> list[torch.Tensor]:
    """Record the key padding masks the prototype cross-attention receives."""
    seen: list[torch.Tensor] = []

    def hook(_module, _args, kwargs):
        seen.append(kwargs["key_padding_mask"])

    model.blocks[0].cross_attn.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


@pytest.mark.parametrize("shots", [1, 5])
def test_output_shape(shots):
    model = _model().eval()
    si, sm, qi = _episode(k=shots)
    with torch.no_grad():
        out = model(si, sm, qi)
    assert out.shape == (2, 2, H, W)
    assert torch.isfinite(out).all()


def test_non_square_images_and_undilated_backbone():
    # layer3/layer4 sit at strides 16/32 here and are resized onto layer2's grid.
    model = _model(dilated=False).eval()
    si, sm, qi = _episode(b=1, k=2, h=64, w=48)
    with torch.no_grad():
        out = model(si, sm, qi)
    assert out.shape == (1, 2, 64, 48)
    assert torch.isfinite(out).all()


def test_frozen_backbone_keeps_stats_and_gets_no_gradient():
    model = _model().train()
    assert model.training and not model.backbone.training
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    si, sm, qi = _episode(k=2)
    target = sm[:, 0]
    model.loss(model(si, sm, qi), target, ce_weight=1.0).backward()

    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in model.backbone.parameters())
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith("backbone.") for n in trainable)
    for name, p in trainable.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # The support branch is reached through the prototypes (masked average and clusters).
    assert model.reduce_support[0][0].weight.grad.abs().sum() > 0
    assert model.proto_type.weight.grad[:2].abs().sum() > 0


def test_precomputed_features_match_images():
    model = _model().eval()
    si, sm, qi = _episode(k=3)
    with torch.no_grad():
        from_images = model(si, sm, qi)
        cached = {"query": model.extract(qi), "support": model.extract(si)}
        from_cache = model(None, sm, None, features=cached)
        # The raw backbone output (extra "layer1" key, support reshaped to (B, K, C, h, w)).
        raw_support = {
            t: f.view(2, 3, *f.shape[1:]) for t, f in model.backbone(si.flatten(0, 1)).items()
        }
        raw = {"query": model.backbone(qi), "support": raw_support}
        from_raw = model(si, sm, qi, features=raw)
    assert cached["support"]["layer2"].shape[:2] == (2, 3)
    assert torch.equal(from_images, from_cache)
    assert torch.equal(from_images, from_raw)


def test_objective_is_dice_plus_weighted_ce_from_images_or_cached_features():
    si, sm, qi = _episode(k=2)
    target = sm[:, 0].clone()
    target[:, :4] = 0  # a query label without the support's 255 rows
    for weight in (0.0, 0.5):
        model = _model(ce_weight=weight).eval()
        with torch.no_grad():
            want = model.loss(model(si, sm, qi), target, ce_weight=weight)
            batch = {"support_img": si, "support_mask": sm, "query_img": qi,
                     "query_mask": target}
            assert torch.equal(model.compute_objective(batch), want)
            cached = {"support_mask": sm, "query_mask": target,  # no images: features instead
                      "features": {"query": model.extract(qi), "support": model.extract(si)}}
            assert torch.equal(model.compute_objective(cached, 1), want)
    with pytest.raises(ValueError, match="1-way"):
        model(si, sm, qi, 2)


def test_extract_builds_no_graph_when_frozen():
    model = _model()
    feats = model.extract(torch.randn(1, 2, 3, H, W))
    assert set(feats) == {"layer2", "layer3", "layer4"}
    assert feats["layer4"].shape[:2] == (1, 2)
    assert not any(f.requires_grad for f in feats.values())


def test_tiny_object_pads_prototypes():
    model = _model().eval()
    seen = _cross_attention_padding(model)
    si, _, qi = _episode(b=2, k=1)
    sm = torch.zeros(2, 1, H, W, dtype=torch.long)
    sm[0, 0, 8:16, 8:32] = 1  # exactly 3 feature cells
    sm[1, 0, 20, 20:23] = 1  # a 3-pixel object inside one cell
    with torch.no_grad():
        out = model(si, sm, qi)
    assert torch.isfinite(out).all()
    valid = ~seen[0]  # (B, n_fg + n_bg + 1)
    assert valid[:, :5].sum(1).tolist() == [3, 1]  # fg slots beyond the object's cells are padded
    assert valid[:, 5:].all()  # plenty of background pixels for all bg prototypes and the null


@pytest.mark.parametrize("fill", [0, 255])
def test_support_without_foreground_is_finite(fill):
    model = _model().train()
    seen = _cross_attention_padding(model)
    si, _, qi = _episode(k=2)
    sm = torch.full((2, 2, H, W), fill, dtype=torch.long)
    target = torch.zeros(2, H, W, dtype=torch.long)
    target[:, 10:30, 10:30] = 1
    out = model(si, sm, qi)
    loss = model.loss(out, target)
    loss.backward()
    assert torch.isfinite(out).all() and torch.isfinite(loss)
    for p in model.parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all()
    valid = ~seen[0]
    assert not valid[:, :5].any()  # no foreground prototypes
    assert valid[:, 5:-1].all() == (fill == 0)  # an all-255 support has no background either
    assert valid[:, -1].all()  # the null prototype is always attendable


def test_support_cells_rules():
    mask = torch.zeros(1, 2, 16, 16, dtype=torch.long)
    mask[0, 0, :8, :8] = 1  # one full cell on a 2 x 2 grid
    mask[0, 0, 8:, 8:] = 255  # an ignored cell: neither fg nor bg
    mask[0, 1, 0, 0] = 1  # one pixel: too small for any cell, kept by the tiny-object rule
    fg, bg, frac = support_cells(mask, (2, 2))
    assert fg[0, 0].tolist() == [[True, False], [False, False]]
    assert bg[0, 0].tolist() == [[False, True], [True, False]]
    assert fg[0, 1].tolist() == [[True, False], [False, False]]
    assert bg[0, 1].tolist() == [[False, True], [True, True]]
    assert frac[0, 1, 0, 0].item() == pytest.approx(1 / 64)


def test_sine_positional_encoding_distinguishes_positions():
    pos = sine_positional_encoding(5, 7, 32)
    assert pos.shape == (35, 32)
    assert torch.cdist(pos, pos).add(torch.eye(35)).min() > 1e-3
    with pytest.raises(ValueError):
        sine_positional_encoding(2, 2, 30)


def test_loss_ignores_255_pixels():
    model = _model()
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 2, 16, 16, generator=g)
    target = torch.randint(0, 2, (2, 16, 16), generator=g)
    target[:, :5] = 255
    changed = logits.clone()
    changed[:, :, :5] = torch.randn(2, 2, 5, 16, generator=g) * 10
    for ce in (0.0, 1.0):
        a, b = model.loss(logits, target, ce_weight=ce), model.loss(changed, target, ce_weight=ce)
        torch.testing.assert_close(a, b)

    # Own expectation: per-image, per-channel (bg, fg) Dice over the non-ignored pixels,
    # smoothing 1, mean over the two channels, then over the batch.
    valid = target != 255
    probs = logits.softmax(1)
    dice = [
        1
        - (2 * (probs[i, c] * (target[i] == c))[valid[i]].sum() + 1)
        / (probs[i, c][valid[i]].sum() + (target[i] == c).sum() + 1)
        for i in range(2)
        for c in range(2)
    ]
    torch.testing.assert_close(model.loss(logits, target), torch.stack(dice).mean())
    perfect = torch.stack(((target != 1).float(), (target == 1).float()), 1) * 40
    assert model.loss(perfect, target) < 1e-3


def _square_on_noise(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    img = torch.rand(3, H, W, generator=g) * 0.5
    mask = torch.zeros(H, W, dtype=torch.long)
    y, x = torch.randint(0, H - 24, (2,), generator=g).tolist()
    img[:, y : y + 24, x : x + 24] += 1.0
    mask[y : y + 24, x : x + 24] = 1
    return img, mask


def test_overfits_one_toy_episode():
    g = torch.Generator().manual_seed(0)
    (si, sm), (qi, qm) = _square_on_noise(g), _square_on_noise(g)
    si, sm, qi, qm = si[None, None], sm[None, None], qi[None], qm[None]
    model = _model(dim=64, n_fg_protos=4, freeze_backbone=False).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(40):
        loss = model.loss(model(si, sm, qi), qm)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0]
