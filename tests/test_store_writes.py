"""The store's own shard writer (`store._ArrayWriter`) writes the bytes zarr-python writes.

Each case writes the same shards twice, once with the writer and once through zarr-python
(``store.ENCODE_SHARDS_HERE = False``), into two stores created alike, and compares every
file byte for byte; zarr-python then reads the writer's output back unchanged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from models.conventions import IGNORE_INDEX
from tasks.data import store

SIZE, ROWS = 16, 4


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _assert_same_files(fast: Path, reference: Path) -> None:
    fast_files, reference_files = _files(fast), _files(reference)
    assert sorted(fast_files) == sorted(reference_files)
    different = [k for k in fast_files if fast_files[k] != reference_files[k]]
    assert different == []


def _spec(n: int) -> store.DatasetSpec:
    ids = [f"img{i}" for i in range(n)]
    return store.DatasetSpec(
        name="d", version="v-000000000001", size=SIZE, shard_size=ROWS,
        classes=["background", "a", "b"], source_ids=[0, 1, 2], ids=ids,
        splits=["train"] * n, source_paths=[f"/src/{i}.jpg" for i in ids],
        params={"max_pixels": 10_000}, labelled=[i % 5 != 3 for i in range(n)])


def _results(n: int, seed: int = 0) -> list[store.ItemResult]:
    """Ingested rows of random pixels; also a quarantined row, an unlabelled one (mask all
    255), an all-black image (the fill value, which zarr-python leaves out of the shard) and a
    label over max_pixels (quarantined by the writer)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = int(rng.integers(5, 40)), int(rng.integers(5, 40))
        label = rng.integers(0, 3, (h, w), dtype=np.uint8)
        mask = rng.integers(0, 3, (SIZE, SIZE), dtype=np.uint8)
        image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        if i % 5 == 1:
            out.append(store.ItemResult(reason=f"broken file {i}"))
            continue
        if i % 5 == 3:
            mask = np.full((SIZE, SIZE), IGNORE_INDEX, np.uint8)
        if i == 2:
            image = np.zeros_like(image)
        if i == 4:
            label = np.ones((101, 100), np.uint8)
        out.append(store.ItemResult(image=image, mask=mask, original_mask=label,
                                    box=(0, 0, SIZE, SIZE - i % 3)))
    return out


def _write_both(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                write: callable) -> tuple[Path, Path]:
    fast, reference = tmp_path / "fast.zarr", tmp_path / "reference.zarr"
    write(str(fast))
    monkeypatch.setattr(store, "ENCODE_SHARDS_HERE", False)
    write(str(reference))
    monkeypatch.setattr(store, "ENCODE_SHARDS_HERE", True)
    return fast, reference


def test_dataset_shards_are_byte_identical_to_zarr_python(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Full shards, the array's shorter last shard, quarantined rows left at the fill value,
    and a shard whose every row is quarantined (zarr-python stores no file for it)."""
    n = 3 * ROWS + 2
    spec, results = _spec(n), _results(n)
    results[ROWS:2 * ROWS] = [store.ItemResult(reason="gone")] * ROWS  # shard 1: nothing

    def write(url: str) -> None:
        store.create_dataset(url, spec)
        for shard, (a, b) in enumerate(store.shard_bounds(n, ROWS)):
            store.write_shard(url, "d", spec.version, shard, results[a:b])

    fast, reference = _write_both(tmp_path, monkeypatch, write)
    version = fast / "datasets" / "d" / spec.version
    assert (version / "images" / "c" / "0" / "0" / "0" / "0").is_file()
    assert not (version / "images" / "c" / "1" / "0" / "0" / "0").exists()
    assert not (version / "index" / "reason" / "c" / "3").exists()  # all "": the fill
    _assert_same_files(fast, reference)

    # zarr-python reads the writer's output as what was written.
    g = zarr.open_group(str(version), mode="r")
    written = ["images", "masks", "original_masks", "shard_done"] + [
        f"index/{k}" for k in ("status", "reason", "height", "width", "class_pixels", "box")]
    assert [k for k in written if store._ArrayWriter.of(g[k]) is None] == []
    for row, r in enumerate(results):
        kept = r.ok
        np.testing.assert_array_equal(g["images"][row], r.image if kept else 0)
        np.testing.assert_array_equal(g["masks"][row], r.mask if kept else IGNORE_INDEX)
        assert g["index/status"][row] == (store.INGESTED if kept else store.QUARANTINED)
        if kept:
            np.testing.assert_array_equal(store.decode_original_mask(
                g["original_masks"][row:row + 1][0], *r.original_mask.shape), r.original_mask)
    assert list(g["shard_done"][:]) == [1, 1, 1, 1]
    assert g["index/reason"][ROWS] == "gone" and g["index/reason"][1] == "broken file 1"


def test_derived_shards_are_byte_identical_to_zarr_python(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Float features (fill 0: a row of -0.0 is not the fill, a row of 0.0 is), zstd label
    maps (fill 255) and int64 counts, with rows left at the fill value."""
    n = 2 * ROWS + 1
    spec = _spec(n)
    rng = np.random.default_rng(1)
    feat = rng.normal(size=(n, 3, 5, 5)).astype(np.float32)
    feat[1], feat[2] = 0.0, -0.0
    label = rng.integers(0, 4, (n, SIZE, SIZE), dtype=np.uint8)
    label[3] = 255
    counts = rng.integers(0, 100, (n, 4)).astype(np.int64)
    fields = [store.DerivedField("feat", (3, 5, 5), "float32"),
              store.DerivedField("label", (SIZE, SIZE), "uint8", fill=255, compress=True),
              store.DerivedField("counts", (4,), "int64")]

    def write(url: str) -> None:
        store.create_dataset(url, spec)
        key, _ = store.create_derived(url, "d", spec.version, "feats", {"x": 1}, fields)
        for shard, (a, b) in enumerate(store.shard_bounds(n, ROWS)):
            store.write_derived_shard(url, "d", spec.version, key, shard, {
                "feat": feat[a:b], "label": label[a:b], "counts": counts[a:b]})

    fast, reference = _write_both(tmp_path, monkeypatch, write)
    _assert_same_files(fast, reference)
    key = store.derived_key("feats", {"x": 1})
    g = zarr.open_group(str(fast / "datasets" / "d" / spec.version / "derived" / key), mode="r")
    np.testing.assert_array_equal(g["feat"][:], feat)
    assert np.signbit(g["feat"][2]).all()
    np.testing.assert_array_equal(g["label"][:], label)
    np.testing.assert_array_equal(g["counts"][:], counts)


@pytest.mark.parametrize("kind", ["index-at-start", "zstd-checksum", "big-endian",
                                  "write-empty-chunks", "strings", "nan-fill"])
def test_other_codec_chains_are_byte_identical_to_zarr_python(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """Chains the store does not use today but the writer takes: the same bytes too."""
    from zarr.codecs import BytesCodec, ShardingCodec, ZstdCodec

    n = 2 * ROWS - 1
    rng = np.random.default_rng(2)
    values = rng.normal(size=(n, 3, 2)).astype(">f8" if kind == "big-endian" else "<f4")
    values[1] = 0
    shape, dtype, fill = (n, 3, 2), values.dtype, 0.0
    kw: dict = {"chunks": (1, 3, 2), "shards": (ROWS, 3, 2)}
    config = None
    if kind == "index-at-start":
        kw = {"chunks": (ROWS, 3, 2), "serializer": ShardingCodec(
            chunk_shape=(1, 3, 2), codecs=[BytesCodec(), ZstdCodec(level=1)],
            index_location="start"), "compressors": None}
    elif kind == "zstd-checksum":
        kw["compressors"] = ZstdCodec(level=5, checksum=True)
    elif kind == "write-empty-chunks":
        config = {"write_empty_chunks": True}
    elif kind == "strings":
        values = np.asarray([f"r{i}" * i for i in range(n)], dtype=str)
        values[2] = ""
        shape, dtype, fill, kw = (n,), str, "", {"chunks": (ROWS,)}
    elif kind == "nan-fill":
        values[2] = np.nan
        fill = float("nan")

    def write(url: str) -> None:
        array = zarr.create_array(url, shape=shape, dtype=dtype, fill_value=fill,
                                  config=config, **kw)
        assert store._ArrayWriter.of(array) is not None
        for a, b in store.shard_bounds(n, ROWS):
            store._write_rows(array, a, values[a:b])

    fast, reference = _write_both(tmp_path, monkeypatch, write)
    _assert_same_files(fast, reference)
    np.testing.assert_array_equal(zarr.open_array(str(fast), mode="r")[:], values)


def test_arrays_the_writer_does_not_encode_go_through_zarr_python(tmp_path: Path) -> None:
    """A codec it does not know (gzip), or chunks across rows: zarr-python writes them."""
    from zarr.codecs import GzipCodec

    gzip = zarr.create_array(str(tmp_path / "g.zarr"), shape=(4, 3), dtype="uint8",
                             chunks=(1, 3), shards=(4, 3), compressors=GzipCodec())
    split_rows = zarr.create_array(str(tmp_path / "s.zarr"), shape=(4, 4), dtype="uint8",
                                   chunks=(4, 2))
    assert store._ArrayWriter.of(gzip) is None and store._ArrayWriter.of(split_rows) is None
    values = np.arange(12, dtype=np.uint8).reshape(4, 3)
    store._write_rows(gzip, 0, values)
    np.testing.assert_array_equal(gzip[:], values)


def test_a_write_that_is_not_one_whole_shard_is_refused(tmp_path: Path) -> None:
    array = zarr.create_array(str(tmp_path / "a.zarr"), shape=(10, 2), dtype="uint8",
                              chunks=(1, 2), shards=(4, 2))
    with pytest.raises(ValueError, match="rows 2..6 .* not one whole shard of 4"):
        store._write_rows(array, 2, np.ones((4, 2), np.uint8))
    with pytest.raises(ValueError, match="rows 8..9 .* not one whole shard"):
        store._write_rows(array, 8, np.ones((1, 2), np.uint8))  # the last shard holds 2


def test_stores_other_than_a_folder_get_the_same_bytes_through_their_own_api(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Object storage and the like: the writer puts each shard whole through zarr's store
    API (a `MemoryStore` here) and deletes what zarr-python would delete."""
    n = 2 * ROWS + 1
    rng = np.random.default_rng(3)
    values = rng.integers(0, 9, (n, 5, 5), dtype=np.uint8)
    values[ROWS:2 * ROWS] = 255  # one shard of nothing but the fill value

    def write(contents: dict) -> None:
        array = zarr.create_array(zarr.storage.MemoryStore(contents), shape=values.shape,
                                  dtype="uint8", chunks=(1, 5, 5), shards=(ROWS, 5, 5),
                                  fill_value=255, compressors=store._MASK_CODEC)
        for a, b in store.shard_bounds(n, ROWS):
            store._write_rows(array, a, values[a:b])

    fast: dict = {}
    write(fast)
    monkeypatch.setattr(store, "ENCODE_SHARDS_HERE", False)
    reference: dict = {}
    write(reference)
    assert sorted(fast) == sorted(reference) and "c/1/0/0" not in fast
    assert {k: v.to_bytes() for k, v in fast.items()} == {
        k: v.to_bytes() for k, v in reference.items()}


def test_shard_is_done_reads_one_flag(tmp_path: Path) -> None:
    n = 3 * ROWS
    spec, url = _spec(n), str(tmp_path / "s.zarr")
    store.create_dataset(url, spec)
    store.write_shard(url, "d", spec.version, 1, _results(ROWS))
    assert [store.shard_is_done(url, "d", spec.version, k) for k in range(3)] == [
        False, True, False]
    assert store.done_shards(url, "d", spec.version) == {1}


def test_a_shard_writer_reads_done_flags_from_their_files_as_zarr_reads_them(
        tmp_path: Path) -> None:
    """`ShardWriter.is_done` (the flag's file, on a local folder) agrees with zarr-python's
    read; a flag file it does not recognise is left to zarr-python."""
    n = 3 * ROWS
    spec, url = _spec(n), str(tmp_path / "s.zarr")
    store.create_dataset(url, spec)
    writer = store.ShardWriter(url, "d", spec.version)
    writer.write(2, _results(n - 2 * ROWS))
    flags = writer.arrays["shard_done"]
    assert isinstance(flags, store._ArrayWriter)  # the fast path is the one under test
    assert [flags.holds(k, store._DONE) for k in range(3)] == [False, False, True]
    zarr_says = [store.shard_is_done(url, "d", spec.version, k) for k in range(3)]
    assert [writer.is_done(k) for k in range(3)] == zarr_says == [False, False, True]
    # The same flag, written by zarr-python with other codec settings: not this writer's
    # bytes, so it asks zarr-python, which decodes it.
    flag_file = tmp_path / "s.zarr" / flags._key(0)
    flag_file.parent.mkdir(parents=True, exist_ok=True)
    flag_file.write_bytes(b"\x01")
    assert flags.holds(0, store._DONE) is None
