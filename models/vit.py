"""DINO Vision Transformers (Caron et al. 2021) with the official checkpoint key names.

timm does not import on the CPU torch build used here (docs/architecture.md, known traps), so the
architecture of `facebookresearch/dino`'s ``vision_transformer.py`` is re-implemented module for
module: ``dino_deitsmall8_pretrain.pth`` and friends load unchanged, and a full DINO training
checkpoint (``{"teacher": ..., "student": ...}``) loads its teacher by default.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.backbones import LoadReport

# arch -> (embed_dim, depth, heads), as in DINO's vit_tiny / vit_small / vit_base.
VIT_ARCHS: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
}
# Prefixes a DINO checkpoint puts in front of the backbone keys: the DDP wrapper of the student
# (and of the teacher when the backbone has BatchNorm), then the MultiCropWrapper's "backbone.".
_PREFIXES = ("module.", "backbone.")
# The DINO projection head rides along in training checkpoints; a backbone never uses it.
_HEAD = "head."


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` patches, linearly projected by one strided conv."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        # Same scale (head_dim ** -0.5) as DINO's explicit softmax(q k^T) v, fused.
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm Transformer block; LayerNorm eps 1e-6 as in DINO."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """DINO's ViT without a classification head (``head`` is an Identity there: no weights).

    Inputs are ImageNet-normalised ``(B, 3, H, W)``; sides that are not multiples of the patch
    size are floored by the patch conv, as in DINO.
    """

    def __init__(self, patch_size: int = 16, embed_dim: int = 384, depth: int = 12,
                 num_heads: int = 6, img_size: int = 224, in_chans: int = 3) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        n_patches = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_patches + 1, embed_dim))
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def interpolate_pos_encoding(self, h0: int, w0: int) -> Tensor:
        """Positional embeddings ``(1, 1 + h0 * w0, C)`` for a grid of h0 x w0 patches.

        Bicubic resampling of the square training grid, reproducing DINO's
        ``interpolate_pos_encoding`` (scale factors with its +0.1 guard against float error),
        so features match the reference implementation at any input size.
        """
        n = self.pos_embed.shape[1] - 1
        side = math.isqrt(n)
        if h0 == w0 == side:
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        dim = patch_pos.shape[-1]
        grid = patch_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((h0 + 0.1) / side, (w0 + 0.1) / side),
                             mode="bicubic")
        if grid.shape[-2:] != (h0, w0):
            raise RuntimeError(f"pos-embed interpolation gave {tuple(grid.shape[-2:])}, "
                               f"expected {(h0, w0)}")
        return torch.cat([cls_pos, grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)

    def tokens(self, x: Tensor) -> Tensor:
        """``(B, 1 + N, C)``: the [CLS] token then the patch tokens, after the final norm."""
        b, _, h, w = x.shape
        p = self.patch_size
        t = self.patch_embed(x)
        t = torch.cat([self.cls_token.expand(b, -1, -1), t], dim=1)
        t = t + self.interpolate_pos_encoding(h // p, w // p)
        for block in self.blocks:
            t = block(t)
        return self.norm(t)

    def patch_tokens(self, x: Tensor) -> Tensor:
        """Dense features ``(B, C, H // p, W // p)``: the last layer's normed patch tokens."""
        b, _, h, w = x.shape
        t = self.tokens(x)[:, 1:]
        return t.transpose(1, 2).reshape(b, self.embed_dim, h // self.patch_size,
                                         w // self.patch_size)

    def forward(self, x: Tensor) -> Tensor:
        """The [CLS] embedding ``(B, C)``, DINO's image-level output."""
        return self.tokens(x)[:, 0]


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def build_vit(arch: str = "vit_small", patch_size: int = 8, img_size: int = 224
              ) -> VisionTransformer:
    """``vit_small``/``vit_base``/``vit_tiny`` with patch 8 or 16 (DINO's released models)."""
    if arch not in VIT_ARCHS:
        raise ValueError(f"unknown ViT {arch!r}; known: {sorted(VIT_ARCHS)}")
    dim, depth, heads = VIT_ARCHS[arch]
    return VisionTransformer(patch_size, dim, depth, heads, img_size=img_size)


def _select(raw: object, which: str) -> Mapping[str, object]:
    """The state dict inside a DINO file: flat (``*_pretrain.pth``) or a training checkpoint."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"checkpoint holds a {type(raw).__name__}, not a state dict")
    if "teacher" in raw or "student" in raw:
        if not isinstance(raw.get(which), Mapping):
            raise ValueError(f"checkpoint has no {which!r} state dict (keys: {sorted(raw)})")
        return raw[which]
    for key in ("state_dict", "model"):
        if isinstance(raw.get(key), Mapping):
            return raw[key]
    return raw


def _strip(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


def load_vit_checkpoint(model: VisionTransformer, path: str | Path, *, which: str = "teacher",
                        strict: bool = True) -> LoadReport:
    """Load DINO weights into ``model``; refuses (``strict``) any missing/extra/misshapen key.

    Accepts a flat state dict (the released ``dino_*_pretrain.pth``) or a DINO training
    checkpoint, from which ``which`` ("teacher", the one DINO evaluates, or "student") is taken.
    ``module.`` and ``backbone.`` prefixes are stripped; the DINO head (``head.*``) and
    non-tensor entries are ignored. Read with ``weights_only=True``; a training checkpoint's
    ``args`` (an ``argparse.Namespace``) is the one extra type allowed.
    """
    if which not in ("teacher", "student"):
        raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
    with torch.serialization.safe_globals([argparse.Namespace]):
        raw = torch.load(path, map_location="cpu", weights_only=True)
    state = _select(raw, which)
    report = LoadReport(prefix="module./backbone.")
    expected = model.state_dict()
    to_load: dict[str, Tensor] = {}
    for key, value in state.items():
        name = _strip(key)
        if not isinstance(value, Tensor) or name.startswith(_HEAD):
            report.ignored.append(key)
        elif name not in expected:
            report.unexpected.append(name)
        elif value.shape != expected[name].shape:
            report.mismatched.append(f"{name}: checkpoint {tuple(value.shape)} vs model "
                                     f"{tuple(expected[name].shape)}")
        else:
            to_load[name] = value
    seen = {_strip(k) for k in state}
    report.missing = [name for name in expected if name not in seen]
    if strict and not report.ok:
        problems = ([f"missing: {k}" for k in report.missing]
                    + [f"unexpected: {k}" for k in report.unexpected]
                    + [f"shape mismatch: {k}" for k in report.mismatched])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ValueError(f"checkpoint {path} does not fit the ViT:\n  "
                         + "\n  ".join(problems[:20]) + more)
    model.load_state_dict(to_load, strict=False)
    report.loaded = sorted(to_load)
    return report
