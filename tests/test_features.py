"""Derived arrays in the store, feature extraction (images only), and the features flow."""

from __future__ import annotations

import hashlib
import json
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from tasks.data import ingest, store
from tasks.data.readers import make_reader
from tasks.labelfree import features

SPEC = {"kind": "backbone", "backbone": "small_resnet", "layer": "layer4", "checkpoint": None}
LABEL_ARRAYS = ("masks", "original_masks", "class_pixels")


def ingest_store(synth_root: Path, url: str, size: int = 64, shard_size: int = 16) -> str:
    """Ingest the synthetic VOC layout without Prefect; returns the version."""
    readers = [make_reader("voc", synth_root / "voc", s) for s in ("train", "val")]
    plan = ingest.plan_ingest(readers, "synth", size=size, shard_size=shard_size)
    ingest.ingest_plan(plan, url)
    return plan.spec.version


def forbid_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every read of a label array fail, at the store API and at the Zarr level."""
    def boom(*_a, **_k):
        raise AssertionError("a label was read")

    for method in ("mask", "original_mask", "pixels"):
        monkeypatch.setattr(store.Dataset, method, boom)
    original = zarr.Group.__getitem__

    def guarded(self, key: str):
        if str(key).rstrip("/").rsplit("/", 1)[-1] in LABEL_ARRAYS:
            raise AssertionError(f"label array {key!r} was read")
        return original(self, key)

    monkeypatch.setattr(zarr.Group, "__getitem__", guarded)


def checksums(folder: Path) -> dict[str, str]:
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file() and f.name != "zarr.json"}


@pytest.fixture(scope="module")
def base_store(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    url = str(tmp_path_factory.mktemp("features") / "s.zarr")
    return url, ingest_store(synth_root, url)


@pytest.fixture
def fresh_store(base_store: tuple[str, str], tmp_path: Path) -> tuple[str, str]:
    url = str(tmp_path / "s.zarr")
    shutil.copytree(base_store[0], url)
    return url, base_store[1]


def test_derived_arrays_round_trip_and_validation(fresh_store: tuple[str, str]) -> None:
    url, version = fresh_store
    fields = [store.DerivedField("mask", (4, 6), "uint8", fill=255, compress=True),
              store.DerivedField("count", (3,), "int64")]
    params = {"k": 3, "source": "x"}
    key, created = store.create_derived(url, "synth", version, "demo", params, fields,
                                        extra={"centers": np.eye(3, dtype=np.float32)},
                                        attrs={"note": "hi"})
    assert created and key == store.derived_key("demo", {"source": "x", "k": 3})
    assert store.create_derived(url, "synth", version, "demo", params, fields) == (key, False)
    assert store.derived_key("demo", {"k": 4, "source": "x"}) != key
    assert store.done_shards(url, "synth", version, derived=key) == set()

    rows = [16, 16, 16, 8]  # 56 rows in shards of 16
    for shard in (0, 2):
        store.write_derived_shard(url, "synth", version, key, shard, {
            "mask": np.full((rows[shard], 4, 6), shard, np.uint8),
            "count": np.arange(rows[shard] * 3).reshape(-1, 3)})
    assert store.done_shards(url, "synth", version, derived=key) == {0, 2}
    assert store.finalize_derived(url, "synth", version, key)["complete"] is False

    d = store.open_derived(url, "synth", key)
    ids = store.open_dataset(url, "synth").ids
    assert d.ids == ids and d.n_shards == 4 and d.primary == "mask" and d.attrs["note"] == "hi"
    assert (d.get(ids[33]) == 2).all() and d.get(ids[33]).shape == (4, 6)
    assert (d.get(ids[20]) == 255).all()  # an unwritten shard reads as the fill value
    np.testing.assert_array_equal(d.get(ids[1], "count"), [3, 4, 5])
    np.testing.assert_array_equal(d.extra("centers"), np.eye(3))
    assert d.read("count").shape == (56, 3)
    assert list(store.list_derived(url, "synth", kind="demo")) == [key]
    assert store.list_derived(url, "synth", kind="features") == {}

    with pytest.raises(store.StoreError, match="shape"):
        store.write_derived_shard(url, "synth", version, key, 3, {
            "mask": np.zeros((16, 4, 6), np.uint8), "count": np.zeros((16, 3))})
    with pytest.raises(store.StoreError, match="needs fields"):
        store.write_derived_shard(url, "synth", version, key, 3, {"mask": np.zeros((8, 4, 6))})
    with pytest.raises(ValueError, match="invalid derived kind"):
        store.derived_key("../up", {})
    with pytest.raises(ValueError, match="invalid derived key"):
        store.open_derived(url, "synth", "demo-../../x")
    with pytest.raises(store.StoreError, match="no derived group"):
        store.open_derived(url, "synth", store.derived_key("demo", {"other": 1}))
    with pytest.raises(KeyError):
        d.get("not-an-id")


def test_extract_reads_images_only_and_writes_unit_features(
        fresh_store: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    url, version = fresh_store
    forbid_labels(monkeypatch)
    plan = features.plan_features(url, "synth", SPEC)
    assert (plan.dim, plan.height, plan.width, plan.stride, plan.n_shards) == (256, 8, 8, 8, 4)
    assert features.create_features(plan) and not features.create_features(plan)
    reports = [features.extract_shard(url, "synth", version, plan.key, k, SPEC, batch_size=7)
               for k in range(plan.n_shards)]
    assert sum(r.images for r in reports) == 56
    assert store.finalize_derived(url, "synth", version, plan.key)["complete"]
    monkeypatch.undo()

    d = store.open_derived(url, "synth", plan.key)
    ds = store.open_dataset(url, "synth")
    f = d.get(ds.ids[5])
    assert f.dtype == np.float16 and f.shape == (256, 8, 8)
    np.testing.assert_allclose(np.linalg.norm(f.astype(np.float32), axis=0), 1.0, atol=2e-3)
    direct = features.get_embedder(SPEC).embed(ds.image(ds.ids[5])[None])[0]
    np.testing.assert_allclose(f.astype(np.float32), direct.numpy(), atol=2e-3)
    assert d.attrs["embedder"] == SPEC and d.attrs["stride"] == 8


def test_rerun_is_noop_and_resume_is_identical(fresh_store: tuple[str, str],
                                               tmp_path: Path) -> None:
    url, version = fresh_store
    crashed = str(tmp_path / "crashed.zarr")
    shutil.copytree(url, crashed)
    plan = features.plan_features(url, "synth", SPEC)
    for target, shards in ((url, range(4)), (crashed, (0, 2))):
        features.create_features(features.FeaturesPlan(**{**plan.__dict__,
                                                          "store_url": target}))
        for k in shards:
            features.extract_shard(target, "synth", version, plan.key, k, SPEC)
    folder = Path("datasets") / "synth" / version / "derived" / plan.key
    before = {f: f.stat().st_mtime_ns for f in (Path(url) / folder).rglob("*") if f.is_file()}
    again = [features.extract_shard(url, "synth", version, plan.key, k, SPEC) for k in range(4)]
    assert all(r.skipped for r in again)
    assert {f: f.stat().st_mtime_ns for f in before} == before

    resumed = [features.extract_shard(crashed, "synth", version, plan.key, k, SPEC)
               for k in range(4)]
    assert [r.skipped for r in resumed] == [True, False, True, False]
    assert checksums(Path(crashed) / folder) == checksums(Path(url) / folder)


def test_key_follows_checkpoint_content_not_path(tmp_path: Path) -> None:
    from models.backbones import build_backbone

    net = build_backbone("small_resnet")
    ckpt = tmp_path / "w.pth"
    torch.save(net.state_dict(), ckpt)
    spec = {**SPEC, "checkpoint": str(ckpt)}
    first = features.features_key(spec)
    shutil.copy(ckpt, tmp_path / "moved.pth")
    assert features.features_key({**SPEC, "checkpoint": str(tmp_path / "moved.pth")}) == first
    with torch.no_grad():
        net.conv1.weight.add_(1.0)
    torch.save(net.state_dict(), ckpt)
    assert features.features_key(spec) != first != features.features_key(SPEC)


def test_parse_embedder(tmp_path: Path) -> None:
    from flows.cli.labelfree import parse_embedder

    assert parse_embedder(json.dumps(SPEC)) == SPEC
    (tmp_path / "e.json").write_text(json.dumps(SPEC))
    assert parse_embedder(str(tmp_path / "e.json")) == SPEC
    (tmp_path / "w.pth").write_bytes(b"")
    spec = parse_embedder(str(tmp_path / "w.pth"), backbone="resnet50", layer="layer3")
    assert spec == {"kind": "backbone", "backbone": "resnet50", "layer": "layer3",
                    "checkpoint": str((tmp_path / "w.pth").resolve())}
    with pytest.raises(FileNotFoundError):
        parse_embedder(str(tmp_path / "missing.pth"))


class FakeDask:
    """Stands in for `distributed`'s LocalCluster and Client: records what a flow asks of them
    and runs each submitted call at once, in this process."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, threads: int = 1) -> None:
        import distributed

        self.clusters: list[dict] = []
        self.clients: list[str] = []
        self.calls: list[tuple] = []  # (function, shards, resources)
        fake = self

        class LocalCluster:
            def __init__(self, **kwargs) -> None:
                fake.clusters.append(kwargs)
                self.scheduler_address = "tcp://127.0.0.1:1"

            def __enter__(self):
                return self

            def __exit__(self, *exc) -> None:
                pass

        class Client(LocalCluster):
            def __init__(self, address: str, **kwargs) -> None:
                fake.clients.append(address)

            def nthreads(self) -> dict[str, int]:
                return {"tcp://127.0.0.1:2": threads}

            def submit(self, fn, *args, resources=None, pure=True):
                fake.calls.append((fn, list(args[4]), resources))
                value = fn(*args)
                return types.SimpleNamespace(result=lambda: value)

        monkeypatch.setattr(distributed, "LocalCluster", LocalCluster)
        monkeypatch.setattr(distributed, "Client", Client)


def test_a_local_cluster_for_gpu_work_declares_one_gpu_per_worker(monkeypatch) -> None:
    from flows.runtime import dask_client

    fake = FakeDask(monkeypatch)
    with dask_client(2, resources={"GPU": 1}):
        pass
    with dask_client(2):
        pass
    with dask_client(2, "tcp://10.0.0.1:8786", resources={"GPU": 1}):
        pass  # an external cluster's workers declare their own resources
    assert [c.get("resources") for c in fake.clusters] == [{"GPU": 1}, None]
    assert fake.clusters[0]["n_workers"] == 2
    assert fake.clients == ["tcp://127.0.0.1:1"] * 2 + ["tcp://10.0.0.1:8786"]


@pytest.mark.slow
def test_features_flow_hands_runs_of_shards_to_dask_and_a_rerun_starts_no_cluster(
        fresh_store: tuple[str, str], prefect_api_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``gpu``: a LocalCluster whose workers hold a GPU each, every call asking for one."""
    from flows.features import run_features
    from flows.runtime import DASK_ADDRESS_ENV, prefect_api

    url, _ = fresh_store
    monkeypatch.delenv(DASK_ADDRESS_ENV, raising=False)
    fake = FakeDask(monkeypatch, threads=1)  # 1 thread: TASKS_PER_SLOT = 2 runs of 2 shards
    params = dict(workers=1, gpu=True, store_url=url, name="synth", embedder=SPEC,
                  progress=False)
    with prefect_api():
        first = run_features(**params)
        calls = sorted((fn.__name__, shards, r) for fn, shards, r in fake.calls)
        again = run_features(**params)
    assert [c["resources"] for c in fake.clusters] == [{"GPU": 1}]
    assert calls == [("extract_shards", [0, 1], {"GPU": 1}),
                     ("extract_shards", [2, 3], {"GPU": 1})]
    assert first["complete"] and first["shards_written"] == 4 and first["images"] == 56
    assert len(fake.clusters) == 1 and len(fake.clients) == 1  # nothing left: no cluster
    assert again["shards_written"] == 0 and again["shards_skipped"] == 4 and again["complete"]
