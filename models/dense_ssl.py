"""Self-supervised dense pretraining: pixel-level contrast between two augmented views.

In the spirit of DenseCL (Wang et al. 2021) and PixPro (Xie et al. 2021), but with the positive
pairs taken from the *known* geometry of the two crops rather than from feature similarity:
each view is a random resized (and possibly flipped) crop made with ``F.affine_grid`` +
``F.grid_sample``, so the image location under every output pixel is exact, and a feature cell of
view 1 is paired with the view-2 cell that covers the centre of its footprint. Negatives are the
cells of the other images in the batch (DenseCL's choice; other cells of the same image may show
the same object), or all other cells; an optional image-level InfoNCE term (MoCo v2 style,
in-batch) adds global context. Keys come from a momentum (EMA) copy of the network, as in
MoCo/BYOL, or, with ``ema=False``, from the online network itself with gradients on both sides
(SimCLR style: one forward pass instead of two, about 25 % less compute).

Pure torch, no file I/O: images come in as float ``(B, 3, H, W)`` in [0, 1], randomness from an
explicit ``torch.Generator`` so that training is reproducible and resumable.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.backbones import Backbone, build_backbone
from models.conventions import IMAGENET_MEAN, IMAGENET_STD

# RGB -> YIQ; a hue shift is a rotation of the (I, Q) chroma plane (cheaper than HSV, and smooth).
_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_GREY = torch.tensor([0.299, 0.587, 0.114])


@dataclass(frozen=True)
class Augment:
    """View augmentations (SimCLR/MoCo v2 recipe, in torch). ``size`` is the view side in px."""

    size: int = 96
    scale: tuple[float, float] = (0.25, 1.0)  # crop area as a fraction of the image
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5
    jitter: float = 0.8  # probability of colour jitter
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1  # fraction of a full turn
    grey: float = 0.2
    blur: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 1.0)  # in view pixels (2.0 at 224 px ~ 0.9 at 96)


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _chance(n: int, p: float, g: torch.Generator) -> Tensor:
    return torch.rand(n, generator=g) < p


def sample_crops(n: int, aug: Augment, g: torch.Generator) -> Tensor:
    """Random resized crops (+ horizontal flips) as ``affine_grid`` matrices ``(n, 2, 3)``.

    ``theta`` maps a view's normalised output coordinate ``(x, y, 1)`` to the normalised image
    coordinate it samples (``align_corners=False`` convention: pixel centres at ``(2i+1)/S - 1``).
    """
    area = _uniform(n, *aug.scale, g)
    log_ratio = _uniform(n, math.log(aug.ratio[0]), math.log(aug.ratio[1]), g)
    # Half-extents in normalised units equal the crop's fraction of each side.
    w = torch.sqrt(area * torch.exp(log_ratio)).clamp(max=1.0)
    h = torch.sqrt(area / torch.exp(log_ratio)).clamp(max=1.0)
    cx = (2 * torch.rand(n, generator=g) - 1) * (1 - w)
    cy = (2 * torch.rand(n, generator=g) - 1) * (1 - h)
    sign = torch.where(_chance(n, aug.flip, g), -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = w * sign, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    return theta


def crop(images: Tensor, theta: Tensor, size: int) -> Tensor:
    """Resample ``images`` (B, C, H, W) through ``theta`` into ``size`` x ``size`` views."""
    grid = F.affine_grid(theta.to(images), [images.shape[0], images.shape[1], size, size],
                         align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border",
                         align_corners=False)


def cell_centres(h: int, w: int) -> Tensor:
    """Normalised ``(x, y)`` centres of an h x w grid of cells, row-major: ``(h * w, 2)``."""
    ys = (2 * torch.arange(h, dtype=torch.float64) + 1) / h - 1
    xs = (2 * torch.arange(w, dtype=torch.float64) + 1) / w - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=-1)


def correspondence(theta_a: Tensor, theta_b: Tensor, h: int, w: int) -> tuple[Tensor, Tensor]:
    """For every cell of view a's h x w feature grid, the view-b cell covering the same spot.

    A stride-s feature cell stands for an s x s block of view pixels, so its footprint centre is
    the grid centre above. That point is mapped to the image through ``theta_a`` and back into
    view b through the inverse of ``theta_b``. Returns the row-major index of the view-b cell
    ``(B, h * w)`` (0 where invalid) and whether the point lies inside view b ``(B, h * w)``.
    """
    c = cell_centres(h, w).to(theta_a.device)  # float64 so cell borders are not blurred
    ta, tb = theta_a.double(), theta_b.double()
    image_xy = c @ ta[:, :, :2].transpose(1, 2) + ta[:, None, :, 2]
    rel = (image_xy - tb[:, None, :, 2]).unsqueeze(-1)
    q = torch.linalg.solve(tb[:, None, :, :2], rel).squeeze(-1)  # normalised view-b coords
    col = torch.floor((q[..., 0] + 1) / 2 * w).long()
    row = torch.floor((q[..., 1] + 1) / 2 * h).long()
    valid = (col >= 0) & (col < w) & (row >= 0) & (row < h)
    return torch.where(valid, row * w + col, 0), valid


def _blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Separable Gaussian blur with one sigma per image."""
    b, c, hh, ww = x.shape
    radius = math.ceil(3 * float(sigma.max()))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t[None] / sigma[:, None]) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B * C, K)
    y = F.pad(x.reshape(1, b * c, hh, ww), (radius,) * 4, mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=b * c)
    y = F.conv2d(y, k[:, None, :, None], groups=b * c)
    return y.reshape(b, c, hh, ww)


def photometric(x: Tensor, aug: Augment, g: torch.Generator) -> Tensor:
    """Colour jitter, random greyscale and Gaussian blur, per image (x in [0, 1])."""
    n = x.shape[0]

    def per_image(v: Tensor) -> Tensor:
        return v.to(x).view(n, 1, 1, 1)

    def grey(v: Tensor) -> Tensor:
        return torch.einsum("bchw,c->bhw", v, _GREY.to(v)).unsqueeze(1)

    jit = per_image(_chance(n, aug.jitter, g))
    y = x * per_image(_uniform(n, 1 - aug.brightness, 1 + aug.brightness, g))
    mean = grey(y).mean((2, 3), keepdim=True)
    y = ((y - mean) * per_image(_uniform(n, 1 - aug.contrast, 1 + aug.contrast, g)) + mean)
    y = y.clamp(0, 1)
    y = (y - grey(y)) * per_image(_uniform(n, 1 - aug.saturation, 1 + aug.saturation, g)) + grey(y)
    angle = _uniform(n, -aug.hue, aug.hue, g).to(x) * 2 * math.pi
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.zeros(n, 3, 3).to(x)
    rot[:, 0, 0], rot[:, 1, 1], rot[:, 1, 2] = 1, cos, -sin
    rot[:, 2, 1], rot[:, 2, 2] = sin, cos
    yiq = _YIQ.to(x)
    m = torch.linalg.inv(yiq) @ rot @ yiq  # (B, 3, 3) hue rotation in RGB
    y = torch.einsum("bij,bjhw->bihw", m, y).clamp(0, 1)
    x = torch.where(jit > 0, y, x)
    x = torch.where(per_image(_chance(n, aug.grey, g)) > 0, grey(x).expand_as(x), x)
    blurred = _blur(x, _uniform(n, *aug.blur_sigma, g).to(x))
    return torch.where(per_image(_chance(n, aug.blur, g)) > 0, blurred, x)


def make_views(images: Tensor, aug: Augment, g: torch.Generator
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Two augmented views of each image and their crop matrices: (v1, v2, theta1, theta2)."""
    n = images.shape[0]
    theta1, theta2 = sample_crops(n, aug, g), sample_crops(n, aug, g)
    v1 = photometric(crop(images, theta1, aug.size), aug, g)
    v2 = photometric(crop(images, theta2, aug.size), aug, g)
    return v1, v2, theta1, theta2


def dense_infonce(q: Tensor, k: Tensor, index: Tensor, valid: Tensor, temperature: float,
                  other_images_only: bool = False) -> Tensor:
    """InfoNCE of each valid query cell against its corresponding key cell.

    q, k: (B, D, h, w) unit vectors; index/valid: from ``correspondence`` (query view -> key
    view). The negatives are all other key cells of the batch, or only those of other images
    with ``other_images_only`` (DenseCL's choice: other cells of the same image may show the
    same object).
    """
    b, d, h, w = q.shape
    qf = q.flatten(2).transpose(1, 2).reshape(b * h * w, d)
    kf = k.flatten(2).transpose(1, 2).reshape(b * h * w, d)
    image = torch.arange(b, device=q.device).repeat_interleave(h * w)
    target = (index + torch.arange(b, device=q.device)[:, None] * h * w).reshape(-1)
    sel = valid.reshape(-1)
    if not bool(sel.any()):  # no overlap anywhere in the batch: nothing to pull together
        return q.sum() * 0.0
    logits = qf[sel] @ kf.T / temperature
    if other_images_only:
        same = image[sel][:, None] == image[None, :]
        is_pos = torch.zeros_like(same).scatter_(1, target[sel][:, None], True)
        logits = logits.masked_fill(same & ~is_pos, float("-inf"))
    return F.cross_entropy(logits, target[sel])


def global_infonce(q: Tensor, k: Tensor, temperature: float) -> Tensor:
    """In-batch image-level InfoNCE: q[i] must pick k[i] among all keys (unit vectors)."""
    logits = q @ k.T / temperature
    return F.cross_entropy(logits, torch.arange(q.shape[0], device=q.device))


class DenseSSL(nn.Module):
    """Backbone + dense (1x1 conv) and global (MLP) projection heads, with an EMA target copy.

    ``forward(images, g)`` makes two views and returns the loss and its parts; with an EMA
    target (``ema=True``) call ``update_target(m)`` after each optimizer step. ``backbone`` is
    what is kept afterwards.
    """

    def __init__(self, backbone: Backbone | str = "small_resnet", *, layer: str = "layer4",
                 dim: int = 128, hidden: int = 256, temperature: float = 0.2,
                 global_weight: float = 0.5, other_images_only: bool = True,
                 ema: bool = True, augment: Augment | None = None) -> None:
        super().__init__()
        self.backbone = build_backbone(backbone)
        self.layer = layer
        self.temperature = temperature
        self.global_weight = global_weight
        self.other_images_only = other_images_only
        self.augment = augment or Augment()
        c = self.backbone.channels[layer]
        self.dense_head = nn.Sequential(nn.Conv2d(c, hidden, 1), nn.BatchNorm2d(hidden),
                                        nn.ReLU(inplace=True), nn.Conv2d(hidden, dim, 1))
        self.global_head = nn.Sequential(nn.Linear(c, hidden), nn.ReLU(inplace=True),
                                         nn.Linear(hidden, dim))
        self.target: nn.ModuleDict | None = None
        if ema:
            self.target = nn.ModuleDict({"backbone": copy.deepcopy(self.backbone),
                                         "dense_head": copy.deepcopy(self.dense_head),
                                         "global_head": copy.deepcopy(self.global_head)})
            self.target.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def _embed(self, x: Tensor, backbone: nn.Module, dense: nn.Module, glob: nn.Module
               ) -> tuple[Tensor, Tensor]:
        feat = backbone((x - self.mean) / self.std)[self.layer]
        return (F.normalize(dense(feat), dim=1),
                F.normalize(glob(feat.mean((2, 3))), dim=1))

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """EMA of the online weights; the target's BatchNorm statistics stay its own."""
        if self.target is None:
            raise RuntimeError("this DenseSSL has no EMA target (ema=False)")
        for online, target in ((self.backbone, self.target["backbone"]),
                               (self.dense_head, self.target["dense_head"]),
                               (self.global_head, self.target["global_head"])):
            for p, t in zip(online.parameters(), target.parameters(), strict=True):
                t.lerp_(p, 1.0 - momentum)

    def forward(self, images: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        """Loss on two views of ``images`` (B, 3, H, W) in [0, 1]; returns its parts."""
        v1, v2, theta1, theta2 = make_views(images, self.augment, generator)
        n = images.shape[0]
        # One pass per network over both views (BN statistics over 2B views, as in SimCLR).
        views = torch.cat([v1, v2])
        q, gq = self._embed(views, self.backbone, self.dense_head, self.global_head)
        if self.target is None:
            k, gk = q, gq
        else:
            with torch.no_grad():
                k, gk = self._embed(views, *self.target.values())
        h, w = q.shape[-2:]
        idx12, ok12 = correspondence(theta1.to(q.device), theta2.to(q.device), h, w)
        idx21, ok21 = correspondence(theta2.to(q.device), theta1.to(q.device), h, w)
        t, other = self.temperature, self.other_images_only
        dense = 0.5 * (dense_infonce(q[:n], k[n:], idx12, ok12, t, other)
                       + dense_infonce(q[n:], k[:n], idx21, ok21, t, other))
        glob = 0.5 * (global_infonce(gq[:n], gk[n:], t) + global_infonce(gq[n:], gk[:n], t))
        loss = dense + self.global_weight * glob
        return {"loss": loss, "dense": dense.detach(), "global": glob.detach(),
                "overlap": ok12.float().mean()}
