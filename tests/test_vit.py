"""DINO ViT: official key names and shapes, positional-embedding interpolation, loading."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch

from models.vit import VisionTransformer, build_vit, load_vit_checkpoint


def _official_vit_s8_shapes() -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the released dino_deitsmall8_pretrain.pth (ViT-S/8 at 224 px)."""
    d, hidden = 384, 1536
    shapes = {"cls_token": (1, 1, d), "pos_embed": (1, 785, d),
              "patch_embed.proj.weight": (d, 3, 8, 8), "patch_embed.proj.bias": (d,),
              "norm.weight": (d,), "norm.bias": (d,)}
    for i in range(12):
        b = f"blocks.{i}."
        shapes |= {b + "norm1.weight": (d,), b + "norm1.bias": (d,),
                   b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
                   b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
                   b + "norm2.weight": (d,), b + "norm2.bias": (d,),
                   b + "mlp.fc1.weight": (hidden, d), b + "mlp.fc1.bias": (hidden,),
                   b + "mlp.fc2.weight": (d, hidden), b + "mlp.fc2.bias": (d,)}
    return shapes


def _vit_s8(fill: bool) -> VisionTransformer:
    """ViT-S/8 allocated without DINO's (slow, here pointless) init; random weights if fill."""
    with torch.device("meta"):
        vit = build_vit("vit_small", 8)
    vit.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in vit.parameters():
            if fill:
                p.normal_(0.0, 0.02, generator=g)
            else:
                p.zero_()
    return vit.eval()


@pytest.fixture(scope="module")
def vit_s8_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, VisionTransformer]:
    """A random ViT-S/8 saved like the released dino_deitsmall8_pretrain.pth (flat dict)."""
    vit = _vit_s8(fill=True)
    path = tmp_path_factory.mktemp("dino") / "dino_deitsmall8_pretrain.pth"
    torch.save(vit.state_dict(), path)
    return path, vit


def _tiny(patch: int = 8, img_size: int = 32) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(patch, embed_dim=16, depth=2, num_heads=2, img_size=img_size)


def test_vit_s8_matches_the_official_state_dict() -> None:
    with torch.device("meta"):  # shapes only
        state = build_vit("vit_small", 8).state_dict()
        b16 = build_vit("vit_base", 16).state_dict()
    expected = _official_vit_s8_shapes()
    assert len(expected) == 150
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert b16["pos_embed"].shape == (1, 197, 768) and len(b16) == 150


def test_patch_tokens_shape_and_pos_embed_interpolation() -> None:
    vit = _tiny().eval()  # trained at 32 px: a 4 x 4 grid
    with torch.no_grad():
        assert vit.interpolate_pos_encoding(4, 4) is vit.pos_embed
        pe = vit.interpolate_pos_encoding(6, 3)
        assert pe.shape == (1, 1 + 18, 16)
        assert torch.equal(pe[:, 0], vit.pos_embed[:, 0])  # [CLS] is not resampled
        # Bicubic weights sum to one: a constant field stays constant; a ramp along x stays a
        # ramp along x, increasing and the same on every row.
        vit.pos_embed[:, 1:] = 0.5
        assert torch.allclose(vit.interpolate_pos_encoding(7, 5)[:, 1:], torch.tensor(0.5))
        vit.pos_embed[0, 1:, 0] = torch.arange(4.0).repeat(4)
        ramp = vit.interpolate_pos_encoding(5, 9)[0, 1:, 0].view(5, 9)
        assert torch.allclose(ramp, ramp[:1].expand(5, 9), atol=1e-5)
        assert (ramp[0, 1:] > ramp[0, :-1]).all()
        feats = vit.patch_tokens(torch.randn(2, 3, 48, 24))
    assert feats.shape == (2, 16, 6, 3)
    # Row-major tokens: the map is the token sequence reshaped, not transposed.
    with torch.no_grad():
        tokens = vit.tokens(torch.ones(1, 3, 48, 24))[0, 1:]
        fmap = vit.patch_tokens(torch.ones(1, 3, 48, 24))[0]
    assert torch.allclose(fmap[:, 0, 2], tokens[2]) and torch.allclose(fmap[:, 1, 0], tokens[3])


def test_official_flat_file_loads(vit_s8_file: tuple[Path, VisionTransformer]) -> None:
    path, src = vit_s8_file
    dst = _vit_s8(fill=False)
    report = load_vit_checkpoint(dst, path)
    assert report.ok and len(report.loaded) == 150
    x = torch.randn(1, 3, 32, 40)
    with torch.no_grad():
        assert torch.equal(src.patch_tokens(x), dst.patch_tokens(x))


def test_training_checkpoint_loads_teacher_by_default(tmp_path: Path) -> None:
    teacher, student = _tiny(), _tiny()
    with torch.no_grad():
        student.cls_token.fill_(7.0)
    ckpt = {
        # DINO's teacher: MultiCropWrapper keys, plus its projection head.
        "teacher": {**{f"backbone.{k}": v for k, v in teacher.state_dict().items()},
                    "head.mlp.0.weight": torch.zeros(4, 16)},
        # The student is DDP-wrapped.
        "student": {f"module.backbone.{k}": v for k, v in student.state_dict().items()},
        "optimizer": {"state": {}}, "epoch": 100, "args": argparse.Namespace(arch="vit_tiny"),
    }
    path = tmp_path / "checkpoint.pth"
    torch.save(ckpt, path)
    model = _tiny()
    with torch.no_grad():
        model.cls_token.zero_()
    report = load_vit_checkpoint(model, path)
    assert report.ok and "head.mlp.0.weight" in report.ignored
    assert torch.equal(model.cls_token, teacher.cls_token)
    load_vit_checkpoint(model, path, which="student")
    assert torch.all(model.cls_token == 7.0)


def test_mismatches_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.pth"
    torch.save(_tiny(patch=16).state_dict(), path)  # other patch size: other shapes
    with pytest.raises(ValueError, match="shape mismatch: patch_embed.proj.weight"):
        load_vit_checkpoint(_tiny(patch=8), path)
    state = _tiny().state_dict()
    del state["norm.weight"]
    state["blocks.9.attn.qkv.weight"] = torch.zeros(48, 16)
    torch.save(state, path)
    with pytest.raises(ValueError, match="missing: norm.weight") as err:
        load_vit_checkpoint(_tiny(), path)
    assert "unexpected: blocks.9.attn.qkv.weight" in str(err.value)
    report = load_vit_checkpoint(_tiny(), path, strict=False)
    assert report.missing == ["norm.weight"] and not report.ok
    torch.save({"student": _tiny().state_dict()}, path)
    with pytest.raises(ValueError, match="no 'teacher'"):
        load_vit_checkpoint(_tiny(), path)


def test_dino_embedder_contract(vit_s8_file: tuple[Path, VisionTransformer],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.labelfree import embeddings
    from tasks.labelfree.dino import dino_embedder

    path, src = vit_s8_file
    monkeypatch.setitem(embeddings.EMBEDDERS, "dino", dino_embedder)
    spec = {"kind": "dino", "arch": "vit_small", "patch_size": 8, "checkpoint": str(path)}
    emb = embeddings.load_embedder(spec)
    assert (emb.dim, emb.stride) == (384, 8)
    images = np.random.default_rng(0).integers(0, 256, (2, 40, 32, 3), dtype=np.uint8)
    feats = emb.embed(images)
    assert feats.shape == (2, 384, 5, 4)
    assert torch.allclose(feats.norm(dim=1), torch.ones(2, 5, 4), atol=1e-5)
    x = embeddings.to_input(images)
    with torch.no_grad():
        assert torch.allclose(feats, torch.nn.functional.normalize(src.patch_tokens(x), dim=1),
                              atol=1e-5)
    with pytest.raises(ValueError, match="needs a 'checkpoint'"):
        dino_embedder({"kind": "dino"})
