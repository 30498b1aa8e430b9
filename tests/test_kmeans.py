"""Tests for the batched torch k-means used to build UMT prototypes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.kmeans import assign, cluster_means, kmeans


def _lloyd_reference(x: np.ndarray, k: int, rng: np.random.Generator, restarts: int = 5):
    """Plain numpy k-means++ + Lloyd, best of a few restarts (what sklearn's KMeans does)."""
    best, best_inertia = None, np.inf
    for _ in range(restarts):
        centers = [x[rng.integers(len(x))]]
        for _ in range(1, k):
            d2 = ((x[:, None] - np.array(centers)[None]) ** 2).sum(-1).min(1)
            centers.append(x[rng.choice(len(x), p=d2 / d2.sum())])
        centers = np.array(centers)
        for _ in range(100):
            labels = ((x[:, None] - centers[None]) ** 2).sum(-1).argmin(1)
            new = np.array(
                [x[labels == j].mean(0) if (labels == j).any() else centers[j] for j in range(k)]
            )
            if np.allclose(new, centers):
                break
            centers = new
        inertia = ((x - centers[labels]) ** 2).sum()
        if inertia < best_inertia:
            best, best_inertia = centers, inertia
    return best


def _match(a: np.ndarray, b: np.ndarray) -> float:
    """Largest distance between the centers of a and their nearest, distinct, centers in b."""
    d = np.linalg.norm(a[:, None] - b[None], axis=-1)
    nearest = d.argmin(1)
    assert len(set(nearest.tolist())) == len(a), "two centers matched the same reference center"
    return float(d.min(1).max())


def _blobs(batch: int, k: int, per: int, dim: int, seed: int):
    rng = np.random.default_rng(seed)
    means = rng.uniform(-10, 10, size=(batch, k, dim))
    pts = means[:, :, None] + 0.3 * rng.standard_normal((batch, k, per, dim))
    pts = pts.reshape(batch, k * per, dim)
    perm = rng.permutation(k * per)
    return torch.tensor(pts[:, perm], dtype=torch.float32), means


def test_recovers_separated_blobs_like_reference():
    x, means = _blobs(batch=3, k=4, per=60, dim=5, seed=0)
    gen = torch.Generator().manual_seed(0)
    centers, ok = kmeans(x, 4, iters=20, generator=gen)
    assert centers.shape == (3, 4, 5) and ok.all()
    rng = np.random.default_rng(1)
    for b in range(3):
        ref = _lloyd_reference(x[b].double().numpy(), 4, rng)
        assert _match(centers[b].numpy(), ref) < 1e-4
        assert _match(centers[b].numpy(), means[b]) < 0.2


def test_fewer_valid_points_than_k_returns_the_points():
    x = torch.randn(3, 10, 2)
    valid = torch.zeros(3, 10, dtype=torch.bool)
    valid[0, [1, 4, 7]] = True  # 3 points < k
    valid[2] = True  # 10 points > k: ordinary clustering
    centers, ok = kmeans(x, 5, valid=valid, generator=torch.Generator().manual_seed(0))
    assert ok[0].tolist() == [True, True, True, False, False]
    torch.testing.assert_close(centers[0, :3], x[0, [1, 4, 7]])
    assert (centers[0, 3:] == 0).all()
    assert not ok[1].any()  # no valid points at all
    assert ok[2].all() and torch.isfinite(centers).all()


def test_fewer_points_than_k_overall():
    x = torch.randn(2, 3, 4)
    centers, ok = kmeans(x, 6)
    assert centers.shape == (2, 6, 4)
    assert ok.tolist() == [[True] * 3 + [False] * 3] * 2
    torch.testing.assert_close(centers[:, :3], x)


def test_valid_mask_respected():
    x, _ = _blobs(batch=2, k=3, per=40, dim=2, seed=3)
    valid = torch.rand(x.shape[:2], generator=torch.Generator().manual_seed(0)) < 0.7
    x = x.clone()
    x[~valid] = 1e4  # far-away decoys that must not attract any center
    centers, ok = kmeans(x, 3, valid=valid, generator=torch.Generator().manual_seed(0))
    assert ok.all()
    assert centers.abs().max() < 20
    labels = assign(x, centers, ok, valid)
    assert (labels[~valid] == -1).all() and (labels[valid] >= 0).all()


def test_duplicate_points_leave_empty_clusters_finite():
    # 3 distinct points repeated: k-means++ must reuse points, so some clusters end up empty.
    x = torch.tensor([[0.0, 0.0], [5.0, 5.0], [-5.0, 5.0]]).repeat(1, 10, 1)
    centers, ok = kmeans(x, 5, generator=torch.Generator().manual_seed(0))
    assert ok.all() and torch.isfinite(centers).all()
    dist = torch.cdist(centers[0], x[0, :3]).min(1).values
    assert (dist < 1e-5).all()


def test_deterministic_with_seeded_generator():
    x = torch.randn(4, 200, 8)
    a = kmeans(x, 7, generator=torch.Generator().manual_seed(123))
    b = kmeans(x, 7, generator=torch.Generator().manual_seed(123))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_kmeans_builds_no_graph_and_cluster_means_is_differentiable():
    x = torch.randn(2, 50, 4, requires_grad=True)
    centers, ok = kmeans(x, 3)
    assert not centers.requires_grad
    labels = assign(x.detach(), centers, ok)
    means, counts = cluster_means(x, labels, 3)
    assert counts.sum().item() == 100
    means.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_rejects_non_positive_k():
    with pytest.raises(ValueError):
        kmeans(torch.randn(1, 4, 2), 0)
