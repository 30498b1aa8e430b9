"""MetaSegNet (Tian et al., "Differentiable Meta-learning Model for Few-shot Semantic
Segmentation", AAAI 2020): K-way few-shot segmentation as per-pixel classification.

An embedding network with a global branch (deep features + pooled multi-scale context) and a
local branch (high-resolution early features) maps every pixel to a d-dim embedding; a
closed-form ridge-regression classifier (``models.ridge``) is fitted on the support pixels of an
episode (background + K classes) and applied to every query pixel. Everything is differentiable,
so the model is meta-trained episodically end to end, from scratch by default.

Embedding design (this implementation's reading of the paper's two branches):

- global: 1x1 reduction of the deepest stage (stride 8, dilated backbone), then PSPNet pyramid
  pooling (Zhao et al. CVPR 2017, Sec. 3.2; bins 1, 2, 3, 6) so each pixel sees image-level and
  quadrant-level context, fused by a 3x3 conv. ``use_global=False`` drops the pooled context but
  keeps the deep features and the 3x3 conv, so the ablation isolates the context, not depth.
- local: 1x1 projection of stage 1 (stride 4), as the low-level path of DeepLabv3+.
- fusion at stride 4: 3x3 conv + BN + ReLU, then a linear 1x1 conv to ``embed_dim``. Embeddings
  are L2-normalised and multiplied by √d, so a feature's mean square per dimension is 1 whatever
  the raw activation scale: that keeps the ridge regulariser λ on a fixed footing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.backbones import Backbone, build_backbone
from models.losses import downsample_labels, onehot_targets, pixel_cross_entropy
from models.ridge import RidgeBaseLearner


def _conv_bn_relu(c_in: int, c_out: int, k: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class GlobalContext(nn.Module):
    """Deep features with (optionally) pyramid-pooled context concatenated back per pixel."""

    def __init__(self, c_in: int, c_out: int, bins: tuple[int, ...] = (1, 2, 3, 6)) -> None:
        super().__init__()
        self.reduce = _conv_bn_relu(c_in, c_out, 1)
        c_bin = c_out // 4
        # No BatchNorm on pooled maps: a 1x1 bin has one value per image and channel, so batch
        # statistics would be degenerate for small episode batches.
        self.pools = nn.ModuleList(
            nn.Sequential(
                nn.AdaptiveAvgPool2d(b), nn.Conv2d(c_out, c_bin, 1), nn.ReLU(inplace=True)
            )
            for b in bins
        )
        self.fuse = _conv_bn_relu(c_out + c_bin * len(bins), c_out, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.reduce(x)
        size = x.shape[-2:]
        pooled = [
            F.interpolate(pool(x), size=size, mode="bilinear", align_corners=True)
            for pool in self.pools
        ]
        return self.fuse(torch.cat([x, *pooled], dim=1))


class MetaSegNet(nn.Module):
    """Embedding network + ridge base learner; see the module docstring for the design."""

    def __init__(
        self,
        backbone: str | Backbone = "small_resnet",
        embed_dim: int = 64,
        use_global: bool = True,
        use_local: bool = True,
        global_dim: int = 128,
        local_dim: int = 48,
        ridge: RidgeBaseLearner | None = None,
    ) -> None:
        super().__init__()
        self.backbone = build_backbone(backbone)
        self.embed_dim = embed_dim
        self.use_global = use_global
        self.use_local = use_local
        ch = self.backbone.channels
        self.global_branch = GlobalContext(
            ch["layer4"], global_dim, bins=(1, 2, 3, 6) if use_global else ()
        )
        self.local_branch = _conv_bn_relu(ch["layer1"], local_dim, 1) if use_local else None
        c_fused = global_dim + (local_dim if use_local else 0)
        self.fuse = nn.Sequential(
            _conv_bn_relu(c_fused, embed_dim, 3), nn.Conv2d(embed_dim, embed_dim, 1)
        )
        self.base_learner = ridge if ridge is not None else RidgeBaseLearner()

    @property
    def stride(self) -> int:
        """Output stride of ``features``."""
        return self.backbone.strides["layer1" if self.use_local else "layer4"]

    def features(self, img: Tensor) -> Tensor:
        """Per-pixel embeddings (N, embed_dim, H/stride, W/stride), each of norm √embed_dim."""
        feats = self.backbone(img)
        x = self.global_branch(feats["layer4"])
        if self.local_branch is not None:
            local = self.local_branch(feats["layer1"])
            x = F.interpolate(x, size=local.shape[-2:], mode="bilinear", align_corners=True)
            x = torch.cat([x, local], dim=1)
        x = self.fuse(x)
        return F.normalize(x, dim=1) * math.sqrt(self.embed_dim)

    def forward(
        self, support_img: Tensor, support_mask: Tensor, query_img: Tensor, n_ways: int
    ) -> Tensor:
        """Segment the query into background + ``n_ways`` episode classes.

        support_img (B, S, 3, H, W), support_mask (B, S, H, W) with values in
        ``{0..n_ways, 255}``, query_img (B, 3, H, W) → logits (B, n_ways + 1, H, W).
        """
        B, S = support_img.shape[:2]
        H, W = query_img.shape[-2:]
        # One backbone pass for support and query: shared BatchNorm statistics per episode batch.
        emb = self.features(torch.cat([support_img.flatten(0, 1), query_img], dim=0))
        d, h, w = emb.shape[1:]
        support = emb[: B * S].reshape(B, S, d, h * w).permute(0, 1, 3, 2).reshape(B, S * h * w, d)
        query = emb[B * S :].reshape(B, d, h * w).transpose(1, 2)

        labels = downsample_labels(support_mask, (h, w)).reshape(B, S * h * w)
        targets = onehot_targets(labels, n_ways + 1).to(emb.dtype)
        logits = self.base_learner(support, targets, query)  # (B, h*w, n_ways + 1)
        logits = logits.transpose(1, 2).reshape(B, n_ways + 1, h, w)
        return F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=True)

    def compute_objective(self, batch: Mapping[str, Tensor], n_ways: int) -> Tensor:
        """Training loss of an episode batch (``support_img``, ``support_mask``, ``query_img``
        as in ``forward``, and the query labels ``query_mask`` (B, H, W)): pixel cross-entropy."""
        logits = self(batch["support_img"], batch["support_mask"], batch["query_img"], n_ways)
        return pixel_cross_entropy(logits, batch["query_mask"])
