"""Pseudo masks without labels: spherical k-means on pixel features, refined in superpixels.

Steps (UMTFSS, Li et al. AAAI 2024, §3.2), each a plain function; `flows/pseudo.py` runs them on
a Dask cluster (k-means driven from the flow's process, assignment in runs of shards):

1. ``sample_shard``: a seeded random sample of L2-normalised feature pixels of one shard (only
   images of the fitting splits, "train" by default, so test images never shape the clusters).
2. ``spherical_kmeans``: k-means++ seeding on a sub-sample, then Lloyd iterations in which every
   sample piece computes per-cluster sums and counts where it lives (a Dask worker) and the
   driver reduces them in a fixed order. Cosine is the natural similarity of unit features, so
   centres are renormalised means (spherical k-means).
3. ``assign_shard``: nearest centre per pixel of upsampled score maps, majority vote inside
   Felzenszwalb superpixels, and per image: the pseudo mask, pixels per cluster, the height and
   width each cluster spans, and masked-average prototypes for the pseudo-task sampler.
4. ``background_clusters``: clusters spanning nearly the whole height or width of most images
   they occur in (the paper's background filter), stored as attributes.
5. ``cluster_report``: purity, NMI and Hungarian-matched mIoU against the true masks: the ONLY
   function here that reads labels.

Why our own k-means and not dask-ml's ``KMeans``: dask-ml 2025.1.0 (the latest release) does
import and run with dask 2026.8 here, but it pulls in numba + llvmlite, it is Euclidean only
(no spherical variant), and it was slow: 22-35 s for 100k x 256 points, K=30, 20 iterations,
where a Lloyd step of ours is a (m, D) x (D, K) matmul per piece (milliseconds). Its
k-means|| seeding also needs the data as one Dask array. Ours needs nothing beyond torch and
distributed, keeps each sample piece on the worker that drew it, and is deterministic for a
seed: pieces are drawn with per-shard seeds and partial sums are reduced in float64 in a fixed
order, so the result does not depend on the cluster's size or timing.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from skimage.segmentation import felzenszwalb

from tasks import defaults, jsonsafe
from tasks.data import store
from tasks.malloc import large_buffers_on_heap

KIND = "pseudo"
MASK, COUNTS, SPANS, PROTOTYPES = "mask", "counts", "spans", "prototypes"
UNASSIGNED = 255  # rows that hold no ingested image


@dataclass(frozen=True)
class PseudoConfig:
    """Everything that shapes the pseudo masks (all of it names the output)."""

    k: int = defaults.PSEUDO_K
    seed: int = defaults.SEED
    sample_size: int = defaults.PSEUDO_SAMPLE_SIZE  # feature pixels drawn over the fitting images
    init_size: int = 20_000  # of which k-means++ seeds on this many
    iters: int = defaults.PSEUDO_ITERS
    tol: float = 1e-5  # stop once no centre moves by more than 1 - cos = tol
    groups: int = 16  # Lloyd steps map over this many groups of sample pieces
    fit_splits: tuple[str, ...] = defaults.PSEUDO_FIT_SPLITS
    sp_scale: float = defaults.SP_SCALE  # Felzenszwalb superpixels on the canonical image
    sp_sigma: float = defaults.SP_SIGMA
    sp_min_size: int = defaults.SP_MIN_SIZE

    def __post_init__(self) -> None:
        if not 2 <= self.k < UNASSIGNED:
            raise ValueError(f"k must be in [2, {UNASSIGNED - 1}], got {self.k}")
        if self.sample_size < self.k or self.init_size < self.k:
            raise ValueError("sample_size and init_size must be at least k")

    def params(self, features_key: str) -> dict[str, Any]:
        return {"features": features_key, **asdict(self), "fit_splits": list(self.fit_splits)}

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> PseudoConfig:
        kw = {k: v for k, v in params.items() if k != "features"}
        return cls(**{**kw, "fit_splits": tuple(kw["fit_splits"])})


# ---------------------------------------------------------------------------------------------
# Sampling


def sample_shard(store_url: str, name: str, version: str, features_key: str, shard: int,
                 per_image: int, seed: int, splits: Sequence[str]) -> np.ndarray:
    """``per_image`` random feature pixels of each fitting image of a shard: (m, D) float32.

    Seeded by (seed, shard), so a piece is the same wherever and whenever it is drawn; rows are
    shuffled so that any prefix is a random sub-sample.
    """
    index = store.read_index(store_url, name, version, shard)
    use = ((index["status"] == store.INGESTED) & index["split"].isin(list(splits))).to_numpy()
    f = store.open_derived(store_url, name, features_key, version, cache_bytes=0).shard(shard)
    n, d, h, w = f.shape
    rng = np.random.default_rng([seed, shard])
    take = min(per_image, h * w)
    picks = [f[i].reshape(d, h * w)[:, rng.choice(h * w, take, replace=False)].T
             for i in np.flatnonzero(use)]
    x = np.concatenate(picks).astype(np.float32) if picks else np.zeros((0, d), np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # undo float16 rounding
    return x[rng.permutation(len(x))]


# ---------------------------------------------------------------------------------------------
# Spherical k-means, distributed over the pieces of a sample


@dataclass
class KMeansResult:
    centers: np.ndarray  # (K, D) float32, unit rows
    counts: np.ndarray  # (K,) sample points per cluster at the last assignment
    objective: list[float] = field(default_factory=list)  # mean cosine to the nearest centre
    iterations: int = 0
    converged: bool = False
    seconds: float = 0.0


class _Fanout:
    """Maps a function over pieces here (no client) or where they live on a Dask cluster."""

    def __init__(self, client: Any | None = None):
        self.client = client

    def map(self, fn: Callable, *iterables: Sequence, **kw: Any) -> list:
        """Like ``map``, keeping results on the workers (futures) when there is a client."""
        if self.client is None:
            return [fn(*args, **kw) for args in zip(*iterables, strict=True)]
        return self.client.map(fn, *iterables, **kw, pure=False)

    def submit(self, fn: Callable, *args: Any) -> Any:
        return fn(*args) if self.client is None else self.client.submit(fn, *args, pure=False)

    def gather(self, results: list) -> list:
        return results if self.client is None else self.client.gather(results)

    def share(self, value: Any) -> Any:
        """Send one value to every worker once, instead of once per task."""
        if self.client is None:
            return value
        return self.client.scatter(value, broadcast=True, hash=False)


def _length(x: np.ndarray) -> int:
    return len(x)


def _head(x: np.ndarray, n: int) -> np.ndarray:
    return x[:n]


def _concat(*pieces: np.ndarray) -> np.ndarray:
    return np.concatenate(pieces)


def _partial_stats(x: np.ndarray, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Per-cluster float64 sums, counts and summed best cosine of one piece."""
    k, d = centers.shape
    if len(x) == 0:
        return np.zeros((k, d)), np.zeros(k, np.int64), 0.0
    xt = torch.from_numpy(x)
    best, labels = (xt @ torch.from_numpy(centers).T).max(1)
    # float32 sums within a piece (index_add_ adds rows in index order: deterministic), float64
    # across pieces; converting the piece to float64 first costs 7x more.
    sums = torch.zeros(k, d).index_add_(0, labels, xt)
    counts = torch.bincount(labels, minlength=k).numpy()
    return sums.double().numpy(), counts, float(best.double().sum())


def kmeans_pp(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii 2007; sklearn's 2 + log k trials)."""
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    first = int(torch.randint(n, (1,), generator=generator))
    centers = [x[first]]
    d2 = (2.0 - 2.0 * x @ x[first]).clamp(min=0)  # squared distance of unit vectors
    for _ in range(1, k):
        total = float(d2.sum())
        if total <= 0:  # fewer distinct points than k: any point will do
            cand = torch.randint(n, (trials,), generator=generator)
        else:
            cand = torch.multinomial(d2, trials, replacement=True, generator=generator)
        cand_d2 = torch.minimum(d2, (2.0 - 2.0 * x[cand] @ x.T).clamp(min=0))
        best = int(cand_d2.sum(1).argmin())
        centers.append(x[cand[best]])
        d2 = cand_d2[best]
    return torch.stack(centers)


def spherical_kmeans(pieces: Sequence, k: int, *, seed: int = 0, iters: int = 50,
                     tol: float = 1e-5, init_size: int = 20_000, groups: int = 16,
                     client: Any | None = None) -> KMeansResult:
    """Spherical k-means over unit-norm pieces (arrays here, or futures with ``client``).

    k-means++ seeds on up to ``init_size`` points taken from the heads of the pieces in
    proportion to their sizes. The pieces are then joined into ``groups`` runs of consecutive
    pieces (fewer, larger tasks per step; the same grouping on any cluster keeps the float sums,
    and so the result, identical); each Lloyd step maps ``_partial_stats`` over the groups and
    the driver reduces in group order. Empty clusters keep their previous centre.
    """
    t0 = time.perf_counter()
    run = _Fanout(client)
    sizes = np.asarray(run.gather(run.map(_length, pieces)), np.int64)
    total = int(sizes.sum())
    if total < k:
        raise ValueError(f"{total} sample points cannot make {k} clusters")
    take = np.floor(sizes * min(1.0, init_size / total)).astype(int).tolist()
    heads = run.gather(run.map(_head, pieces, take))
    init = torch.from_numpy(np.concatenate(heads))
    generator = torch.Generator().manual_seed(seed)
    centers = kmeans_pp(init, k, generator).numpy().astype(np.float32)
    runs = [r for r in np.array_split(np.arange(len(pieces)), groups) if len(r)]
    pieces = [run.submit(_concat, *[pieces[i] for i in r]) for r in runs]
    result = KMeansResult(centers=centers, counts=np.zeros(k, np.int64))
    for _ in range(iters):
        stats = run.gather(run.map(_partial_stats, pieces, centers=run.share(centers)))
        sums = np.zeros((k, centers.shape[1]), np.float64)
        counts = np.zeros(k, np.int64)
        best = 0.0
        for s, c, b in stats:  # fixed order: the same sums on any cluster
            sums += s
            counts += c
            best += b
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        new = np.where(norms > 0, sums / np.maximum(norms, 1e-300), centers).astype(np.float32)
        shift = float((1.0 - (new * centers).sum(1)).max())
        centers = new
        result.iterations += 1
        result.objective.append(best / total)
        result.counts = counts
        if shift <= tol:
            result.converged = True
            break
    result.centers = centers
    result.seconds = time.perf_counter() - t0
    return result


def fit_kmeans(store_url: str, name: str, version: str, features_key: str, cfg: PseudoConfig,
               client: Any | None = None) -> KMeansResult:
    """Sample feature pixels of every shard (in parallel) and cluster them."""
    index = store.read_index(store_url, name, version)
    n_fit = int(((index["status"] == store.INGESTED)
                 & index["split"].isin(list(cfg.fit_splits))).sum())
    if n_fit == 0:
        raise ValueError(f"no ingested images in splits {list(cfg.fit_splits)} to cluster")
    per_image = max(1, math.ceil(cfg.sample_size / n_fit))
    n_shards = store.open_derived(store_url, name, features_key, version).n_shards
    run = _Fanout(client)
    pieces = run.map(_sample, range(n_shards), store_url=store_url, name=name, version=version,
                     features_key=features_key, per_image=per_image, seed=cfg.seed,
                     splits=list(cfg.fit_splits))
    return spherical_kmeans(pieces, cfg.k, seed=cfg.seed, iters=cfg.iters, tol=cfg.tol,
                            init_size=cfg.init_size, groups=cfg.groups, client=client)


def _sample(shard: int, **kw: Any) -> np.ndarray:
    return sample_shard(shard=shard, **kw)


# ---------------------------------------------------------------------------------------------
# Assignment and superpixel refinement


def upsample_scores(scores: torch.Tensor, size: tuple[int, int], stride: int) -> torch.Tensor:
    """(K, h, w) scores → (K, H, W) for an unpadded H×W image seen at output stride ``stride``.

    Feature cell i covers pixels [i·stride, (i+1)·stride): scores are upsampled bilinearly
    (align_corners=False) to (h·stride, w·stride) and cropped to (H, W), so nothing is
    stretched; when H and W are multiples of the stride this is plain interpolation to (H, W).
    """
    (height, width), (h, w) = size, scores.shape[-2:]
    if h * stride < height or w * stride < width:
        raise ValueError(f"a {h}x{w} map at stride {stride} does not cover {height}x{width}")
    up = F.interpolate(scores[None].float(), size=(h * stride, w * stride), mode="bilinear",
                       align_corners=False)[0]
    return up[:, :height, :width]


def superpixel_vote(labels: np.ndarray, segments: np.ndarray, k: int) -> np.ndarray:
    """Every superpixel takes the cluster most of its pixels have (ties: the lower id)."""
    votes = np.bincount(segments.ravel() * k + labels.ravel(),
                        minlength=(int(segments.max()) + 1) * k).reshape(-1, k)
    return votes.argmax(1)[segments]


def refine(image: np.ndarray, scores: torch.Tensor, stride: int,
           cfg: PseudoConfig) -> np.ndarray:
    """Pseudo mask (H, W) uint8 of an image (H, W, 3) from its (K, h, w) cluster scores."""
    k = scores.shape[0]
    labels = upsample_scores(scores, image.shape[:2], stride).max(0).indices.numpy()
    segments = felzenszwalb(image, scale=cfg.sp_scale, sigma=cfg.sp_sigma,
                            min_size=cfg.sp_min_size)
    return superpixel_vote(labels, segments, k).astype(np.uint8)


def region_spans(mask: np.ndarray, k: int) -> np.ndarray:
    """(K, 2) rows and columns each cluster spans (first to last, inclusive); 0 when absent."""
    onehot = mask[None] == np.arange(k)[:, None, None]
    out = np.zeros((k, 2), np.int32)
    for axis, reduce_over in ((0, 2), (1, 1)):
        hit = onehot.any(reduce_over)  # (K, H) for rows, (K, W) for columns
        n = hit.shape[1]
        first = hit.argmax(1)
        last = n - 1 - hit[:, ::-1].argmax(1)
        out[:, axis] = np.where(hit.any(1), last - first + 1, 0)
    return out


def masked_prototypes(features: torch.Tensor, mask: np.ndarray, k: int,
                      stride: int) -> np.ndarray:
    """(K, D) unit masked-average prototypes of each cluster (zero when absent).

    The mask is area-pooled to the feature grid with the geometry of ``upsample_scores``.
    """
    d, h, w = features.shape
    onehot = torch.from_numpy(mask[None] == np.arange(k)[:, None, None]).float()
    onehot = F.pad(onehot, (0, w * stride - mask.shape[1], 0, h * stride - mask.shape[0]))
    weights = F.avg_pool2d(onehot[None], stride)[0].reshape(k, h * w)
    protos = weights @ features.reshape(d, h * w).T
    return F.normalize(protos, dim=1).numpy()


@dataclass
class ShardReport:
    shard: int
    images: int = 0
    skipped: bool = False
    seconds: float = 0.0


def pseudo_fields(n_clusters: int, size: int, dim: int) -> list[store.DerivedField]:
    return [
        store.DerivedField(MASK, (size, size), "uint8", fill=UNASSIGNED, compress=True),
        store.DerivedField(COUNTS, (n_clusters,), "int64"),
        store.DerivedField(SPANS, (n_clusters, 2), "int32"),
        store.DerivedField(PROTOTYPES, (n_clusters, dim), "float16"),
    ]


def pseudo_key(features_key: str, cfg: PseudoConfig) -> str:
    return store.derived_key(KIND, cfg.params(features_key))


def create_pseudo(store_url: str, name: str, version: str, features_key: str,
                  cfg: PseudoConfig, result: KMeansResult) -> str:
    """Create the pseudo-mask group with its centres (orchestrator only); returns its key."""
    size = int(store.dataset_attrs(store_url, name, version)["size"])
    fattrs = store.derived_attrs(store_url, name, version, features_key)
    key, _ = store.create_derived(
        store_url, name, version, KIND, cfg.params(features_key),
        pseudo_fields(cfg.k, size, int(fattrs["dim"])),
        extra={"centers": result.centers, "sample_counts": result.counts},
        attrs={"stride": int(fattrs["stride"]), "size": size,
               "kmeans": {"iterations": result.iterations, "converged": result.converged,
                          "objective": result.objective[-1] if result.objective else None,
                          "seconds": round(result.seconds, 3)}})
    return key


def assign_shard(store_url: str, name: str, version: str, key: str,
                 shard: int) -> ShardReport:
    """Pseudo masks, counts, spans and prototypes of one shard; a no-op when it is done."""
    if store.shard_is_done(store_url, name, version, shard, derived=key):
        return ShardReport(shard=shard, skipped=True)
    t0 = time.perf_counter()
    pseudo = store.open_derived(store_url, name, key, version, cache_bytes=0)
    cfg = PseudoConfig.from_params(pseudo.params)
    stride, size = int(pseudo.attrs["stride"]), int(pseudo.attrs["size"])
    centers = torch.from_numpy(pseudo.extra("centers"))
    ok = store.read_index(store_url, name, version, shard)["status"].to_numpy() == store.INGESTED
    images = store.read_dataset_shard(store_url, name, version, "images", shard)
    features = store.open_derived(store_url, name, pseudo.params["features"], version,
                                  cache_bytes=0).shard(shard)
    n, k = len(images), cfg.k
    out = {MASK: np.full((n, size, size), UNASSIGNED, np.uint8),
           COUNTS: np.zeros((n, k), np.int64), SPANS: np.zeros((n, k, 2), np.int32),
           PROTOTYPES: np.zeros((n, k, centers.shape[1]), np.float16)}
    for i in np.flatnonzero(ok):
        f = F.normalize(torch.from_numpy(features[i].astype(np.float32)), dim=0)
        scores = torch.einsum("kd,dhw->khw", centers, f)
        mask = refine(images[i], scores, stride, cfg)
        out[MASK][i] = mask
        out[COUNTS][i] = np.bincount(mask.ravel(), minlength=k)[:k]
        out[SPANS][i] = region_spans(mask, k)
        out[PROTOTYPES][i] = masked_prototypes(f, mask, k, stride)
    store.write_derived_shard(store_url, name, version, key, shard, out)
    return ShardReport(shard=shard, images=int(ok.sum()), seconds=time.perf_counter() - t0)


def assign_shards(store_url: str, name: str, version: str, key: str,
                  shards: Sequence[int]) -> list[ShardReport]:
    """`assign_shard` for several shards one after another: what one task of the pseudo flow
    runs on a Dask worker."""
    with large_buffers_on_heap():  # a Dask worker's malloc settings fault in every buffer
        return [assign_shard(store_url, name, version, key, shard) for shard in shards]


def background_clusters(spans: np.ndarray, counts: np.ndarray, size: int, *,
                        span_frac: float = 0.9, image_frac: float = 0.5) -> list[int]:
    """Clusters whose region spans ≥ ``span_frac`` of the height or width in more than
    ``image_frac`` of the images where they occur (UMTFSS's background filter, label-free)."""
    present = counts > 0  # (N, K)
    wide = (spans.max(-1) >= span_frac * size) & present
    n_present = present.sum(0)
    share = wide.sum(0) / np.maximum(n_present, 1)
    return [int(c) for c in np.flatnonzero((share > image_frac) & (n_present > 0))]


def finalize_pseudo(store_url: str, name: str, version: str, key: str, *,
                    span_frac: float = 0.9, image_frac: float = 0.5) -> dict[str, Any]:
    """Mark the group complete and store background-like clusters and cluster sizes as attrs.

    The flags are a cheap view of the stored spans; the thresholds are recorded beside them and
    ``background_clusters`` recomputes them with others.
    """
    pseudo = store.open_derived(store_url, name, key, version)
    summary = {"shards": pseudo.n_shards,
               "shards_done": len(store.done_shards(store_url, name, version, derived=key))}
    if summary["shards_done"] < summary["shards"]:
        return store.finalize_derived(store_url, name, version, key)
    counts, spans = pseudo.read(COUNTS), pseudo.read(SPANS)
    background = background_clusters(spans, counts, int(pseudo.attrs["size"]),
                                     span_frac=span_frac, image_frac=image_frac)
    return store.finalize_derived(store_url, name, version, key, attrs={
        "background": {"clusters": background, "span_frac": span_frac,
                       "image_frac": image_frac},
        "cluster_pixels": counts.sum(0).tolist(),
        "cluster_images": (counts > 0).sum(0).tolist()})


# ---------------------------------------------------------------------------------------------
# Quality report: the only place that reads labels


def contingency(store_url: str, name: str, version: str, key: str) -> dict[str, np.ndarray]:
    """Per split, (K, C) pixel counts of (pseudo cluster, true class) at canonical size.

    Pixels labelled 255 are left out. One pass over the shards reads every mask once.
    """
    pseudo = store.open_derived(store_url, name, key, version, cache_bytes=0)
    n_classes = len(store.dataset_attrs(store_url, name, version)["classes"])
    k = int(pseudo.params["k"])
    tables: dict[str, np.ndarray] = {}
    for shard in range(pseudo.n_shards):
        index = store.read_index(store_url, name, version, shard)
        ok = (index["status"] == store.INGESTED).to_numpy()
        if not ok.any():
            continue
        truth = store.read_dataset_shard(store_url, name, version, "masks", shard)
        pred = pseudo.shard(shard, MASK)
        splits = index["split"].to_numpy()
        for split in np.unique(splits[ok]):
            use = ok & (splits == split)
            t, p = truth[use], pred[use]
            valid = (t != store.IGNORE_INDEX) & (p != UNASSIGNED) & (t < n_classes)
            flat = p[valid].astype(np.int64) * n_classes + t[valid]
            counts = np.bincount(flat, minlength=k * n_classes).reshape(k, n_classes)
            tables[str(split)] = tables.get(str(split), 0) + counts
    return tables


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def cluster_scores(table: np.ndarray, background: int | None = 0) -> dict[str, Any]:
    """Purity, NMI (arithmetic normalisation) and Hungarian-matched IoU of a (K, C) table.

    Each class present in the ground truth is matched to one distinct cluster maximising the
    summed IoU; mIoU averages over present classes (unmatched ones count 0), ``miou_fg`` leaves
    out the ``background`` class.
    """
    total = table.sum()
    if total == 0:
        raise ValueError("no labelled pixel to score against")
    joint = table / total
    pk, pc = joint.sum(1), joint.sum(0)
    nz = joint > 0
    mi = float((joint[nz] * np.log(joint[nz] / np.outer(pk, pc)[nz])).sum())
    h = (_entropy(pk) + _entropy(pc)) / 2
    inter = table.astype(np.float64)
    union = table.sum(1, keepdims=True) + table.sum(0, keepdims=True) - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    rows, cols = linear_sum_assignment(-iou)
    present = np.flatnonzero(table.sum(0) > 0)
    per_class = {int(c): {"cluster": None, "iou": 0.0, "pixels": int(table[:, c].sum())}
                 for c in present}
    for r, c in zip(rows, cols, strict=True):
        if c in per_class:
            per_class[c].update(cluster=int(r), iou=float(iou[r, c]))
    fg = [c for c in per_class if c != background]
    return {
        "purity": float(table.max(1).sum() / total),
        "nmi": mi / h if h > 0 else 1.0,
        "miou": float(np.mean([v["iou"] for v in per_class.values()])),
        "miou_fg": float(np.mean([per_class[c]["iou"] for c in fg])) if fg else float("nan"),
        "pixels": int(total),
        "per_class": per_class,
    }


def cluster_report(store_url: str, name: str, version: str, key: str) -> dict[str, Any]:
    """Scores over all labelled images and per split, with the dataset's class names."""
    classes = store.dataset_attrs(store_url, name, version)["classes"]
    tables = {s: t for s, t in sorted(contingency(store_url, name, version, key).items())
              if t.sum() > 0}  # splits without labels are not scored
    if not tables:
        raise ValueError(f"{name}/{version} has no labelled pixel to score against")
    return {"dataset": name, "version": version, "pseudo": key, "classes": classes,
            "all": cluster_scores(sum(tables.values())),
            "splits": {s: cluster_scores(t) for s, t in tables.items()}}


def write_report(report: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """``report.json`` (everything) and ``per_class.csv`` (one row per split and class)."""
    import pandas as pd

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "report.json"
    jsonsafe.write_json(json_path, report)  # NaN (no foreground) as null
    rows = [{"split": split, "class_id": c, "class": report["classes"][c], **v}
            for split, scores in [("all", report["all"]), *report["splits"].items()]
            for c, v in scores["per_class"].items()]
    csv_path = out / "per_class.csv"
    pd.DataFrame(rows).to_csv(csv_path, index=False)
    return [json_path, csv_path]


def report_metrics(report: dict[str, Any]) -> dict[str, float]:
    """Flat metric names for MLflow: ``purity``, ``val_nmi``, ..."""
    out = {}
    for prefix, scores in [("", report["all"])] + [(f"{s}_", v)
                                                   for s, v in report["splits"].items()]:
        for m in ("purity", "nmi", "miou", "miou_fg"):
            out[f"{prefix}{m}"] = scores[m]
    return out


def log_report(report: dict[str, Any], files: Sequence[Path], experiment: str,
               params: dict[str, Any]) -> str:
    """One MLflow run per pseudo-mask group with its params, metrics and report files.

    A rerun finds the group's run by its ``pseudo_key`` tag and logs nothing twice.
    """
    from mlflow.tracking import MlflowClient

    from tasks.study.tracking import Tracker, ensure_experiment, tracking_uri

    uri = tracking_uri()
    found = MlflowClient(uri).search_runs(
        [ensure_experiment(experiment, uri)],
        filter_string=f"tags.pseudo_key = '{report['pseudo']}'", max_results=1)
    if found:
        return found[0].info.run_id
    tracker = Tracker(experiment, run_name=f"pseudo {report['dataset']} {report['pseudo']}",
                      tags={"stage": "pseudo", "dataset": report["dataset"],
                            "pseudo_key": report["pseudo"]})
    tracker.log_params({k: json.dumps(v) if isinstance(v, list | dict) else v
                        for k, v in params.items()})
    tracker.log_metrics(report_metrics(report))
    for path in files:
        tracker.log_artifact(path, "cluster_report")
    tracker.finish()
    return tracker.run_id
