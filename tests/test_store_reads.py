"""The store's row reader: a row is one ranged read of its own bytes, on every kind of store,
and gives exactly what zarr-python reads."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
import zarr

from models.conventions import IGNORE_INDEX
from tasks.data import store


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int | None, int | None]]:
    """Every (key, start, stop) the row readers ask of a store."""
    calls: list[tuple[str, int | None, int | None]] = []
    read = store._ByteRanges.read

    def spy(self, key, start=None, stop=None):
        calls.append((key, start, stop))
        return read(self, key, start, stop)

    monkeypatch.setattr(store._ByteRanges, "read", spy)
    return calls


def test_one_image_read_fetches_only_that_images_bytes(tiny_store: str, reads) -> None:
    ds = store.open_dataset(tiny_store, "synth", cache_bytes=0)
    image_bytes, rows = 64 * 64 * 3, ds.shard_size
    first, second = ds.ids[rows + 3], ds.ids[rows + 5]  # two images of shard 1
    image = ds.image(first)
    index_bytes = 16 * rows + 4  # (offset, length) per row + crc32c
    shard_key = f"{ds.group.path}/images/c/1/0/0/0"
    assert len(reads) == 2 and reads[0] == (shard_key, -index_bytes, None)
    assert reads[1][0] == shard_key and reads[1][2] - reads[1][1] == image_bytes
    reads.clear()
    ds.image(second)  # the shard's index is kept: one read, of this image's bytes only
    (key, start, stop), = reads
    assert key.endswith("/images/c/1/0/0/0") and stop - start == image_bytes
    np.testing.assert_array_equal(image, zarr.open_group(tiny_store, mode="r")[
        ds.group.path]["images"][rows + 3])


def test_one_mask_read_fetches_only_that_masks_bytes(tiny_store: str, reads) -> None:
    ds = store.open_dataset(tiny_store, "synth", cache_bytes=0)
    ds.mask(ds.ids[2])
    (index_key, start, stop), (row_key, row_start, row_stop) = reads
    assert index_key == row_key == f"{ds.group.path}/masks/c/0/0/0"
    assert (start, stop) == (-(16 * ds.shard_size + 4), None)
    assert 0 < row_stop - row_start < 64 * 64  # one zstd-compressed mask, no more


def _memory_copy(local: str) -> str:
    """The same store on fsspec's in-memory filesystem (a generic fsspec store)."""
    path = f"/reads-{uuid.uuid4().hex}/s.zarr"
    fsspec.filesystem("memory").put(local, path, recursive=True)
    return f"memory://{path}"


@pytest.mark.parametrize("kind", ["local", "file_url", "memory", "zarr_store_api"])
def test_rows_and_shards_equal_zarr_python_on_every_kind_of_store(
        tiny_store: str, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    url = {"local": tiny_store, "file_url": f"file://{Path(tiny_store).resolve()}",
           "memory": _memory_copy(tiny_store), "zarr_store_api": tiny_store}[kind]
    if kind == "zarr_store_api":  # what s3://, gs://, ... go through
        init = store._ByteRanges.__init__

        def generic(self, zstore):
            init(self, zstore)
            self._local = self._fs = None

        monkeypatch.setattr(store._ByteRanges, "__init__", generic)
    ds = store.open_dataset(url, "synth", cache_bytes=0)
    group = zarr.open_group(tiny_store, mode="r")[ds.group.path]
    images, masks = group["images"][:], group["masks"][:]
    for image_id in ds.ids:
        row = ds.row(image_id)
        np.testing.assert_array_equal(ds.image(image_id), images[row])
        np.testing.assert_array_equal(ds.mask(image_id), masks[row])
    for shard in range(-(-len(images) // ds.shard_size)):
        rows = slice(shard * ds.shard_size, (shard + 1) * ds.shard_size)
        np.testing.assert_array_equal(
            store.read_dataset_shard(url, "synth", ds.version, "images", shard), images[rows])
    unlabelled = store.UnlabelledImages(url, "synth")
    np.testing.assert_array_equal(unlabelled.image(ds.ids[-1]), images[ds.row(ds.ids[-1])])


def test_derived_rows_fill_missing_chunks_and_unwritten_shards(tiny_store: str,
                                                               tmp_path: Path) -> None:
    url = str(tmp_path / "s.zarr")
    shutil.copytree(tiny_store, url)
    ds = store.open_dataset(url, "synth")
    n = len(ds.index)
    fields = [store.DerivedField("feat", (3, 4, 4), "float16", fill=0.0),
              store.DerivedField("label", (8, 8), "uint8", fill=255, compress=True)]
    key, _ = store.create_derived(url, "synth", ds.version, "reads_test", {"n": 1}, fields)
    rng = np.random.default_rng(0)
    feat = rng.normal(size=(ds.shard_size, 3, 4, 4)).astype(np.float16)
    label = rng.integers(0, 5, (ds.shard_size, 8, 8)).astype(np.uint8)
    feat[1], label[2] = 0.0, 255  # rows equal to the fill value: zarr writes no chunk
    store.write_derived_shard(url, "synth", ds.version, key, 0, {"feat": feat, "label": label})
    derived = store.open_derived(url, "synth", key, cache_bytes=0)
    stored = zarr.open_group(url, mode="r")[derived.group.path]
    for image_id in derived.ids:
        row = derived.row(image_id)
        np.testing.assert_array_equal(derived.get(image_id), stored["feat"][row])
        np.testing.assert_array_equal(derived.get(image_id, "label"), stored["label"][row])
    assert derived.get(derived.ids[1]).dtype == np.float16
    np.testing.assert_array_equal(derived.shard(0, "label"), label)
    last = derived.ids[-1]
    assert derived.row(last) >= ds.shard_size  # shard 1 was never written: all fill
    assert (derived.get(last, "label") == 255).all() and n > ds.shard_size


def test_a_damaged_shard_index_is_a_clear_error(tiny_store: str, tmp_path: Path) -> None:
    url = str(tmp_path / "s.zarr")
    shutil.copytree(tiny_store, url)
    ds = store.open_dataset(url, "synth", cache_bytes=0)
    shard_file = Path(url) / ds.group.path / "images" / "c" / "0" / "0" / "0" / "0"
    raw = bytearray(shard_file.read_bytes())
    raw[-10] ^= 0xFF  # inside the index
    shard_file.write_bytes(bytes(raw))
    with pytest.raises(store.StoreError, match=r"shard 0's index fails its checksum: rerun"):
        ds.image(ds.ids[0])


def test_unlabelled_images_cannot_read_a_label_array_even_internally(tiny_store: str) -> None:
    view = store.UnlabelledImages(tiny_store, "synth")
    with pytest.raises(store.StoreError, match="'masks' is not readable here"):
        view._reader.row("masks", 0)
    with pytest.raises(store.StoreError, match="not readable here"):
        view._reader.shard("original_masks", 0)


def test_open_dataset_resolves_versions_like_resolve_version(tiny_store: str) -> None:
    latest = store.resolve_version(tiny_store, "synth")
    assert store.open_dataset(tiny_store, "synth").version == latest
    with pytest.raises(store.StoreError, match=r"no dataset 'nope' in .* \(datasets: synth\)"):
        store.open_dataset(tiny_store, "nope")
    with pytest.raises(store.StoreError, match="has no version 'v-000000000000'"):
        store.open_dataset(tiny_store, "synth", "v-000000000000")


def test_arrays_in_another_layout_are_read_through_zarr_python(tiny_store: str,
                                                               tmp_path: Path) -> None:
    """Masks rewritten unsharded, with another codec (what an older or foreign writer may
    leave): the reader falls back to zarr-python and reads the same values."""
    url = str(tmp_path / "s.zarr")
    shutil.copytree(tiny_store, url)
    ds = store.open_dataset(url, "synth")
    group = zarr.open_group(url, mode="a")[ds.group.path]
    masks = group["masks"][:]
    del group["masks"]
    group.create_array("masks", shape=masks.shape, dtype="uint8", chunks=(4, 64, 64),
                       compressors=zarr.codecs.BloscCodec(), fill_value=IGNORE_INDEX)[:] = masks
    ds = store.open_dataset(url, "synth", cache_bytes=0)
    assert ds._reader.array("masks")._plan is None  # not decodable by the fast path
    for image_id in ds.ids[::5]:
        np.testing.assert_array_equal(ds.mask(image_id), masks[ds.row(image_id)])
    np.testing.assert_array_equal(ds._reader.shard("masks", 1), masks[32:64])
