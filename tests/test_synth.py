"""Tests for the synthetic VOC/COCO benchmark generator (tasks/data/synth.py)."""

from __future__ import annotations

import colorsys
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from tasks.data import synth
from tasks.data.synth import CLASS_NAMES, CLASS_TABLE, VERSION, synthesize, voc_palette

PARAMS = {"n_train": 24, "n_val": 12, "size": 112, "seed": 3}
# pycocotools' decode trips a numpy 2 deprecation warning that is not ours


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synth")
    return root, synthesize(root, **PARAMS)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _voc(root: Path, split: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    ids = (root / "voc/ImageSets/Segmentation" / f"{split}.txt").read_text().split()
    return {i: (np.array(Image.open(root / "voc/JPEGImages" / f"{i}.jpg")),
                np.array(Image.open(root / "voc/SegmentationClass" / f"{i}.png"))) for i in ids}


# ---------------------------------------------------------------- API, determinism, reruns


def test_class_names_and_table() -> None:
    assert len(CLASS_NAMES) == 21 and CLASS_NAMES[0] == "background"
    assert len(set(CLASS_NAMES)) == 21
    for fold in range(4):  # PASCAL-5i folds mix shapes and textures
        members = [c for c in CLASS_TABLE if c["fold"] == fold]
        assert [c["id"] for c in members] == list(range(5 * fold + 1, 5 * fold + 6))
        assert len({c["shape"] for c in members}) == 5
        assert len({c["texture"] for c in members}) >= 3
    # no single cue separates: every hue band, shape and texture is shared by several classes
    for key in ("hue_centre_deg", "shape", "texture"):
        values = [c[key] for c in CLASS_TABLE]
        assert all(values.count(v) >= 4 for v in values)


def test_docstring_class_table_is_current() -> None:
    rows = re.findall(r"^ +(\d+) +(\d) +(\w+) +(\d+) +(\d+) +(\d) +(\w+) +(\d+)$",
                      synth.__doc__, re.M)
    documented = {}
    for r in rows:
        for i, f, name, hue in (r[:4], r[4:]):
            documented[int(i)] = (int(f), name, float(hue))
    assert documented == {c["id"]: (c["fold"], c["name"], c["hue_centre_deg"])
                          for c in CLASS_TABLE}


def test_deterministic(bench, tmp_path) -> None:
    root, summary = bench
    again = synthesize(tmp_path / "b", **PARAMS)
    assert _files(root) == _files(tmp_path / "b")
    assert {k: v for k, v in again.items() if k != "paths"} == {
        k: v for k, v in summary.items() if k != "paths"}


def test_rerun_is_noop(bench) -> None:
    root, summary = bench
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert synthesize(root, **PARAMS) == summary
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before


def test_param_clash_and_foreign_dir(bench, tmp_path) -> None:
    root, _ = bench
    with pytest.raises(ValueError, match="refusing"):
        synthesize(root, **{**PARAMS, "seed": 4})
    (tmp_path / "other.txt").write_text("not a benchmark")
    with pytest.raises(ValueError, match="not empty"):
        synthesize(tmp_path, n_train=2, n_val=2, size=64)


def test_unfinished_run_is_redone(bench, tmp_path) -> None:
    root, _ = bench
    crashed = tmp_path / "crashed"
    synthesize(crashed, **PARAMS)
    (crashed / "synth.json").unlink()  # as if it died before finishing
    (crashed / ".synth_params.json").write_text(json.dumps({**PARAMS, "version": VERSION}))
    (crashed / "voc/JPEGImages/synth_train_000001.jpg").write_bytes(b"torn")
    synthesize(crashed, **PARAMS)
    assert _files(crashed) == _files(root)


@pytest.mark.parametrize("bad", [{"size": 32}, {"n_train": 0}, {"n_val": -1}, {"seed": -1},
                                 {"size": 100.5}, {"n_train": True}])
def test_bad_arguments(tmp_path, bad) -> None:
    with pytest.raises(ValueError):
        synthesize(tmp_path, **{**PARAMS, **bad})
    assert not any(tmp_path.iterdir())  # nothing written


# ---------------------------------------------------------------- VOC layout


def test_voc_layout(bench) -> None:
    root, summary = bench
    assert (root / "classes.txt").read_text().splitlines() == CLASS_NAMES
    assert (root / "voc/classes.txt").read_text() == (root / "classes.txt").read_text()
    for split, n in (("train", PARAMS["n_train"]), ("val", PARAMS["n_val"])):
        ids = (root / "voc/ImageSets/Segmentation" / f"{split}.txt").read_text().split()
        assert len(ids) == n == summary["counts"]["images"][split]
        assert ids[0] == f"synth_{split}_000000"
    all_ids = sorted((root / "voc/ImageSets/Segmentation/train.txt").read_text().split()
                     + (root / "voc/ImageSets/Segmentation/val.txt").read_text().split())
    assert sorted(p.stem for p in (root / "voc/JPEGImages").iterdir()) == all_ids
    assert sorted(p.stem for p in (root / "voc/SegmentationClass").iterdir()) == all_ids
    for i in all_ids:
        png = Image.open(root / "voc/SegmentationClass" / f"{i}.png")
        jpg = Image.open(root / "voc/JPEGImages" / f"{i}.jpg")
        assert png.mode == "P" and jpg.mode == "RGB"
        assert png.getpalette()[:768] == voc_palette()
        assert png.size == jpg.size == (PARAMS["size"], PARAMS["size"])
        assert set(np.unique(np.array(png)).tolist()) <= set(range(21)) | {255}


def test_voc_ignore_borders(bench) -> None:
    """Like VOC, two different labels never touch: a 255 band separates them."""
    root, _ = bench
    for _, label in _voc(root, "train").values():
        for a, b in ((label[1:], label[:-1]), (label[:, 1:], label[:, :-1])):
            touch = (a != b) & (a != 255) & (b != 255)
            assert not touch.any()
        assert (label == 255).any()


# ---------------------------------------------------------------- COCO layout


@pytest.mark.parametrize("split", ["train", "val"])
def test_coco_matches_voc(bench, split) -> None:
    root, _ = bench
    coco = COCO(str(root / "coco/annotations" / f"instances_{split}.json"))
    assert sorted(coco.getCatIds()) == list(range(1, 21))
    assert [coco.cats[i]["name"] for i in range(1, 21)] == CLASS_NAMES[1:]
    voc = _voc(root, split)
    assert len(coco.imgs) == len(voc)
    n_crowd = 0
    for img in coco.imgs.values():
        stem = Path(img["file_name"]).stem
        assert (root / "coco" / split / img["file_name"]).read_bytes() == (
            root / "voc/JPEGImages" / img["file_name"]).read_bytes()
        label = voc[stem][1]
        assert (img["height"], img["width"]) == label.shape
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"], iscrowd=None))
        for a in anns:
            x, y, w, h = a["bbox"]
            assert a["area"] > 0 and x >= 0 and y >= 0 and x + w <= img["width"] + 1e-6
            if a["iscrowd"]:
                n_crowd += 1
                assert isinstance(a["segmentation"]["counts"], str)  # compressed RLE
                assert (label[coco.annToMask(a) > 0] == 255).all()  # crowd = ignore in VOC
            else:
                assert all(len(p) >= 6 and len(p) % 2 == 0 for p in a["segmentation"])
        for c in set(np.unique(label).tolist()) - {0, 255}:
            union = np.zeros(label.shape, bool)
            for a in anns:
                if a["category_id"] == c and not a["iscrowd"]:
                    union |= coco.annToMask(a) > 0
            voc_c = label == c
            assert (union & voc_c).sum() >= 0.95 * voc_c.sum(), (stem, c)
            # and the polygons do not spill over other labelled pixels
            other = (label != c) & (label != 255)
            assert (union & other).sum() <= 0.05 * voc_c.sum(), (stem, c)
    assert n_crowd > 0 or split == "val"


# ---------------------------------------------------------------- content


def test_content(bench) -> None:
    root, summary = bench
    present = [set(np.unique(lab).tolist()) - {0, 255} for _, lab in _voc(root, "train").values()]
    assert set().union(*present) == set(range(1, 21))
    assert sum(len(p) >= 2 for p in present) >= 0.3 * len(present)
    counts = summary["counts"]
    assert counts["crowd_instances"]["train"] > 0
    assert sum(counts["per_class_images"]["train"].values()) == sum(len(p) for p in present)
    # objects of varied size: some small, some large (visible area, fraction of the image)
    fracs = [np.mean(lab == c) for _, lab in _voc(root, "train").values()
             for c in set(np.unique(lab).tolist()) - {0, 255}]
    assert min(fracs) < 0.06 and max(fracs) > 0.2


def test_colour_alone_is_ambiguous(bench) -> None:
    """Mean object hue ranges of classes with different shapes overlap."""
    root, _ = bench
    hues: dict[int, list[float]] = {}
    for split in ("train", "val"):
        for rgb, lab in _voc(root, split).values():
            for c in set(np.unique(lab).tolist()) - {0, 255}:
                r, g, b = rgb[lab == c].mean(0) / 255
                h = colorsys.rgb_to_hsv(r, g, b)[0] * 360
                # cut the circle at 320 deg, between the magenta and red bands
                hues.setdefault(c, []).append((h + 40) % 360 - 40)
    ranges = {c: (min(v), max(v)) for c, v in hues.items()}
    overlapping = [(a, b) for a in ranges for b in ranges if a < b
                   and CLASS_TABLE[a - 1]["shape"] != CLASS_TABLE[b - 1]["shape"]
                   and ranges[a][0] <= ranges[b][1] and ranges[b][0] <= ranges[a][1]]
    assert len(overlapping) >= 5


def test_every_class_in_both_splits(tmp_path) -> None:
    summary = synthesize(tmp_path, n_train=200, n_val=200, size=64, seed=1)
    for split in ("train", "val"):
        per_class = summary["counts"]["per_class_images"][split]
        assert len(per_class) == 20 and min(per_class.values()) >= 8, per_class
    assert os.path.isfile(summary["paths"]["coco_val_json"])
