"""Features: a frozen embedder applied to every image of a dataset version, one shard at a time.

Plain functions; `flows/features.py` hands contiguous runs of shards to Dask workers, one
`extract_shards` call each (the embedder is built once per worker process, `get_embedder`). The
output is a derived array ``features-<hash>`` of shape (N, D, h, w) float16 (unit norm per pixel
before rounding), row-aligned with the dataset. Its key hashes the embedder spec with the
checkpoint's *content* digest instead of its path, so new weights under an old path make a new
key. Only images and the index are read here, never a label array.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tasks import defaults
from tasks.data import store
from tasks.labelfree.embeddings import Embedder, load_embedder
from tasks.malloc import large_buffers_on_heap

KIND = "features"
FIELD = "features"
DEFAULT_BATCH = defaults.FEATURES_BATCH


@dataclass(frozen=True)
class FeaturesPlan:
    """What one features run writes: where, with which embedder, in how many shards."""

    store_url: str
    name: str
    version: str
    key: str
    spec: dict[str, Any]
    n_shards: int
    dim: int
    height: int
    width: int
    stride: int


@dataclass
class ShardReport:
    shard: int
    images: int = 0
    skipped: bool = False  # already complete before this run
    seconds: float = 0.0


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def features_params(spec: dict[str, Any]) -> dict[str, Any]:
    """The parameters that name a features array: the spec, with the checkpoint by content."""
    params = dict(spec)
    if params.get("checkpoint"):
        params["checkpoint"] = "sha256:" + file_digest(params["checkpoint"])
    return {"embedder": params, "dtype": "float16"}


def features_key(spec: dict[str, Any]) -> str:
    return store.derived_key(KIND, features_params(spec))


@functools.lru_cache(maxsize=2)
def _cached_embedder(spec_json: str) -> Embedder:
    # A worker process runs many shards with the same embedder: build (and load) it once.
    return load_embedder(json.loads(spec_json))


def get_embedder(spec: dict[str, Any]) -> Embedder:
    return _cached_embedder(json.dumps(spec, sort_keys=True))


def plan_features(store_url: str, name: str, spec: dict[str, Any],
                  version: str | None = None) -> FeaturesPlan:
    """Resolve the dataset version and the output geometry (one dummy forward pass)."""
    version = store.resolve_version(store_url, name, version)
    attrs = store.dataset_attrs(store_url, name, version)
    size, shard_size = int(attrs["size"]), int(attrs["shard_size"])
    embedder = get_embedder(spec)
    _, dim, h, w = embedder.embed(np.zeros((1, size, size, 3), np.uint8)).shape
    n_rows = len(store.read_index(store_url, name, version))
    return FeaturesPlan(store_url=store_url, name=name, version=version, key=features_key(spec),
                        spec=spec, n_shards=len(store.shard_bounds(n_rows, shard_size)),
                        dim=int(dim), height=int(h), width=int(w), stride=embedder.stride)


def create_features(plan: FeaturesPlan) -> bool:
    """Create the features array (orchestrator only); False when it already exists."""
    field = store.DerivedField(FIELD, (plan.dim, plan.height, plan.width), "float16")
    _, created = store.create_derived(
        plan.store_url, plan.name, plan.version, KIND, features_params(plan.spec), [field],
        attrs={"embedder": plan.spec, "stride": plan.stride, "dim": plan.dim})
    return created


def extract_shard(store_url: str, name: str, version: str, key: str, shard: int,
                  spec: dict[str, Any], batch_size: int = DEFAULT_BATCH) -> ShardReport:
    """Embed the images of one shard and write them; a no-op when the shard is complete."""
    if store.shard_is_done(store_url, name, version, shard, derived=key):
        return ShardReport(shard=shard, skipped=True)
    t0 = time.perf_counter()
    images = store.read_dataset_shard(store_url, name, version, "images", shard)
    ok = store.read_index(store_url, name, version, shard)["status"].to_numpy() == store.INGESTED
    shape = store.derived_attrs(store_url, name, version, key)["fields"][0]["shape"]
    out = np.zeros((len(images), *shape), np.float16)  # quarantined rows stay zero
    embedder = get_embedder(spec)
    rows = np.flatnonzero(ok)
    for i in range(0, len(rows), batch_size):
        batch = rows[i:i + batch_size]
        out[batch] = embedder.embed(images[batch]).to(torch.float16).numpy()
    store.write_derived_shard(store_url, name, version, key, shard, {FIELD: out})
    return ShardReport(shard=shard, images=len(rows), seconds=time.perf_counter() - t0)


def extract_shards(store_url: str, name: str, version: str, key: str, shards: Sequence[int],
                   spec: dict[str, Any], batch_size: int = DEFAULT_BATCH) -> list[ShardReport]:
    """`extract_shard` for several shards one after another: what one task of the features
    flow runs on a Dask worker."""
    with large_buffers_on_heap():  # a Dask worker's malloc settings fault in every buffer
        return [extract_shard(store_url, name, version, key, shard, spec, batch_size)
                for shard in shards]
