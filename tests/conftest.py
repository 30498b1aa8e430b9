"""Shared fixtures: a small synthetic benchmark and one real Prefect server per test session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

COCO_TINY = Path(os.environ.get(
    "FSS_COCO_TINY", Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-tiny"))


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 train + 16 val synthetic images at 96 px, in VOC and COCO layouts."""
    from tasks.data.synth import synthesize

    root = tmp_path_factory.mktemp("synth")
    synthesize(root, n_train=40, n_val=16, size=96, seed=3)
    return root


@pytest.fixture(scope="session")
def tiny_store(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """`synth_root` ingested at 64 px as dataset "synth" (plain functions, no Prefect)."""
    from tasks.data import ingest

    url = str(tmp_path_factory.mktemp("tiny-store") / "s.zarr")
    ingest.ingest_dataset("voc", str(synth_root / "voc"), url, "synth", splits=["train", "val"],
                          size=64, shard_size=32)
    return url


@pytest.fixture(scope="session")
def pseudo_key(tiny_store: str) -> str:
    """A pseudo-mask group of `tiny_store` (4 clusters, 8-d prototypes), the one that
    `pseudo: latest` finds: cluster c holds image quadrant c, except where noted."""
    import numpy as np

    from tasks.data import store

    clusters, dim = 4, 8
    ds = store.open_dataset(tiny_store, "synth")
    n, size = len(ds.index), ds.size
    half = size // 2
    masks = np.zeros((n, size, size), np.uint8)
    masks[:, :half, half:], masks[:, half:, :half], masks[:, half:, half:] = 1, 2, 3
    masks[1::2, :half, :half] = 3  # odd rows: no cluster 0 at all
    masks[:, :3, :3] = 255
    counts = np.stack([np.bincount(m.ravel(), minlength=256)[:clusters] for m in masks])
    rng = np.random.default_rng(0)
    protos = rng.normal(size=(n, clusters, dim)).astype(np.float16)
    fields = [store.DerivedField("mask", (size, size), "uint8", fill=255),
              store.DerivedField("counts", (clusters,), "int64"),
              store.DerivedField("spans", (clusters, 2), "int32"),
              store.DerivedField("prototypes", (clusters, dim), "float16")]
    key, _ = store.create_derived(tiny_store, "synth", ds.version, "pseudo", {"test": 1}, fields)
    for shard, (a, b) in enumerate(store.shard_bounds(n, ds.shard_size)):
        store.write_derived_shard(tiny_store, "synth", ds.version, key, shard, {
            "mask": masks[a:b], "counts": counts[a:b],
            "spans": np.zeros((b - a, clusters, 2), np.int32), "prototypes": protos[a:b]})
    # Cluster 3 covers half of every image: call it background-like.
    store.finalize_derived(tiny_store, "synth", ds.version, key,
                           attrs={"background": {"clusters": [3]}})
    return key


@pytest.fixture(scope="session")
def fss_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's FSS_HOME: the test Prefect server's DB and log live here."""
    home = tmp_path_factory.mktemp("fss-home")
    os.environ["FSS_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def prefect_server(fss_home: Path):
    """`prefect server start` on 127.0.0.1 with its own SQLite DB; stopped after the session."""
    from flows.runtime import _drain_prefect_workers, start_server, stop_process

    proc, url = start_server(ui=False, log=fss_home / "prefect-server.log")
    yield url
    _drain_prefect_workers()
    stop_process(proc)


@pytest.fixture(scope="session")
def prefect_server_log(prefect_server: str, fss_home: Path) -> Path:
    """The test server's stdout and stderr (its services log their errors there)."""
    return fss_home / "prefect-server.log"


@pytest.fixture
def prefect_api_url(prefect_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("PREFECT_API_URL", prefect_server)
    monkeypatch.setenv("PREFECT_LOGGING_LEVEL", "WARNING")
    return prefect_server


@pytest.fixture(autouse=True)
def _cli_environment_stays_in_its_test() -> Iterator[None]:
    """`fss` sets its logging variables in its own os.environ (for the servers and workers it
    starts); a test that calls `main` in-process must not hand them to later tests (a Dask
    worker of infra/dask's scripts then logs at WARNING, and its registration line never
    comes)."""
    from flows.cli import CLI_ENVIRONMENT

    saved = {name: os.environ.get(name) for name in CLI_ENVIRONMENT}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """The test tensors are tiny: one thread is faster, and far faster on a shared 2-core box,
    where OpenMP threads spin-wait for busy cores (an overfit test went from ~2 s to ~45 s)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
