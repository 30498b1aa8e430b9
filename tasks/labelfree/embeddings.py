"""Pixel embedders: a frozen network that maps canonical images to L2-normalised features.

An embedder is described by a json-able *spec*, so feature and cluster stores can be named
after it and workers can rebuild it:

    {"kind": "backbone", "backbone": "small_resnet" | "resnet50", "layer": "layer4",
     "checkpoint": "path/to/weights.pth" | None, "prefix": None}

    {"kind": "dino", ...}: DINO ViT patch tokens (tasks/labelfree/dino.py)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.backbones import build_backbone, load_checkpoint
from models.conventions import IMAGENET_MEAN, IMAGENET_STD
from tasks import defaults

_MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def to_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 → (B, 3, H, W) float32, ImageNet-normalised."""
    x = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float() / 255.0
    return (x - _MEAN) / _STD


class Embedder:
    """Frozen feature extractor with a fixed output dimension and stride."""

    def __init__(self, spec: dict[str, Any], net: nn.Module, forward: Callable[[torch.Tensor],
                 torch.Tensor], dim: int, stride: int, device: torch.device | None = None):
        self.spec = spec
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.net = net.eval().to(self.device)
        for p in self.net.parameters():
            p.requires_grad_(False)
        self._forward = forward
        self.dim = dim
        self.stride = stride

    @torch.no_grad()
    def embed(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 → (B, dim, H/stride, W/stride) float32, unit norm per pixel."""
        x = to_input(images).to(self.device)
        return F.normalize(self._forward(x).float(), dim=1).cpu()


def _backbone_embedder(spec: dict[str, Any]) -> Embedder:
    # Without a checkpoint the weights are random: seed them from the spec, so every worker
    # process builds the same network (else one features array would mix several).
    seed = int(hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:8], 16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = build_backbone(spec.get("backbone", defaults.EMBEDDER_BACKBONE))
    if spec.get("checkpoint"):
        load_checkpoint(backbone, spec["checkpoint"], prefix=spec.get("prefix"))
    layer = spec.get("layer", defaults.EMBEDDER_LAYER)
    return Embedder(spec, backbone, lambda x: backbone(x)[layer], backbone.channels[layer],
                    backbone.strides[layer])


def _dino_embedder(spec: dict[str, Any]) -> Embedder:
    from tasks.labelfree.dino import (
        dino_embedder,  # imported on use: the ViT code is not needed otherwise
    )

    return dino_embedder(spec)


EMBEDDERS: dict[str, Callable[[dict[str, Any]], Embedder]] = {
    "backbone": _backbone_embedder,
    "dino": _dino_embedder,  # {"kind": "dino", "arch": ..., "patch_size": 8, "checkpoint": ...}
}


def load_embedder(spec: dict[str, Any]) -> Embedder:
    kind = spec.get("kind")
    if kind not in EMBEDDERS:
        raise ValueError(f"unknown embedder kind {kind!r}; known: {sorted(EMBEDDERS)}")
    return EMBEDDERS[kind](spec)
