"""Batched k-means in torch.

Used by the UMT Transformer to turn the support foreground/background pixels of an episode into a
few dozen prototypes (Li et al., AAAI 2024, §3.3: 20 fg + 50 bg clusters). Everything is batched
over episodes (B) and vectorised over points; the only Python loops run over the k seeds of the
k-means++ initialisation and the Lloyd iterations.

``kmeans`` itself runs without autograd. A caller that needs gradients through the prototypes
recomputes them with ``assign`` + ``cluster_means``, which are differentiable in ``x``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def assign(
    x: Tensor, centers: Tensor, center_valid: Tensor | None = None, valid: Tensor | None = None
) -> Tensor:
    """Index of the nearest valid center for every point: (B, N) long, -1 for invalid points.

    Points also get -1 when their batch element has no valid center at all.
    """
    # ||x||² is the same for every center of a point, so it does not change the argmin.
    d = (centers * centers).sum(-1).unsqueeze(1) - 2.0 * x @ centers.transpose(1, 2)
    if center_valid is not None:
        d = d.masked_fill(~center_valid.unsqueeze(1), float("inf"))
    labels = d.argmin(-1)
    drop = torch.zeros_like(labels, dtype=torch.bool)
    if valid is not None:
        drop |= ~valid
    if center_valid is not None:
        drop |= ~center_valid.any(1, keepdim=True)
    return labels.masked_fill(drop, -1)


def cluster_means(x: Tensor, labels: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per-cluster means (B, k, D) and point counts (B, k); label -1 means "no cluster".

    Empty clusters get a zero mean. Differentiable in ``x``.
    """
    onehot = F.one_hot(labels.clamp(min=0), k).to(x.dtype) * (labels >= 0).unsqueeze(-1)
    counts = onehot.sum(1)
    means = onehot.transpose(1, 2) @ x / counts.clamp(min=1).unsqueeze(-1)
    return means, counts


def _gather_points(x: Tensor, idx: Tensor) -> Tensor:
    """x (B, N, D), idx (B, M) -> (B, M, D)."""
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _kmeanspp_init(x: Tensor, k: int, valid: Tensor, generator: torch.Generator | None) -> Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007), batched over B."""
    # Uniform over the valid points; over all points where a batch element has none, so that
    # torch.multinomial never sees an all-zero row (such elements are overridden by the caller).
    uniform = valid.to(x.dtype) + (~valid.any(1, keepdim=True)).to(x.dtype)
    xx = (x * x).sum(-1)

    def sq_dist(c: Tensor) -> Tensor:  # (B, N); expanded form avoids a (B, N, D) temporary
        return (xx - 2.0 * (x @ c.transpose(1, 2)).squeeze(-1) + (c * c).sum(-1)).clamp(min=0)

    idx = torch.multinomial(uniform, 1, generator=generator)
    centers = [_gather_points(x, idx)]
    d2 = sq_dist(centers[0])
    for _ in range(1, k):
        w = d2 * valid
        # All valid points already coincide with a center (fewer distinct points than k).
        w = torch.where(w.sum(1, keepdim=True) > 0, w, uniform)
        idx = torch.multinomial(w, 1, generator=generator)
        centers.append(_gather_points(x, idx))
        d2 = torch.minimum(d2, sq_dist(centers[-1]))
    return torch.cat(centers, 1)


def _first_valid_points(x: Tensor, valid: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The valid points of each element moved to the front, cut or zero-padded to k slots."""
    order = torch.argsort(valid.to(torch.uint8), dim=1, descending=True, stable=True)[:, :k]
    pts, ok = _gather_points(x, order), valid.gather(1, order)
    pad = k - pts.shape[1]
    if pad > 0:
        pts, ok = F.pad(pts, (0, 0, 0, pad)), F.pad(ok, (0, pad), value=False)
    return pts * ok.unsqueeze(-1), ok


@torch.no_grad()
def kmeans(
    x: Tensor,
    k: int,
    *,
    iters: int = 10,
    valid: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means with k-means++ seeding, batched over the leading dimension.

    Args:
        x: (B, N, D) points.
        k: clusters per batch element.
        iters: maximum Lloyd iterations (stops early once no assignment changes).
        valid: (B, N) bool, the points to cluster; all points when None.
        generator: makes the seeding deterministic; must live on ``x``'s device.

    Returns:
        centers (B, k, D) and center_valid (B, k) bool. A batch element with at most k valid
        points gets those points themselves as centers, zero-padded with center_valid False
        (no valid points: all False). Empty clusters keep their previous center.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    x = x.detach()
    if valid is None:
        valid = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    centers = _kmeanspp_init(x, k, valid, generator)
    labels = None
    for _ in range(iters):
        new_labels = assign(x, centers, valid=valid)
        if labels is not None and torch.equal(new_labels, labels):
            break
        labels = new_labels
        means, counts = cluster_means(x, labels, k)
        centers = torch.where(counts.unsqueeze(-1) > 0, means, centers)

    few = valid.sum(1) <= k
    points, points_ok = _first_valid_points(x, valid, k)
    centers = torch.where(few[:, None, None], points, centers)
    center_valid = torch.where(few[:, None], points_ok, torch.ones_like(points_ok))
    return centers, center_valid
