"""Dataset readers: real COCO files, synthetic VOC-layout folders, and every bad input."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from tasks.data.readers import VOC_CLASSES, BadItem, DatasetError, Item, make_reader
from tasks.data.synth import voc_palette

# pycocotools' compiled decode trips a NumPy 2 deprecation on every call; it is harmless here.

COCO_TINY = Path(
    os.environ.get(
        "FSS_COCO_TINY", Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-tiny"
    )
)


def _noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _save_palette_png(path: Path, labels: np.ndarray) -> None:
    im = Image.fromarray(labels.astype(np.uint8), mode="P")
    im.putpalette(voc_palette())
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def _labels(height: int, width: int, ids: list[int], seed: int = 0) -> np.ndarray:
    labels = np.zeros((height, width), np.uint8)
    for k, class_id in enumerate(ids):
        labels[k * 5 : k * 5 + 4, k * 3 : k * 3 + 10] = class_id
    labels[-1, :] = 255  # a VOC-style ignore border
    return labels


def _make_voc(root: Path, specs: dict[str, tuple[int, int, list[int]]], split: str = "train"):
    """VOC 2012 layout: JPEG images, palette masks, a stem-per-line list."""
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    truth = {}
    for n, (stem, (height, width, ids)) in enumerate(specs.items()):
        Image.fromarray(_noise(height, width, n)).save(root / "JPEGImages" / f"{stem}.jpg")
        truth[stem] = _labels(height, width, ids)
        _save_palette_png(root / "SegmentationClass" / f"{stem}.png", truth[stem])
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True, exist_ok=True)
    # Unsorted on purpose, with a blank line: the reader sorts and skips it.
    (lists / f"{split}.txt").write_text("\n".join(reversed(list(specs))) + "\n\n")
    return truth


VOC_SPECS = {
    "2007_000032": (80, 120, [1, 15]),
    "2007_000039": (60, 50, [20]),
    "2008_000002": (40, 40, []),
}


@pytest.fixture
def voc(tmp_path: Path):
    root = tmp_path / "VOC2012"
    return root, _make_voc(root, VOC_SPECS)


# --------------------------------------------------------------------------------------------
# VOC


def test_voc_round_trip(voc):
    root, truth = voc
    reader = make_reader("voc", root, "train")
    assert reader.kind == "voc"
    assert reader.classes == VOC_CLASSES and len(VOC_CLASSES) == 21
    assert reader.classes[0] == "background" and reader.classes[20] == "tvmonitor"
    assert reader.source_ids == list(range(21))
    items = reader.list_items()
    assert [i.id for i in items] == sorted(VOC_SPECS)
    for item in items:
        height, width, _ = VOC_SPECS[item.id]
        assert (item.height, item.width, item.split) == (height, width, "train")
        assert os.path.isabs(item.image_path) and os.path.isabs(item.label)
        assert item.label.endswith(f"SegmentationClass/{item.id}.png")
        image, mask = reader.load(item)
        assert image.shape == (height, width, 3) and image.dtype == np.uint8
        assert mask.dtype == np.uint8
        # Raw palette indices, not colours.
        np.testing.assert_array_equal(mask, truth[item.id])
    json.dumps(reader.describe())
    assert reader.describe()["split"] == "train"


def test_voc_pickle_is_small_and_loads(voc):
    root, truth = voc
    reader = make_reader("voc", root)
    item = reader.list_items()[0]
    blob = pickle.dumps(reader)
    assert len(blob) < 10_000
    _, mask = pickle.loads(blob).load(item)
    np.testing.assert_array_equal(mask, truth[item.id])


def test_voc_sbd_aug_layout_with_pair_list(tmp_path: Path):
    root = tmp_path / "VOCaug"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClassAug").mkdir()
    truth = {}
    for n, stem in enumerate(["2011_003276", "2007_000033"]):
        Image.fromarray(_noise(30, 40, n)).save(root / "JPEGImages" / f"{stem}.jpg")
        truth[stem] = _labels(30, 40, [n + 3])
        Image.fromarray(truth[stem], mode="L").save(root / "SegmentationClassAug" / f"{stem}.png")
    aug = root / "ImageSets" / "SegmentationAug"
    aug.mkdir(parents=True)
    # DeepLab's list style: leading slashes.
    (aug / "train_aug.txt").write_text(
        "".join(f"/JPEGImages/{s}.jpg /SegmentationClassAug/{s}.png\n" for s in truth)
    )
    reader = make_reader("voc", root, "train_aug")
    assert reader.describe()["mask_dir"] == "SegmentationClassAug"
    items = reader.list_items()
    assert [i.id for i in items] == ["2007_000033", "2011_003276"]
    for item in items:
        np.testing.assert_array_equal(reader.load(item)[1], truth[item.id])

    # Stems only: the _aug split resolves masks under SegmentationClassAug.
    (aug / "train_aug.txt").write_text("\n".join(truth))
    items = make_reader("voc", root, "train_aug").list_items()
    assert all("/SegmentationClassAug/" in i.label for i in items)


def test_voc_explicit_pair_list_file(voc, tmp_path: Path):
    root, truth = voc
    list_file = tmp_path / "fold0.txt"
    # PFENet style: no leading slash, relative to the root.
    list_file.write_text("JPEGImages/2007_000039.jpg SegmentationClass/2007_000039.png\n")
    reader = make_reader("voc", root, "val", list_file=list_file)
    [item] = reader.list_items()
    assert item.id == "2007_000039" and item.split == "val"
    np.testing.assert_array_equal(reader.load(item)[1], truth["2007_000039"])


def test_voc_custom_classes_file(tmp_path: Path):
    root = tmp_path / "shapes"
    truth = _make_voc(root, {"a": (20, 30, [1]), "b": (20, 30, [2])})
    classes = tmp_path / "names.txt"
    classes.write_text("_background_\ncircle\nsquare\n\n")
    reader = make_reader("voc", root, classes_file=classes)
    assert reader.classes == ["background", "circle", "square"]
    assert reader.source_ids == [0, 1, 2]
    for item in reader.list_items():
        np.testing.assert_array_equal(reader.load(item)[1], truth[item.id])

    # A self-describing folder: root/classes.txt is picked up without being named.
    (root / "classes.txt").write_text("background\ncircle\n")
    reader = make_reader("voc", root)
    assert reader.classes == ["background", "circle"]
    with pytest.raises(BadItem, match=r"unknown label ids \[2\]"):
        reader.load(next(i for i in reader.list_items() if i.id == "b"))


@pytest.mark.parametrize(
    "text, message",
    [
        ("circle\nsquare\n", "must be the background"),
        ("background\n", "at least one class"),
        ("background\ncircle\n\nsquare\n", "blank line"),
        ("background\ncircle\ncircle\n", "repeats"),
    ],
)
def test_voc_bad_classes_file(voc, tmp_path: Path, text: str, message: str):
    root, _ = voc
    classes = tmp_path / "classes.txt"
    classes.write_text(text)
    with pytest.raises(DatasetError, match=message):
        make_reader("voc", root, classes_file=classes)


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P"])
def test_voc_image_modes_become_rgb(voc, mode: str):
    root, _ = voc
    path = root / "JPEGImages" / "2008_000002.jpg"
    im = Image.fromarray(_noise(40, 40)).convert(mode)
    if mode in ("RGBA", "P"):
        # JPEG holds neither: a VOC-layout dataset may still carry PNG bytes under .jpg.
        im.save(path, format="PNG")
    else:
        im.save(path, format="JPEG")
    reader = make_reader("voc", root)
    image, _ = reader.load(next(i for i in reader.list_items() if i.id == "2008_000002"))
    assert image.shape == (40, 40, 3) and image.dtype == np.uint8


def _item(reader, stem: str) -> Item:
    return next(i for i in reader.list_items() if i.id == stem)


def test_voc_truncated_jpeg(voc):
    root, _ = voc
    path = root / "JPEGImages" / "2007_000032.jpg"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    reader = make_reader("voc", root)
    with pytest.raises(BadItem) as err:
        reader.load(_item(reader, "2007_000032"))
    assert err.value.path == str(path)
    assert "image fails to decode" in err.value.reason and "truncated" in err.value.reason
    assert str(err.value) == f"{path}: {err.value.reason}"


def test_voc_mask_size_mismatch(tmp_path: Path):
    root = tmp_path / "voc"
    _make_voc(root, {"x": (80, 120, [1])})
    mask_path = root / "SegmentationClass" / "x.png"
    _save_palette_png(mask_path, np.zeros((80, 100), np.uint8))
    reader = make_reader("voc", root)
    with pytest.raises(BadItem) as err:
        reader.load(_item(reader, "x"))
    assert err.value.path == str(mask_path)
    assert err.value.reason == "mask 100x80 != image 120x80"


def test_voc_unknown_label_ids(voc):
    root, _ = voc
    mask_path = root / "SegmentationClass" / "2007_000039.png"
    _save_palette_png(mask_path, _labels(60, 50, [23, 40, 7]))
    reader = make_reader("voc", root)
    with pytest.raises(BadItem) as err:
        reader.load(_item(reader, "2007_000039"))
    assert err.value.path == str(mask_path)
    assert err.value.reason == "unknown label ids [23, 40]"


@pytest.mark.parametrize(
    "victim", ["JPEGImages/2007_000032.jpg", "SegmentationClass/2007_000032.png"]
)
def test_voc_listed_file_missing(voc, victim: str):
    root, _ = voc
    reader = make_reader("voc", root)
    item = _item(reader, "2007_000032")
    (root / victim).unlink()
    with pytest.raises(BadItem) as err:
        reader.load(item)
    assert err.value.path == str(root / victim)
    assert "file missing" in err.value.reason
    # Listing still works and leaves the size unknown rather than failing.
    if victim.startswith("JPEG"):
        assert _item(reader, "2007_000032").height is None


def test_voc_mask_fails_to_decode(voc):
    root, _ = voc
    mask_path = root / "SegmentationClass" / "2007_000032.png"
    mask_path.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    reader = make_reader("voc", root)
    with pytest.raises(BadItem, match="mask fails to decode"):
        reader.load(_item(reader, "2007_000032"))


def test_voc_rgb_mask_rejected(voc):
    root, _ = voc
    mask_path = root / "SegmentationClass" / "2007_000032.png"
    Image.fromarray(_noise(80, 120)).save(mask_path)
    reader = make_reader("voc", root)
    with pytest.raises(BadItem, match="mask mode RGB"):
        reader.load(_item(reader, "2007_000032"))


def test_voc_dataset_errors(voc, tmp_path: Path):
    root, _ = voc
    with pytest.raises(DatasetError, match="not a directory"):
        make_reader("voc", tmp_path / "nope")
    with pytest.raises(DatasetError, match="no list file"):
        make_reader("voc", root, "val")
    bad_list = tmp_path / "bad.txt"
    bad_list.write_text("a b c\n")
    with pytest.raises(DatasetError, match="3 fields"):
        make_reader("voc", root, list_file=bad_list).list_items()
    # A pair may not leave the root (a symlinked folder inside it may: the check is lexical).
    bad_list.write_text("JPEGImages/x.jpg SegmentationClass/x.png\n"
                        "JPEGImages/../../secret/y.jpg SegmentationClass/y.png\n")
    with pytest.raises(DatasetError, match=r"bad.txt:2: JPEGImages/\.\./\.\./secret/y.jpg "
                                           "leaves the dataset root"):
        make_reader("voc", root, list_file=bad_list).list_items()
    bad_list.write_text("\n")
    with pytest.raises(DatasetError, match="lists no images"):
        make_reader("voc", root, list_file=bad_list).list_items()
    with pytest.raises(ValueError, match="unknown dataset source"):
        make_reader("ade20k", root)
    # A list file that fits another root: every image missing is the dataset's fault.
    elsewhere = tmp_path / "empty_root"
    elsewhere.mkdir()
    with pytest.raises(DatasetError, match="none of the 3 listed images exist"):
        make_reader(
            "voc", elsewhere, list_file=root / "ImageSets/Segmentation/train.txt"
        ).list_items()


def test_voc_fingerprint(voc, tmp_path: Path):
    root, _ = voc
    first = make_reader("voc", root).fingerprint()
    assert len(first) == 64 and first == make_reader("voc", root).fingerprint()
    # The root's location is not part of the identity.
    moved = tmp_path / "elsewhere"
    shutil.copytree(root, moved)
    assert make_reader("voc", moved).fingerprint() == first
    # A changed file, list or class table is.
    _save_palette_png(moved / "SegmentationClass" / "2008_000002.png", _labels(40, 40, [1, 2, 3]))
    assert make_reader("voc", moved).fingerprint() != first
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000032\n")
    assert make_reader("voc", root).fingerprint() != first
    classes = tmp_path / "c.txt"
    classes.write_text("\n".join(VOC_CLASSES[:-1] + ["tv"]))
    assert make_reader("voc", moved, classes_file=classes).fingerprint() != first


# --------------------------------------------------------------------------------------------
# COCO: synthetic files for the rules and the bad inputs


def _square(x0: int, y0: int, x1: int, y1: int) -> list[list[float]]:
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def _make_coco(root: Path, annotations: list[dict], split: str = "train2017", extra_image=True):
    """A tiny COCO-format dataset: 2 categories with non-contiguous ids, 60x40 images."""
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    images = [{"id": 7, "file_name": "a.jpg", "height": 40, "width": 60}]
    if extra_image:
        images.append({"id": 3, "file_name": "empty.jpg", "height": 30, "width": 20})
    for n, im in enumerate(images):
        Image.fromarray(_noise(im["height"], im["width"], n)).save(root / split / im["file_name"])
    data = {
        "images": images,
        "annotations": [{"image_id": 7, "iscrowd": 0, **a} for a in annotations],
        "categories": [{"id": 44, "name": "bottle"}, {"id": 5, "name": "airplane"}],
    }
    path = root / "annotations" / f"instances_{split}.json"
    path.write_text(json.dumps(data))
    return path


def test_coco_synthetic_overlaps_and_classes(tmp_path: Path):
    crowd_area = np.zeros((40, 60), np.uint8)
    crowd_area[15:25, 15:45] = 1
    crowd = mask_utils.encode(np.asfortranarray(crowd_area))
    crowd_rle = {"size": [40, 60], "counts": crowd["counts"].decode()}  # compressed string RLE
    uncompressed = {"size": [40, 60], "counts": [40 * 50, 40 * 10]}  # column-major: x >= 50
    _make_coco(
        tmp_path,
        [
            {"id": 1, "category_id": 5, "segmentation": _square(0, 0, 40, 30)},  # big airplane
            {"id": 2, "category_id": 44, "segmentation": _square(10, 10, 20, 20)},  # small bottle
            # Same area, overlapping: the larger annotation id is painted last and wins.
            {"id": 9, "category_id": 44, "segmentation": _square(30, 30, 36, 36)},
            {"id": 8, "category_id": 5, "segmentation": _square(33, 30, 39, 36)},
            {"id": 4, "category_id": 44, "iscrowd": 1, "segmentation": crowd_rle},
            {"id": 5, "category_id": 5, "iscrowd": 1, "segmentation": uncompressed},
        ],
    )
    reader = make_reader("coco", tmp_path, "train")
    assert reader.classes == ["background", "airplane", "bottle"]
    assert reader.source_ids == [0, 5, 44]
    empty, item = reader.list_items()  # sorted by image id: 3 then 7
    assert (empty.id, item.id) == ("3", "7")
    assert (item.height, item.width) == (40, 60)
    assert item.image_path == str(tmp_path / "train2017" / "a.jpg")

    image, mask = reader.load(item)
    assert image.shape == (40, 60, 3) and mask.shape == (40, 60)
    assert mask[5, 5] == 1  # airplane
    assert mask[15, 15] == 2  # bottle in front of the airplane
    assert mask[33, 34] == 2 and mask[33, 31] == 2 and mask[33, 37] == 1  # tie: id 9 wins
    assert mask[20, 20] == 1  # crowd under a non-crowd instance keeps the instance
    assert mask[22, 42] == 255  # crowd-only pixel: ignore
    assert mask[10, 55] == 255  # uncompressed crowd RLE
    assert mask[38, 45] == 0
    assert set(np.unique(mask)) == {0, 1, 2, 255}

    image, mask = reader.load(empty)
    assert image.shape == (30, 20, 3) and not mask.any()


def test_coco_split_resolution(tmp_path: Path):
    _make_coco(tmp_path, [], split="val2014")
    assert (
        make_reader("coco", tmp_path, "val")
        .describe()["annotation_file"]
        .endswith("instances_val2014.json")
    )
    _make_coco(tmp_path, [], split="val2017")
    reader = make_reader("coco", tmp_path, "val")  # 2017 is preferred over 2014
    assert reader.describe()["image_dir"] == str(tmp_path / "val2017")
    assert make_reader("coco", tmp_path, "val2014").annotation_file.name == "instances_val2014.json"
    _make_coco(tmp_path, [], split="val")
    assert make_reader("coco", tmp_path, "val").annotation_file.name == "instances_val.json"
    with pytest.raises(DatasetError, match="no annotation file"):
        make_reader("coco", tmp_path, "test")
    with pytest.raises(ValueError, match="classes_file"):
        make_reader("coco", tmp_path, "val", classes_file=tmp_path / "x.txt")


@pytest.mark.parametrize(
    "annotation, reason",
    [
        ({"category_id": 99, "segmentation": _square(0, 0, 5, 5)}, "unknown category_id 99"),
        ({"category_id": 5}, "missing or empty segmentation"),
        ({"category_id": 5, "segmentation": []}, "missing or empty segmentation"),
        ({"category_id": 5, "segmentation": [[1, 2, 3, 4]]}, "polygon with 4 coordinates"),
        ({"category_id": 5, "segmentation": [[1, 2, 3, 4, 5, 6, 7]]}, "7 coordinates"),
        ({"category_id": 5, "segmentation": [[1, 2, "x", 4, 5, 6]]}, "finite numbers"),
        ({"category_id": 5, "segmentation": [1, 2, 3, 4, 5, 6]}, "finite numbers"),
        ({"category_id": 5, "segmentation": [[0, 0, 1e9, 0, 0, 5]]}, "far outside"),
        (
            {"category_id": 5, "segmentation": {"size": [40, 61], "counts": [2440]}},
            r"RLE size \[40, 61\] != image size \[40, 60\]",
        ),
        (
            {"category_id": 5, "segmentation": {"size": [40, 60], "counts": [2000, 9999]}},
            "RLE runs cover 11999 pixels",
        ),
        (
            {"category_id": 5, "segmentation": {"size": [40, 60], "counts": "Q~~\x7f"}},
            "corrupt RLE",
        ),
        ({"category_id": 5, "segmentation": {"counts": [1]}}, "neither polygons nor an RLE"),
        (
            {"category_id": 5, "iscrowd": 2, "segmentation": _square(0, 0, 5, 5)},
            "iscrowd must be 0 or 1",
        ),
    ],
)
def test_coco_malformed_annotation(tmp_path: Path, annotation: dict, reason: str):
    json_path = _make_coco(
        tmp_path,
        [
            {"id": 1, "category_id": 5, "segmentation": _square(0, 0, 9, 9)},
            {"id": 31, **annotation},
        ],
        extra_image=False,
    )
    reader = make_reader("coco", tmp_path)
    [item] = reader.list_items()
    with pytest.raises(BadItem, match=reason) as err:
        reader.load(item)
    assert err.value.path == str(json_path)
    assert err.value.reason.startswith("image 7 annotation 31: ")


def test_coco_image_missing_corrupt_or_resized(tmp_path: Path):
    _make_coco(tmp_path, [], extra_image=False)
    reader = make_reader("coco", tmp_path)
    [item] = reader.list_items()
    image_path = tmp_path / "train2017" / "a.jpg"
    data = image_path.read_bytes()
    image_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadItem, match="image fails to decode") as err:
        reader.load(item)
    assert err.value.path == str(image_path)
    Image.fromarray(_noise(60, 40)).save(image_path)  # transposed
    with pytest.raises(BadItem, match="image 40x60 != annotated size 60x40"):
        reader.load(item)
    image_path.unlink()
    with pytest.raises(BadItem, match="image file missing"):
        reader.load(item)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: "{not json", "cannot read annotation file"),
        (lambda d: {k: v for k, v in d.items() if k != "categories"}, "not a COCO instances"),
        (lambda d: {**d, "images": [{"id": 1}]}, "not a COCO instances"),
        (lambda d: {**d, "annotations": [{"image_id": 7}]}, "not a COCO instances"),
        (lambda d: {**d, "categories": [{"id": 0, "name": "bg"}]}, "positive integers"),
        (lambda d: {**d, "categories": d["categories"] * 2}, "unique"),
        (lambda d: {**d, "images": d["images"] * 2}, "duplicate image ids"),
        (lambda d: {**d, "images": [{**d["images"][0], "height": "40"}]}, "height and width"),
    ],
)
def test_coco_dataset_errors(tmp_path: Path, mutate, message: str):
    json_path = _make_coco(
        tmp_path, [{"id": 1, "category_id": 5, "segmentation": _square(0, 0, 9, 9)}]
    )
    new = mutate(json.loads(json_path.read_text()))
    json_path.write_text(new if isinstance(new, str) else json.dumps(new))
    with pytest.raises(DatasetError, match=message):
        make_reader("coco", tmp_path)


def test_coco_wrong_root(tmp_path: Path):
    with pytest.raises(DatasetError, match="not a directory"):
        make_reader("coco", tmp_path / "missing")
    with pytest.raises(DatasetError, match="no annotation file"):
        make_reader("coco", tmp_path)
    _make_coco(tmp_path, [])
    for image in (tmp_path / "train2017").iterdir():
        image.unlink()
    with pytest.raises(DatasetError, match="none of the 2 listed images exist"):
        make_reader("coco", tmp_path).list_items()
    (tmp_path / "train2017").rmdir()
    with pytest.raises(DatasetError, match="image folder .* is missing"):
        make_reader("coco", tmp_path)


# --------------------------------------------------------------------------------------------
# COCO: the real files


@pytest.fixture(scope="module")
def coco_tiny() -> Path:
    if not (COCO_TINY / "annotations" / "instances_train2017.json").is_file():
        pytest.skip(f"real COCO sample not found at {COCO_TINY} (set FSS_COCO_TINY to its path)")
    return COCO_TINY


@pytest.mark.parametrize("split", ["train", "val"])
def test_coco_tiny_matches_pycocotools(coco_tiny: Path, split: str):
    reader = make_reader("coco", coco_tiny, split)
    with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints its progress
        coco = COCO(str(reader.annotation_file))
    categories = sorted(coco.loadCats(coco.getCatIds()), key=lambda c: c["id"])
    assert len(reader.classes) == 81 and reader.classes[0] == "background"
    assert reader.classes[1:] == [c["name"] for c in categories]
    assert reader.source_ids[1:] == [c["id"] for c in categories]
    assert reader.classes[1] == "person" and reader.classes[80] == "toothbrush"

    items = reader.list_items()
    assert [int(i.id) for i in items] == sorted(coco.getImgIds())
    blob = pickle.dumps(reader)
    assert len(blob) < 100_000
    worker_reader = pickle.loads(blob)  # what a Dask worker gets: no item list, no index

    saw_crowd_ignore = saw_overlap = False
    for item in items:
        image, mask = worker_reader.load(item)
        info = coco.loadImgs(int(item.id))[0]
        assert image.shape == (info["height"], info["width"], 3)
        assert mask.shape == (info["height"], info["width"]) and mask.dtype == np.uint8
        anns = coco.loadAnns(coco.getAnnIds(imgIds=int(item.id), iscrowd=None))
        shape = mask.shape
        per_class: dict[int, np.ndarray] = {}  # union of the non-crowd instances of each class
        crowd = np.zeros(shape, bool)
        for ann in anns:
            m = coco.annToMask(ann).astype(bool)
            if ann["iscrowd"]:
                crowd |= m
            else:
                index = reader.source_ids.index(ann["category_id"])
                per_class[index] = per_class.get(index, np.zeros(shape, bool)) | m
        cover = sum((m.astype(np.int32) for m in per_class.values()), np.zeros(shape, np.int32))
        any_thing = cover > 0
        saw_overlap |= bool((cover > 1).any())
        assert set(np.unique(mask).tolist()) <= {0, 255, *per_class}
        for index, union in per_class.items():
            ours = mask == index
            assert not (ours & ~union).any(), f"image {item.id}: class {index} outside its masks"
            only = union & (cover == 1)
            assert ours[only].all(), f"image {item.id}: class {index} lost uncontested pixels"
        assert ((mask == 255) == (crowd & ~any_thing)).all(), f"image {item.id}: crowd pixels"
        assert ((mask == 0) == (~any_thing & ~crowd)).all(), f"image {item.id}: background"
        saw_crowd_ignore |= bool((mask == 255).any())
    if split == "train":
        assert saw_crowd_ignore and saw_overlap  # the sample exercises both rules


def test_coco_tiny_fingerprint_and_describe(coco_tiny: Path):
    reader = make_reader("coco", coco_tiny, "train")
    assert reader.fingerprint() == make_reader("coco", coco_tiny, "train2017").fingerprint()
    assert reader.fingerprint() != make_reader("coco", coco_tiny, "val").fingerprint()
    described = reader.describe()
    json.dumps(described)
    assert described["kind"] == "coco" and len(described["classes"]) == 81


def test_scan_files_gives_the_same_facts_on_one_thread_a_pool_or_the_probe(tmp_path: Path,
                                                                           monkeypatch):
    """The probe's choice (one thread or a pool of chunks) never changes what listing learns,
    nor its order; files missing or not images are reported the same way."""
    from tasks.data import readers

    images, others = [], []
    for k in range(readers.SCAN_PROBE + 90):  # past the probe, so the pool gets chunks
        path = tmp_path / f"{k:04d}.png"
        Image.fromarray(np.full((8 + k % 5, 9, 3), k % 256, np.uint8)).save(path)
        (images if k % 3 else others).append(str(path))
    images += [str(tmp_path / "missing.jpg")]
    (tmp_path / "notes.txt").write_text("not an image")
    images += [str(tmp_path / "notes.txt")]
    serial = readers.scan_files(images, others, threads=1)
    assert list(serial) == images + others
    assert (serial[images[0]].height, serial[images[0]].width) == (9, 9)  # k = 1: 8 + 1 rows
    assert serial[str(tmp_path / "missing.jpg")].digest == readers.MISSING
    assert serial[str(tmp_path / "notes.txt")].height is None
    expected = list(serial.items())
    assert list(readers.scan_files(images, others, threads=3).items()) == expected
    # In the page cache the probe stays on one thread; as if cold, the rest go to a pool.
    assert list(readers.scan_files(images, others).items()) == expected
    monkeypatch.setattr(readers, "_waited_on_io", lambda since: True)
    assert list(readers.scan_files(images, others).items()) == expected
