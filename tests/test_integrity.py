"""Data integrity (issue 12): unique ids, atomic versions, content fingerprints, lossless masks,
paths that stay inside the dataset, bounded memory, and no writes on a no-op rerun."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from tasks import ingest, store
from tasks.readers import BadItem, DatasetError, make_reader


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
    store.create_dataset(url, plan.spec)
    for k in range(plan.spec.n_shards):
        ingest.ingest_shard(url, name, plan.spec.version, k, plan.shard_items(k), plan.readers,
                            plan.spec.size)
    return plan, store.finalize_dataset(url, name, plan.spec.version)


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
        splits=["train", "train", "val"], source_paths=["a", "b", "c"], max_height=16,
        max_width=16)
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
