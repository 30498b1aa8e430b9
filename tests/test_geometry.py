"""Geometry at ingest: EXIF orientation of layout datasets, and resize "pad" (aspect kept,
padding ignored) beside "square", checked pixel by pixel, down to scoring at original size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from tasks.data import ingest, store
from tasks.fewshot.episodes import EpisodeSampler
from tasks.fewshot.metrics import upsample_logits_to

CLASSES = ["road", "car", "tree"]  # label values 0..2, no background class; 9 is void
VOID = 9
EXIF_ORIENTATION = 0x0112


def _labels(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Road, a car block and a tree block: regions large enough to survive a 4x shrink."""
    labels = np.zeros((height, width), np.uint8)
    y, x = int(rng.integers(0, height // 2)), int(rng.integers(0, width // 2))
    labels[y:y + height // 2, x:x + width // 2] = 1
    labels[: height // 4, -(width // 4):] = 2
    labels[-2:, :3] = VOID
    return labels


def _image(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    colours = np.array([[128, 64, 128], [0, 0, 142], [107, 142, 35]] + [[0, 0, 0]] * 7,
                       np.int64)
    noise = rng.integers(-25, 26, (*labels.shape, 3))
    return np.clip(colours[labels] + noise, 0, 255).astype(np.uint8)


def _save_png(array: np.ndarray, path: Path, orientation: int = 1) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    if orientation != 1:
        exif[EXIF_ORIENTATION] = orientation
    Image.fromarray(array).save(path, exif=exif)


def _layout(root: Path, **keys) -> Path:
    path = root / "layout.yaml"
    base = {"images": "{split}/images/{stem}.png", "masks": "{split}/labels/{stem}.png",
            "splits": ["train", "val"], "classes": CLASSES, "background": None,
            "ignore": [VOID]}
    path.write_text(yaml.safe_dump(base | keys, sort_keys=False))
    return path


def _store_labels(labels: np.ndarray) -> np.ndarray:
    """Label values -> store ids of a layout without a background class."""
    return np.where(labels == VOID, 255, labels + 1).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# resize "pad"


def test_pad_pair_keeps_the_aspect_and_pads_image_0_and_mask_255() -> None:
    rng = np.random.default_rng(0)
    labels = _labels(rng, 48, 64)
    image = _image(labels, rng)
    img, mask, box = ingest.pad_pair(image, labels, 32)
    assert box == (0, 0, 24, 32)  # the longest side becomes 32, the other 48 * 32 / 64
    expected_img = np.asarray(Image.fromarray(image).resize((32, 24), Image.Resampling.BILINEAR))
    expected_mask = np.asarray(Image.fromarray(labels).resize((32, 24),
                                                              Image.Resampling.NEAREST))
    np.testing.assert_array_equal(img[:24], expected_img)
    np.testing.assert_array_equal(mask[:24], expected_mask)
    assert (img[24:] == 0).all() and (mask[24:] == 255).all()
    # Portrait: padding on the right; odd sizes round, and a sliver keeps at least 1 px.
    img, mask, box = ingest.pad_pair(image.transpose(1, 0, 2), labels.T, 32)
    assert box == (0, 0, 32, 24) and (img[:, 24:] == 0).all() and (mask[:, 24:] == 255).all()
    assert ingest.content_box(100, 33, 32) == (0, 0, 32, 11)  # 10.56 rounds to 11
    assert ingest.content_box(1000, 3, 32) == (0, 0, 32, 1)
    with pytest.raises(ValueError, match="resize must be one of square, pad"):
        ingest.plan_ingest([], "x", resize="letterbox")


@pytest.fixture(scope="module")
def streets(tmp_path_factory: pytest.TempPathFactory):
    """6 train + 4 val landscape (48x64) images, and one portrait (64x48) in val, ingested at
    32 px twice: resize "square" and resize "pad"."""
    root = tmp_path_factory.mktemp("pad-streets")
    rng = np.random.default_rng(1)
    truth = {}
    for split, n in (("train", 6), ("val", 5)):
        for k in range(n):
            stem = f"{split}{k}"
            shape = (64, 48) if stem == "val4" else (48, 64)
            truth[stem] = labels = _labels(rng, *shape)
            _save_png(_image(labels, rng), root / split / "images" / f"{stem}.png")
            _save_png(labels, root / split / "labels" / f"{stem}.png")
    layout = _layout(root)
    url = str(tmp_path_factory.mktemp("pad-store") / "s.zarr")
    summaries = {mode: ingest.ingest_dataset("layout", str(layout), url, mode, size=32,
                                             shard_size=4, resize=mode)
                 for mode in ("square", "pad")}
    return root, url, truth, summaries


def test_pad_ingest_stores_boxes_and_keeps_original_masks(streets) -> None:
    root, url, truth, summaries = streets
    assert all(s["complete"] and s["quarantined"] == 0 for s in summaries.values())
    sq, pad = store.open_dataset(url, "square"), store.open_dataset(url, "pad")
    assert "resize" not in sq.params and pad.params["resize"] == "pad"  # square ids unchanged
    assert sq.version != pad.version and (sq.resize, pad.resize) == ("square", "pad")
    for stem, labels in truth.items():
        # Scoring at original size reads the same labels, whatever the canonical geometry.
        np.testing.assert_array_equal(pad.original_mask(stem), _store_labels(labels))
        np.testing.assert_array_equal(sq.original_mask(stem), _store_labels(labels))
        assert sq.box(stem) == (0, 0, 32, 32)
        portrait = stem == "val4"
        assert pad.box(stem) == ((0, 0, 32, 24) if portrait else (0, 0, 24, 32))
        image = np.asarray(Image.open(root / stem[:-1] / "images" / f"{stem}.png"))
        img, mask, box = ingest.pad_pair(image, _store_labels(labels), 32)
        np.testing.assert_array_equal(pad.image(stem), img)
        np.testing.assert_array_equal(pad.mask(stem), mask)
        _, _, h, w = box
        assert (pad.mask(stem)[h:] == 255).all() and (pad.mask(stem)[:, w:] == 255).all()
        assert (pad.image(stem)[h:] == 0).all() and (pad.image(stem)[:, w:] == 0).all()
        np.testing.assert_array_equal(sq.image(stem), ingest.resize_pair(image, labels, 32)[0])
    info = store.inspect_store(url)["datasets"]
    assert info["pad"][pad.version]["resize"] == "pad"
    assert info["square"][sq.version]["resize"] == "square"


def test_scoring_at_original_size_crops_the_padding_before_upsampling(streets) -> None:
    """Logits that are exactly the canonical labels score (almost) perfectly at original size
    once cropped to the query's box; stretched with their padding they do not."""
    _, url, _, _ = streets
    pad = store.open_dataset(url, "pad")
    sampler = EpisodeSampler(pad, split="val", classes=[2], ways=1, shots=1, min_pixels=40)
    seen = set()
    for i in range(12):
        ep = sampler.episode(i)
        seen.add(ep.query_id)
        assert ep.query_box == pad.box(ep.query_id)
        # One-hot logits of the canonical query mask; the padding (255) votes background.
        canon = torch.from_numpy(np.where(ep.query_mask == 255, 0, ep.query_mask)).long()
        logits = F.one_hot(canon, 2).permute(2, 0, 1)[None].float()
        target = ep.query_original_mask
        valid = target != 255
        cropped = upsample_logits_to(logits, target.shape, box=ep.query_box).argmax(1)[0]
        stretched = upsample_logits_to(logits, target.shape).argmax(1)[0]
        hit = (cropped.numpy() == target)[valid].mean()
        assert hit > 0.95  # only boundaries of a 2x shrink and back
        assert (stretched.numpy() == target)[valid].mean() < hit - 0.05
        top, left, h, w = ep.query_box
        expected = F.interpolate(logits[..., top:top + h, left:left + w], size=target.shape,
                                 mode="bilinear", align_corners=False)
        torch.testing.assert_close(upsample_logits_to(logits, target.shape, ep.query_box),
                                   expected)
    assert "val4" in seen or len(seen) > 1
    full = torch.randn(1, 2, 32, 32)
    torch.testing.assert_close(upsample_logits_to(full, (48, 64), (0, 0, 32, 32)),
                               upsample_logits_to(full, (48, 64)))
    with pytest.raises(ValueError, match="not inside"):
        upsample_logits_to(full, (48, 64), (0, 0, 33, 32))


# --------------------------------------------------------------------------------------------
# EXIF orientation


# What a viewer does to the stored pixels for each orientation tag (EXIF 2.3, tag 0x0112),
# written with numpy so the test does not restate Pillow's table.
VIEWED = {
    1: lambda a: a,
    3: lambda a: np.rot90(a, 2),
    6: lambda a: np.rot90(a, -1),  # rotate 90° clockwise
    8: lambda a: np.rot90(a, 1),  # rotate 90° counter-clockwise
    5: lambda a: np.rot90(a[:, ::-1], 1),  # mirror, then 90° counter-clockwise
}


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory):
    """Landscape photos (stored 64 wide x 48 high), some with an orientation tag; masks drawn
    on the image as a viewer shows it, except ``stored6``'s (drawn on the stored pixels)."""
    root = tmp_path_factory.mktemp("exif")
    rng = np.random.default_rng(2)
    truth = {}
    for split, plan in (("train", [("plain", 1), ("turned6", 6), ("turned8", 8),
                                   ("turned3", 3), ("mirror5", 5), ("stored6", 6)]),
                        ("val", [("val0", 1), ("val6", 6)])):
        for stem, orientation in plan:
            stored_labels = _labels(rng, 48, 64)
            image = _image(stored_labels, rng)
            _save_png(image, root / split / "images" / f"{stem}.png", orientation)
            viewed = VIEWED[orientation]
            mask = stored_labels if stem == "stored6" else np.ascontiguousarray(
                viewed(stored_labels))
            _save_png(mask, root / split / "labels" / f"{stem}.png")
            truth[stem] = (np.ascontiguousarray(viewed(image)), image, mask)
    return root, truth


def test_exif_orientation_is_applied_and_a_mask_of_the_stored_grid_is_quarantined(
        photos, tmp_path: Path) -> None:
    root, truth = photos
    url = str(tmp_path / "s.zarr")
    summary = ingest.ingest_dataset("layout", str(_layout(root)), url, "photos", size=32)
    assert summary["ingested"] == 7 and summary["quarantined"] == 1
    ds = store.open_dataset(url, "photos")
    for stem, (viewed, _, mask) in truth.items():
        if stem == "stored6":
            continue
        h, w = mask.shape
        row = ds.index.set_index("id").loc[stem]
        assert (row["height"], row["width"]) == (h, w)  # the size as the image is viewed
        np.testing.assert_array_equal(ds.original_mask(stem), _store_labels(mask))
        np.testing.assert_array_equal(ds.image(stem), ingest.resize_pair(viewed, mask, 32)[0])
    (reason,) = ds.quarantine["reason"]
    assert ds.quarantine["id"].tolist() == ["stored6"]
    assert reason.startswith(f"{root / 'train/labels/stored6.png'}: mask 64x48 fits the image "
                             "as stored, but the image's EXIF orientation 6 (rotated 90° "
                             "clockwise) shows it as 48x64")
    assert "orientation: stored in layout.yaml" in reason


def test_orientation_stored_ignores_the_tag(photos, tmp_path: Path) -> None:
    root, truth = photos
    layout = _layout(root, orientation="stored")
    url = str(tmp_path / "s.zarr")
    summary = ingest.ingest_dataset("layout", str(layout), url, "photos", size=32)
    ds = store.open_dataset(url, "photos")
    # Masks of the viewed, turned grid (90°) no longer fit; 180°, mirror and plain ones do (as
    # the stored pixels: the tool said to have worked on those).
    bad = dict(zip(ds.quarantine["id"], ds.quarantine["reason"], strict=True))
    assert sorted(bad) == ["mirror5", "turned6", "turned8", "val6"]
    assert bad["turned6"].endswith("mask 48x64 != image 64x48")
    assert summary["ingested"] == 4
    _, stored, mask = truth["stored6"]
    np.testing.assert_array_equal(ds.image("stored6"), ingest.resize_pair(stored, mask, 32)[0])
    np.testing.assert_array_equal(ds.original_mask("stored6"), _store_labels(mask))
    _, stored, mask = truth["turned3"]  # the tag ignored: pixels as stored
    np.testing.assert_array_equal(ds.image("turned3"), ingest.resize_pair(stored, mask, 32)[0])
    assert store.open_dataset(url, "photos").fingerprint != store.open_dataset(
        *_ingested_default(root, tmp_path)).fingerprint  # what a label means is in the version


def _ingested_default(root: Path, tmp_path: Path) -> tuple[str, str]:
    url = str(tmp_path / "default.zarr")
    ingest.ingest_dataset("layout", str(_layout(root)), url, "photos", size=32)
    return url, "photos"


def test_unlabelled_images_are_turned_too(photos, tmp_path: Path) -> None:
    root, truth = photos
    layout = _layout(root, masks="{split}/none/{stem}.png", unlabelled=True)
    url = str(tmp_path / "s.zarr")
    summary = ingest.ingest_dataset("layout", str(layout), url, "photos", size=32,
                                    resize="pad")
    assert summary["ingested"] == 8 and summary["unlabelled"] == 8
    ds = store.open_dataset(url, "photos")
    viewed = truth["turned6"][0]  # 48 wide x 64 high as viewed: padded on the right
    assert ds.box("turned6") == (0, 0, 32, 24)
    img, _, _ = ingest.pad_pair(viewed, np.zeros(viewed.shape[:2], np.uint8), 32)
    np.testing.assert_array_equal(ds.image("turned6"), img)
    assert (ds.original_mask("turned6") == 255).all() and ds.original_mask("turned6").shape == (
        64, 48)


def test_evaluate_scores_a_padded_dataset_like_a_stretched_one(streets) -> None:
    """A parameter-free colour model scores the same images about equally whether they were
    stretched or padded, once evaluation crops the padding before upsampling."""
    from models.baselines import ColourHistogram
    from tasks.fewshot.training import evaluate

    _, url, _, _ = streets
    miou = {}
    for mode in ("square", "pad"):
        ds = store.open_dataset(url, mode)
        sampler = EpisodeSampler(ds, split="val", classes=[2, 3], min_pixels=40, seed=5)
        miou[mode] = evaluate(ColourHistogram(), sampler, episodes=24, class_names=ds.classes,
                              device=torch.device("cpu")).miou
    assert miou["square"] > 0.3
    assert abs(miou["pad"] - miou["square"]) < 0.05, miou
