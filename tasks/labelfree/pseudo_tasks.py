"""Pseudo meta-tasks: 1-way K-shot episodes built from cluster pseudo masks, without labels.

UMTFSS (Li et al., AAAI 2024, Sec. 3.3): the query mask is the region of one cluster in an image
(every other cluster is background); clusters whose regions are too small are not used in that
image, and background-like clusters (spanning nearly the whole height or width) never are. The
supports are drawn from the `top_k` images whose masked-average prototype of that cluster is
most similar (cosine) to the query's. Episode i depends only on the seed and i.

Only images and pseudo masks are read: `tests/test_pseudo_tasks.py` asserts no label array is.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from models.conventions import IGNORE_INDEX
from tasks.data.store import Dataset, Derived
from tasks.fewshot.episodes import Episode


class PseudoEpisodeSampler:
    """Draws pseudo episodes with the same `episode(i) -> Episode` interface as EpisodeSampler.

    `Episode.classes` holds the cluster id: the target is episode label 1 on that cluster.
    The area floor `min_pixels` counts pixels at the canonical size (pseudo masks live there).
    """

    ways = 1
    dropped_classes: list[int] = []  # unusable clusters are filtered, not scored as missing

    def __init__(self, dataset: Dataset, pseudo: Derived, *, split: str = "train",
                 shots: int = 1, min_pixels: int = 2 * 32 * 32, top_k: int = 10,
                 image_ids: Sequence[str] | None = None, seed: int = 0):
        if shots < 1 or top_k < shots:
            raise ValueError(f"need shots >= 1 and top_k >= shots, got {shots}, {top_k}")
        self.dataset, self.pseudo = dataset, pseudo
        self.shots, self.top_k, self.seed = shots, top_k, seed
        ids = (list(image_ids) if image_ids is not None
               else dataset.split_ids(split, unlabelled=True))  # label-free: every image
        self.ids = np.asarray(sorted(ids))
        rows = np.asarray([pseudo.row(i) for i in self.ids], dtype=np.int64)
        counts = pseudo.read("counts")[rows]  # (n, K)
        self.n_clusters = counts.shape[1]
        protos = pseudo.read("prototypes")[rows].astype(np.float32)  # (n, K, D)
        norms = np.linalg.norm(protos, axis=-1, keepdims=True)
        self._protos = protos / np.maximum(norms, 1e-8)
        background = set(pseudo.attrs.get("background", {}).get("clusters", []))
        self.eligible: dict[int, np.ndarray] = {}
        for c in range(counts.shape[1]):
            members = np.flatnonzero(counts[:, c] >= min_pixels)
            if c not in background and members.size >= shots + 1:
                self.eligible[c] = members
        self.clusters = sorted(self.eligible)
        if not self.clusters:
            raise ValueError(
                f"no cluster has {shots + 1} images with >= {min_pixels} px outside the "
                f"{len(background)} background-like clusters: lower min_pixels or add images")
        self.background = sorted(background)

    @property
    def classes(self) -> list[int]:
        """The usable clusters, under the name evaluation expects of a sampler."""
        return self.clusters

    def class_names(self) -> list[str]:
        """A name per cluster id, for per-cluster metrics."""
        return [f"cluster{c}" for c in range(self.n_clusters)]

    def draw(self, index: int) -> tuple[int, list[str], str]:
        """(cluster, support ids, query id) of episode `index`, without reading pixels."""
        rng = np.random.default_rng([self.seed, index])
        cluster = self.clusters[rng.integers(len(self.clusters))]
        members = self.eligible[cluster]
        query = members[rng.integers(members.size)]
        others = members[members != query]
        # Supports: among the images holding this cluster, the most similar in it.
        sims = self._protos[others, cluster] @ self._protos[query, cluster]
        nearest = others[np.argsort(-sims, kind="stable")[: self.top_k]]
        supports = rng.choice(nearest, size=self.shots, replace=False)
        return cluster, self.ids[supports].tolist(), str(self.ids[query])

    def _binary(self, image_id: str, cluster: int) -> np.ndarray:
        mask = self.pseudo.get(image_id, "mask")
        out = (mask == cluster).astype(np.uint8)
        out[mask == IGNORE_INDEX] = IGNORE_INDEX
        return out

    def episode(self, index: int) -> Episode:
        cluster, support_ids, query_id = self.draw(index)
        query_mask = self._binary(query_id, cluster)
        return Episode(
            classes=[cluster],
            support_ids=support_ids,
            query_id=query_id,
            support_images=np.stack([self.dataset.image(i) for i in support_ids]),
            support_masks=np.stack([self._binary(i, cluster) for i in support_ids]),
            query_image=self.dataset.image(query_id),
            query_mask=query_mask,
            query_original_mask=query_mask,  # pseudo tasks exist at the canonical size only
        )
