"""Data integrity (issue 12): unique ids, atomic versions, content fingerprints, lossless masks,
paths that stay inside the dataset, bounded memory, and no writes on a no-op rerun."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from models.conventions import IGNORE_INDEX
from tasks.data import ingest, store
from tasks.data.readers import BadItem, DatasetError, make_reader


def _noise(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _voc(root: Path, splits: dict[str, list[str]], size: int = 24) -> Path:
    """A VOC layout: one JPEG and one palette PNG per stem, a list file per split."""
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "SegmentationClass").mkdir(exist_ok=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    stems = sorted({s for listed in splits.values() for s in listed})
    for n, stem in enumerate(stems):
        Image.fromarray(_noise(size, size + 4, n)).save(root / "JPEGImages" / f"{stem}.jpg")
        mask = np.zeros((size, size + 4), np.uint8)
        mask[2: 2 + n % 7 + 3, 3:12] = 1 + n % 3
        Image.fromarray(mask, mode="P").save(root / "SegmentationClass" / f"{stem}.png")
    for split, listed in splits.items():
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(listed))
    return root


def _coco(root: Path, split: str, files: list[tuple[int, str]], size=(20, 30),
          claimed: dict[int, tuple[int, int]] | None = None) -> Path:
    """A COCO layout: one square annotation per image; ``claimed`` overrides json sizes."""
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    images, anns = [], []
    for image_id, name in files:
        path = root / split / name
        if not path.exists() and ".." not in name and not name.startswith("/"):
            Image.fromarray(_noise(*size, image_id + 100 * len(split))).save(path)
        h, w = (claimed or {}).get(image_id, size)
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
        anns.append({"id": 1000 + image_id, "image_id": image_id, "category_id": 1,
                     "iscrowd": 0, "segmentation": [[2, 2, 12, 2, 12, 9, 2, 9]]})
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(
        {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}))
    return root


def _ingest(readers, url: str, name: str = "d", **kw) -> tuple[ingest.IngestPlan, dict]:
    plan = ingest.plan_ingest(readers, name, size=kw.pop("size", 16),
                              shard_size=kw.pop("shard_size", 4), **kw)
    ingest.ingest_plan(plan, url)
    return plan, store.finalize_dataset(url, name, plan.spec.version)  # the store's own account


# ---------------------------------------------------------------------------------------------
# 5. The smaller points


@pytest.mark.parametrize("name", ["ds\n", "ds\r\n", "a\nb"])
def test_names_with_a_newline_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="invalid dataset name"):
        store.validate_name(name)
    with pytest.raises(ValueError, match="invalid derived kind"):
        store.derived_key(name.replace("d", "k"), {})


def test_voc_stems_with_spaces(tmp_path: Path) -> None:
    root = _voc(tmp_path / "voc", {"train": ["my image", "plain", "two  spaces here"]})
    reader = make_reader("voc", root, "train")
    items = {i.id: i for i in reader.list_items()}
    assert sorted(items) == ["my image", "plain", "two  spaces here"]
    assert items["my image"].image_path.endswith("JPEGImages/my image.jpg")
    _, mask = reader.load(items["two  spaces here"])
    expected = np.asarray(Image.open(root / "SegmentationClass" / "two  spaces here.png"))
    np.testing.assert_array_equal(mask, expected)
    # Pairs still read as pairs; a spaced stem that names no image is a clear error.
    (root / "pairs.txt").write_text("JPEGImages/plain.jpg SegmentationClass/plain.png\n")
    [pair] = make_reader("voc", root, "train", list_file=root / "pairs.txt").list_items()
    assert pair.id == "plain"
    (root / "bad.txt").write_text("no such image\n")
    with pytest.raises(DatasetError, match="a stem with spaces must name an existing"):
        make_reader("voc", root, "train", list_file=root / "bad.txt").list_items()


def test_coco_file_name_outside_the_image_folder_is_quarantined(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    root.mkdir()
    # Real, decodable images of the right size: read, they would be ingested.
    Image.fromarray(_noise(20, 30, 0)).save(root / "outside.jpg")
    _coco(root, "train", [(1, "a.jpg"), (2, "../outside.jpg"), (3, str(root / "outside.jpg"))])
    url = str(tmp_path / "s.zarr")
    _, summary = _ingest([make_reader("coco", root, "train")], url)
    assert (summary["ingested"], summary["quarantined"]) == (1, 2)
    q = store.open_dataset(url, "d").quarantine.set_index("id")
    assert "points outside the image folder" in q.at["2", "reason"]
    assert "points outside the image folder" in q.at["3", "reason"]
    reader = make_reader("coco", root, "train")
    bad = next(i for i in reader.list_items() if i.id == "2")
    with pytest.raises(BadItem, match="outside the image folder"):
        reader.load(bad)


def _refuse_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every local Zarr write fail as it would on a read-only store."""

    async def refuse(self, *args, **kwargs):
        raise PermissionError(30, "Read-only file system")

    for method in ("set", "set_if_not_exists", "delete", "delete_dir"):
        monkeypatch.setattr(zarr.storage.LocalStore, method, refuse)


def test_noop_rerun_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _voc(tmp_path / "voc", {"train": [f"t{k}" for k in range(6)], "val": ["v0", "v1"]})
    url = str(tmp_path / "s.zarr")
    readers = [make_reader("voc", root, s) for s in ("train", "val")]
    plan, first = _ingest(readers, url)
    files = {p: p.stat().st_mtime_ns for p in Path(url).rglob("*")}
    _refuse_writes(monkeypatch)
    readers = [make_reader("voc", root, s) for s in ("train", "val")]
    again, second = _ingest(readers, url)
    assert again.spec.version == plan.spec.version and second == first
    assert files == {p: p.stat().st_mtime_ns for p in Path(url).rglob("*")}
    assert len(store.open_dataset(url, "d")) == 8


# ---------------------------------------------------------------------------------------------
# 4. Masks only from lossless formats


def test_lossy_mask_data_is_quarantined_whatever_its_suffix(tmp_path: Path) -> None:
    root = _voc(tmp_path / "voc", {"train": ["jpeg_as_png", "tiff_jpeg", "bmp", "tiff", "ok"]})
    seg = root / "SegmentationClass"
    label = np.asarray(Image.open(seg / "ok.png"))
    # JPEG bytes under .png: decodes as "L", class ids smeared into other valid class ids.
    Image.fromarray(label).save(seg / "jpeg_as_png.png", format="JPEG", quality=75)
    smeared = np.asarray(Image.open(seg / "jpeg_as_png.png"))
    assert smeared.max() <= 20 and not np.array_equal(smeared, label)
    Image.fromarray(label).save(seg / "tiff_jpeg.png", format="TIFF", compression="jpeg")
    Image.fromarray(label).save(seg / "bmp.png", format="BMP")
    Image.fromarray(label).save(seg / "tiff.png", format="TIFF", compression="tiff_lzw")
    reader = make_reader("voc", root, "train")
    items = {i.id: i for i in reader.list_items()}
    with pytest.raises(BadItem, match="mask is JPEG data, whatever its suffix"):
        reader.load(items["jpeg_as_png"])
    with pytest.raises(BadItem, match="TIFF with lossy jpeg compression"):
        reader.load(items["tiff_jpeg"])
    for stem in ("bmp", "tiff", "ok"):
        np.testing.assert_array_equal(reader.load(items[stem])[1], label)
    url = str(tmp_path / "s.zarr")
    _, summary = _ingest([reader], url)
    assert (summary["ingested"], summary["quarantined"]) == (3, 2)
    q = store.open_dataset(url, "d").quarantine.set_index("id")
    assert "jpeg_as_png.png: mask is JPEG data" in q.at["jpeg_as_png", "reason"]


# ---------------------------------------------------------------------------------------------
# 3. Content fingerprints


def test_mask_edited_to_the_same_byte_size_makes_a_new_version(tmp_path: Path) -> None:
    root = _voc(tmp_path / "voc", {"train": ["a", "b", "c"]})
    seg = root / "SegmentationClass"
    label = np.asarray(Image.open(seg / "b.png")).copy()
    Image.fromarray(label).save(seg / "b.png", format="BMP")  # fixed-size encoding
    url = str(tmp_path / "s.zarr")
    first, _ = _ingest([make_reader("voc", root, "train")], url)
    size = (seg / "b.png").stat().st_size
    label[0, :5] = 2  # an annotator's fix: same dimensions, same byte count
    Image.fromarray(label).save(seg / "b.png", format="BMP")
    assert (seg / "b.png").stat().st_size == size
    second, _ = _ingest([make_reader("voc", root, "train")], url)
    assert second.spec.fingerprint != first.spec.fingerprint
    assert second.spec.version != first.spec.version
    np.testing.assert_array_equal(store.open_dataset(url, "d").original_mask("b"), label)
    # The old version is still there, unchanged.
    old = store.open_dataset(url, "d", first.spec.version).original_mask("b")
    assert not np.array_equal(old, label)


# ---------------------------------------------------------------------------------------------
# 1. Ids unique within a dataset


def test_coco_ids_restarting_per_split_are_namespaced(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    _coco(root, "train", [(k, f"t{k}.jpg") for k in (1, 2, 3, 4)])
    _coco(root, "val", [(k, f"v{k}.jpg") for k in (1, 2)])
    readers = [make_reader("coco", root, s) for s in ("train", "val")]
    url = str(tmp_path / "s.zarr")
    plan, summary = _ingest(readers, url, size=20)
    assert summary["ingested"] == 6
    ds = store.open_dataset(url, "d")
    assert ds.split_ids("train") == ["train/1", "train/2", "train/3", "train/4"]
    assert ds.split_ids("val") == ["val/1", "val/2"]
    for split, reader in zip(("train", "val"), readers, strict=True):
        for item in reader.list_items():
            image, _ = reader.load(item)
            small, _ = ingest.resize_pair(image, image[..., 0], 20)
            np.testing.assert_array_equal(ds.image(f"{split}/{item.id}"), small)
    # A single split keeps the source's ids.
    _, single = _ingest([make_reader("coco", root, "val")], url, name="v")
    assert store.open_dataset(url, "v").ids == ["1", "2"]


def test_a_store_with_repeated_ids_is_refused(tmp_path: Path) -> None:
    spec = store.DatasetSpec(
        name="old", version="v-000000000000", size=16, shard_size=4,
        classes=["background", "x"], source_ids=[0, 1], ids=["1", "2", "1"],
        splits=["train", "train", "val"], source_paths=["a", "b", "c"])
    url = str(tmp_path / "s.zarr")
    store.create_dataset(url, spec)
    ok = store.ItemResult(image=np.zeros((16, 16, 3), np.uint8),
                          mask=np.zeros((16, 16), np.uint8),
                          original_mask=np.zeros((16, 16), np.uint8))
    store.write_shard(url, "old", spec.version, 0, [ok, ok, ok])
    assert store.finalize_dataset(url, "old", spec.version)["complete"]
    with pytest.raises(store.StoreError, match="id.* that name more than one row .*'1'"):
        store.open_dataset(url, "old")
    with pytest.raises(store.StoreError, match="name more than one row"):
        store.UnlabelledImages(url, "old")


def test_an_image_in_two_splits_or_a_split_named_twice_is_refused(tmp_path: Path) -> None:
    root = _voc(tmp_path / "voc", {"train": ["a", "b", "shared"], "val": ["c", "shared"]})
    readers = [make_reader("voc", root, s) for s in ("train", "val")]
    with pytest.raises(DatasetError, match="1 image.* listed in two splits.*'shared'") as err:
        ingest.plan_ingest(readers, "d")
    assert "\n" not in str(err.value)
    train = make_reader("voc", root, "train")
    with pytest.raises(ValueError, match="split 'train' is named twice") as err:
        ingest.plan_ingest([train, make_reader("voc", root, "train")], "d")
    assert "\n" not in str(err.value)


def test_one_image_twice_within_a_split_is_quarantined(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    _coco(root, "train", [(1, "a.jpg"), (2, "b.jpg"), (3, "a.jpg")])
    url = str(tmp_path / "s.zarr")
    _, summary = _ingest([make_reader("coco", root, "train")], url)
    assert (summary["ingested"], summary["quarantined"]) == (2, 1)
    ds = store.open_dataset(url, "d")
    assert ds.ids == ["1", "2"]
    assert ds.quarantine.at[0, "reason"] == (
        "duplicate of '1': the same image file is listed twice in split 'train'")


# ---------------------------------------------------------------------------------------------
# 2. Racing ingests


_BARRIER = None  # set in each racing process by _start_racer


def _start_racer(barrier) -> None:
    global _BARRIER
    _BARRIER = barrier


def _racing_ingest(root: str, url: str) -> str:
    """One of several processes ingesting the same dataset at once (spawned: plain function).

    Returns "ok", or "refused: <message>" for a refusal the store explains; anything else
    raises, and the test fails with its traceback.
    """
    _BARRIER.wait(timeout=60)  # all start creating the version at the same moment
    try:
        ingest.ingest_dataset("voc", root, url, "race", size=16, shard_size=2)
    except (store.StoreError, DatasetError) as exc:
        return f"refused: {exc}"
    return "ok"


def test_racing_ingests_leave_one_sound_version(tmp_path: Path) -> None:
    """4 processes (spawned once, reused) race to ingest one dataset into a fresh store, 3 times:
    each finishes or is refused with a message; the version opens, complete and exact."""
    import multiprocessing as mp

    root = _voc(tmp_path / "voc", {"train": [f"t{k}" for k in range(8)], "val": ["v0", "v1"]})
    reference = str(tmp_path / "reference.zarr")
    expected = ingest.ingest_dataset("voc", str(root), reference, "race", size=16, shard_size=2)
    ref = store.open_dataset(reference, "race")
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(4)
    with ctx.Pool(4, initializer=_start_racer, initargs=(barrier,)) as pool:
        for trial in range(3):
            url = str(tmp_path / f"race{trial}.zarr")
            # One task per process: each blocks on the barrier until all four hold one.
            outcomes = pool.starmap(_racing_ingest, [(str(root), url)] * 4, chunksize=1)
            assert all(o == "ok" or o.startswith("refused: ") for o in outcomes), outcomes
            assert "ok" in outcomes, f"trial {trial}: every process was refused: {outcomes}"
            ds = store.open_dataset(url, "race")
            assert ds.version == expected["version"]
            assert len(ds.index) == len(set(ds.index["id"])) == expected["listed"] == 10
            assert ds.ids == ref.ids and ds.summary["ingested"] == 10 and ds.quarantine.empty
            for image_id in ds.ids:
                np.testing.assert_array_equal(ds.image(image_id), ref.image(image_id))
                np.testing.assert_array_equal(ds.original_mask(image_id),
                                              ref.original_mask(image_id))
            # A rerun finds the version complete and writes nothing.
            again = ingest.ingest_dataset("voc", str(root), url, "race", size=16, shard_size=2)
            assert again["shards_written"] == 0 and again["ingested"] == 10
        pool.close()
        pool.join()


def test_a_damaged_version_is_refused_then_rebuilt_by_a_rerun(tmp_path: Path) -> None:
    root = _voc(tmp_path / "voc", {"train": [f"t{k}" for k in range(6)], "val": ["v0"]})
    url = str(tmp_path / "s.zarr")
    first = ingest.ingest_dataset("voc", str(root), url, "d", size=16, shard_size=2)
    reference = store.open_dataset(url, "d")
    images = {i: reference.image(i) for i in reference.ids}
    # What a racing creator used to leave: an array's metadata gone, the version still latest.
    (Path(url) / "datasets" / "d" / first["version"] / "index" / "id" / "zarr.json").unlink()
    with pytest.raises(store.StoreError, match="is damaged .*index/id does not open.*rerun"):
        store.open_dataset(url, "d")
    with pytest.raises(store.StoreError, match="is damaged"):
        store.finalize_dataset(url, "d", first["version"])
    again = ingest.ingest_dataset("voc", str(root), url, "d", size=16, shard_size=2)
    assert again["version"] == first["version"] and again["complete"]
    assert again["shards_written"] == again["shards"] == 4  # rebuilt, not "already complete"
    ds = store.open_dataset(url, "d")
    assert ds.ids == reference.ids
    for image_id, image in images.items():
        np.testing.assert_array_equal(ds.image(image_id), image)
    assert not any((Path(url) / store.STAGING).iterdir())  # nothing left behind


def test_object_storage_creates_in_place_and_repairs(tmp_path: Path) -> None:
    import uuid

    root = _voc(tmp_path / "voc", {"train": ["a", "b", "c"]})
    url = f"memory://integrity-{uuid.uuid4().hex}"
    plan, summary = _ingest([make_reader("voc", root, "train")], url)
    assert summary["complete"] and not store.create_dataset(url, plan.spec)
    assert len(store.open_dataset(url, "d")) == 3
    # A creation that never finished (no "created"): rebuilt in place.
    group = store._root(url)[f"datasets/d/{plan.spec.version}"]
    group.attrs["created"] = False
    assert store.create_dataset(url, plan.spec)
    assert store.done_shards(url, "d", plan.spec.version) == set()


# ---------------------------------------------------------------------------------------------
# 6. Memory follows verified sizes only


def test_a_json_size_claim_is_checked_against_the_file(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    _coco(root, "train", [(1, "a.jpg"), (2, "b.jpg"), (3, "c.jpg")],
          claimed={2: (20000, 20000)})
    # Checked while listing, before anything is decoded: the claim sizes nothing.
    url = str(tmp_path / "s.zarr")
    _, summary = _ingest([make_reader("coco", root, "train")], url)
    assert (summary["ingested"], summary["quarantined"]) == (2, 1)
    ds = store.open_dataset(url, "d")
    assert ds.quarantine.at[0, "reason"] == "image 30x20 != annotated size 20000x20000"
    assert [ds.original_mask(i).shape for i in ds.ids] == [(20, 30), (20, 30)]


def test_images_over_the_pixel_limit_are_quarantined(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    _coco(root, "train", [(1, "a.jpg"), (2, "b.jpg")])
    big = _coco(tmp_path / "big", "train", [(3, "huge.jpg")], size=(60, 80))
    (root / "train" / "huge.jpg").write_bytes((big / "train" / "huge.jpg").read_bytes())
    data = json.loads((root / "annotations" / "instances_train.json").read_text())
    data["images"].append({"id": 3, "file_name": "huge.jpg", "height": 60, "width": 80})
    (root / "annotations" / "instances_train.json").write_text(json.dumps(data))
    readers = [make_reader("coco", root, "train")]
    plan = ingest.plan_ingest(readers, "d", size=16, max_pixels=1000)
    assert plan.spec.params["max_pixels"] == 1000
    assert [bool(i.quarantine) for i in plan.items] == [False, False, True]
    url = str(tmp_path / "s.zarr")
    _, summary = _ingest(readers, url, max_pixels=1000)
    assert (summary["ingested"], summary["quarantined"]) == (2, 1)
    reason = store.open_dataset(url, "d").quarantine.at[0, "reason"]
    assert reason == "image 80x60 has 4,800 pixels, over the limit of 1,000 (max_pixels)"


def _voc_sizes(root: Path, sizes: dict[str, tuple[int, int]]) -> Path:
    """A VOC train split whose images have their own (height, width); blocky masks."""
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for n, (stem, (h, w)) in enumerate(sizes.items()):
        Image.fromarray(np.full((h, w, 3), 40 + n, np.uint8)).save(
            root / "JPEGImages" / f"{stem}.jpg")
        mask = np.zeros((h, w), np.uint8)
        mask[h // 4: h // 2 + n % 5, w // 3: w - 2] = 1 + n % 3
        mask[: h // 8, : w // 8] = 255
        Image.fromarray(mask, mode="P").save(root / "SegmentationClass" / f"{stem}.png")
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(sizes))
    return root


def _peak_bytes(fn) -> tuple[object, int]:
    """``fn()`` and the peak of Python-tracked memory (numpy buffers included) it allocated."""
    import tracemalloc

    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        out = fn()
        return out, tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def test_original_masks_are_ragged_so_memory_follows_the_image_at_hand(tmp_path: Path) -> None:
    """One large image among small ones (issue 12: one 8000x8000 among 144-px images took a
    worker to 5.1 GB, and reading a small original mask of its shard to 8 GB): neither the
    ingest nor a read of a small label pays for the large one."""
    small_hw, big_hw, shard = (64, 72), (1500, 2000), 64
    sizes = {f"s{k:02d}": small_hw for k in range(shard - 1)}
    sizes["big"] = big_hw
    sizes = dict(sorted(sizes.items()))  # the big one in the middle of the one shard
    root = _voc_sizes(tmp_path / "voc", sizes)
    url = str(tmp_path / "s.zarr")
    summary, ingest_peak = _peak_bytes(lambda: ingest.ingest_dataset(
        "voc", str(root), url, "d", splits=["train"], size=32, shard_size=shard))
    assert summary["ingested"] == shard and summary["shards"] == 1
    big_pixels = big_hw[0] * big_hw[1]
    padded_shard = shard * big_pixels  # what the padded layout allocated for original masks
    small_shard = shard * small_hw[0] * small_hw[1]
    # The ingest holds the big image's decode (RGB, label and their working copies: 9 bytes
    # a pixel measured), not a shard of labels padded to its size.
    assert ingest_peak < 12 * big_pixels < padded_shard / 4, (ingest_peak, padded_shard)

    ds = store.open_dataset(url, "d")
    assert ds.group.attrs["layout"] == store.LAYOUT_VERSION == 2
    assert ds.group["original_masks"].shape == (shard,)
    reader = make_reader("voc", root, "train")
    for item in reader.list_items():  # every label exactly as the source has it
        np.testing.assert_array_equal(ds.original_mask(item.id), reader.load(item)[1])
    ds = store.open_dataset(url, "d")  # a fresh reader: nothing cached
    ds.original_mask("s00")  # opens the array (its metadata) once
    mask, read_peak = _peak_bytes(lambda: ds.original_mask("s01"))
    assert mask.shape == small_hw
    # This one label and zarr's reading of its chunk: under one shard of small labels (25 KB
    # of 295 KB measured); the padded layout decoded the whole 192 MB shard.
    assert read_peak < small_shard < padded_shard / 100, (read_peak, small_shard)


def test_a_padded_layout_1_version_is_still_read(tmp_path: Path) -> None:
    """Versions ingested before ragged original masks (layout 1: padded to the largest image)
    open and read as before; only a rerun of their ingest makes a layout-2 version."""
    sizes = {"a": (20, 30), "b": (40, 24), "c": (16, 16)}
    root = _voc_sizes(tmp_path / "voc", sizes)
    url = str(tmp_path / "s.zarr")
    plan, _ = _ingest([make_reader("voc", root, "train")], url, shard_size=2)
    ds = store.open_dataset(url, "d")
    labels = {i: ds.original_mask(i) for i in ds.ids}
    # Turn it into what layout 1 wrote: (N, Hmax, Wmax) uint8 padded with 255.
    group = zarr.open_group(str(Path(url) / "datasets" / "d" / plan.spec.version), mode="a")
    del group["original_masks"]
    padded = np.full((3, 40, 30), store.IGNORE_INDEX, np.uint8)
    for row, image_id in enumerate(ds.ids):
        h, w = labels[image_id].shape
        padded[row, :h, :w] = labels[image_id]
    group.create_array("original_masks", shape=padded.shape, dtype="uint8",
                       chunks=(1, 40, 30), shards=(2, 40, 30), fill_value=IGNORE_INDEX)[:] = padded
    group.attrs["layout"] = 1
    old = store.open_dataset(url, "d")
    for image_id, label in labels.items():
        np.testing.assert_array_equal(old.original_mask(image_id), label)
    with pytest.raises(store.StoreError, match="padded layout 1 .* rerun its ingest"):
        store.write_shard(url, "d", plan.spec.version, 0, [])


def test_a_decoded_label_over_the_pixel_limit_is_quarantined_by_the_writer(
        tmp_path: Path) -> None:
    """The header guard's backstop: what was decoded, not what was claimed, is checked."""
    spec = store.DatasetSpec(
        name="d", version="v-000000000001", size=16, shard_size=2, classes=["background", "x"],
        source_ids=[0, 1], ids=["a", "b"], splits=["train", "train"], source_paths=["a", "b"],
        params={"max_pixels": 400})
    url = str(tmp_path / "s.zarr")
    store.create_dataset(url, spec)

    def item(h: int, w: int) -> store.ItemResult:
        return store.ItemResult(image=np.zeros((16, 16, 3), np.uint8),
                                mask=np.zeros((16, 16), np.uint8),
                                original_mask=np.ones((h, w), np.uint8))

    store.write_shard(url, "d", spec.version, 0, [item(20, 20), item(20, 21)])
    store.finalize_dataset(url, "d", spec.version)
    ds = store.open_dataset(url, "d")
    assert ds.ids == ["a"] and (ds.original_mask("a") == 1).all()
    assert ds.quarantine.at[0, "reason"] == (
        "label 21x20 has 420 pixels, over the limit of 400 (max_pixels)")
