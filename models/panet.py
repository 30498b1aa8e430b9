"""PANet (Wang et al., "PANet: Few-Shot Image Semantic Segmentation with Prototype Alignment",
ICCV 2019): the plain prototype-matching baseline.

Support features are masked-average-pooled into one prototype per class and one for the
background (Sec. 3.3, Eq. 1-2); every query pixel is labelled by cosine similarity to the
prototypes times a fixed scale α = 20 (Eq. 3-4). Prototype alignment regularisation (PAR,
Sec. 3.4) reverses the roles: the query's predicted masks give query prototypes, which must
segment the support images.

Masked average pooling runs at feature resolution with area-downsampled (fractional) masks, so a
cell on an object boundary counts in proportion to its coverage. The paper upsamples features
to the mask size instead; that is the same average for box-upsampled features and avoids a
(S, C, H, W) full-resolution copy.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.backbones import Backbone, build_backbone
from models.losses import onehot_targets, pixel_cross_entropy


def masked_average_pool(feats: Tensor, masks: Tensor, eps: float = 1e-5) -> Tensor:
    """Σ feats·mask / Σ mask: feats (N, C, h, w), masks (N, K, h, w) → prototypes (N, K, C).

    An empty mask gives a zero prototype (eps in the denominator, as the PANet code does).
    """
    num = torch.einsum("nchw,nkhw->nkc", feats, masks)
    return num / (masks.sum(dim=(-2, -1)).unsqueeze(-1) + eps)


def soft_masks(labels: Tensor, n_classes: int, size: tuple[int, int]) -> Tensor:
    """Labels (N, H, W) → per-class coverage (N, n_classes, h, w) of each feature cell.

    Pixels labelled 255 belong to no class, so they lower the coverage of every class.
    """
    onehot = onehot_targets(labels, n_classes).permute(0, 3, 1, 2)
    return F.interpolate(onehot, size=size, mode="area")


def cosine_logits(feats: Tensor, protos: Tensor, scale: float) -> Tensor:
    """Scaled cosine similarity: feats (B, C, h, w), protos (B, K, C) → (B, K, h, w)."""
    f = F.normalize(feats, dim=1)
    p = F.normalize(protos, dim=-1)
    return scale * torch.einsum("bchw,bkc->bkhw", f, p)


class PANet(nn.Module):
    """Prototype matching on backbone features; ``layers`` are concatenated at the first one's
    resolution (default: layer3 + layer4 of the dilated backbone, both at stride 8).
    ``align_weight`` weighs the PAR loss in the training objective (0 leaves it out)."""

    def __init__(
        self,
        backbone: str | Backbone = "small_resnet",
        layers: tuple[str, ...] = ("layer3", "layer4"),
        scale: float = 20.0,
        align_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.backbone = build_backbone(backbone)
        self.layers = layers
        self.scale = scale
        self.align_weight = float(align_weight)

    def features(self, img: Tensor) -> Tensor:
        """Concatenated backbone features (N, C, h, w) of the tapped layers."""
        feats = self.backbone(img)
        first = feats[self.layers[0]]
        taps = [
            f
            if f.shape[-2:] == first.shape[-2:]
            else F.interpolate(f, size=first.shape[-2:], mode="bilinear", align_corners=True)
            for f in (feats[name] for name in self.layers)
        ]
        return torch.cat(taps, dim=1)

    def prototypes(self, support_feats: Tensor, support_mask: Tensor, n_ways: int) -> Tensor:
        """Background + class prototypes (B, n_ways + 1, C) from support features (B, S, C, h, w)
        and labels (B, S, H, W): per-image masked averages, averaged over the support images
        that contain the class (Eq. 1-2)."""
        B, S, C, h, w = support_feats.shape
        masks = soft_masks(support_mask.flatten(0, 1), n_ways + 1, (h, w))
        per_image = masked_average_pool(support_feats.flatten(0, 1), masks)
        per_image = per_image.reshape(B, S, n_ways + 1, C)
        present = (masks.sum(dim=(-2, -1)) > 0).reshape(B, S, n_ways + 1, 1).to(per_image.dtype)
        return (per_image * present).sum(dim=1) / present.sum(dim=1).clamp(min=1)

    def forward(
        self,
        support_img: Tensor,
        support_mask: Tensor,
        query_img: Tensor,
        n_ways: int,
        return_align_loss: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Logits (B, n_ways + 1, H, W) for the query; with ``return_align_loss`` also the PAR
        loss (scalar). Inputs as in ``MetaSegNet.forward``."""
        B, S = support_img.shape[:2]
        H, W = query_img.shape[-2:]
        feats = self.features(torch.cat([support_img.flatten(0, 1), query_img], dim=0))
        C, h, w = feats.shape[1:]
        support_feats = feats[: B * S].reshape(B, S, C, h, w)
        query_feats = feats[B * S :]

        protos = self.prototypes(support_feats, support_mask, n_ways)
        logits = cosine_logits(query_feats, protos, self.scale)
        up = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=True)
        if not return_align_loss:
            return up
        return up, self.align_loss(logits, query_feats, support_feats, support_mask, n_ways)

    def compute_objective(self, batch: Mapping[str, Tensor], n_ways: int) -> Tensor:
        """Training loss of an episode batch (keys as in ``MetaSegNet.compute_objective``):
        pixel cross-entropy of the query + ``align_weight`` × PAR."""
        inputs = (batch["support_img"], batch["support_mask"], batch["query_img"], n_ways)
        if self.align_weight > 0:
            logits, align = self(*inputs, return_align_loss=True)
            return pixel_cross_entropy(logits, batch["query_mask"]) + self.align_weight * align
        return pixel_cross_entropy(self(*inputs), batch["query_mask"])

    def align_loss(
        self,
        query_logits: Tensor,
        query_feats: Tensor,
        support_feats: Tensor,
        support_mask: Tensor,
        n_ways: int,
    ) -> Tensor:
        """PAR (Sec. 3.4, Eq. 5): prototypes from the query's predicted masks segment each
        support image into its own class vs background; mean cross-entropy over the support
        images whose class the query prediction contains (others are skipped, as in PANet).

        query_logits (B, n_ways + 1, h, w) at feature resolution; the predicted masks are hard
        (argmax, no gradient) while the query features carry the gradient.
        """
        B, S, C, h, w = support_feats.shape
        pred = query_logits.argmax(dim=1)
        q_masks = F.one_hot(pred, n_ways + 1).permute(0, 3, 1, 2).to(query_feats.dtype)
        q_protos = masked_average_pool(query_feats, q_masks)  # (B, n_ways + 1, C)
        predicted = q_masks.sum(dim=(-2, -1)) > 0  # (B, n_ways + 1)

        # Each support image shows one episode class (label j + 1) on background 0.
        valid_px = support_mask != 255
        own = torch.where(valid_px, support_mask, 0).flatten(2).amax(dim=-1)  # (B, S)
        keep = (own > 0) & predicted.gather(1, own)
        if not bool(keep.any()):
            return query_feats.sum() * 0.0

        pair = torch.stack(
            [q_protos[:, 0:1].expand(B, S, C), q_protos.gather(1, own[..., None].expand(B, S, C))],
            dim=2,
        )  # (B, S, 2, C): background and own-class query prototypes
        f = support_feats[keep]  # (N, C, h, w)
        s_logits = cosine_logits(f, pair[keep], self.scale)
        s_logits = F.interpolate(
            s_logits, size=support_mask.shape[-2:], mode="bilinear", align_corners=True
        )
        target = (support_mask[keep] == own[keep][:, None, None]).long()
        target = torch.where(valid_px[keep], target, 255)
        per_px = F.cross_entropy(s_logits, target, ignore_index=255, reduction="none")
        n_valid = valid_px[keep].flatten(1).sum(dim=1).clamp(min=1)
        return (per_px.flatten(1).sum(dim=1) / n_valid).mean()
