"""Store layout, ingest of shards, resume, rerun and bad input, without Prefect."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.data import ingest, store
from tasks.data.readers import DatasetError, make_reader


def _plan(root: Path, source: str = "voc", **kw):
    sub = root / source if (root / source).is_dir() else root
    readers = [make_reader(source, sub, s) for s in kw.pop("splits", ["train", "val"])]
    return ingest.plan_ingest(readers, kw.pop("name", "ds"), **kw)


def _run(plan, url: str, shards=None) -> list[ingest.ShardReport]:
    store.create_dataset(url, plan.spec)
    todo = range(plan.spec.n_shards) if shards is None else shards
    return ingest.ingest_shards(url, plan.spec.name, plan.spec.version, todo,
                                [plan.shard_items(k) for k in todo], plan.readers,
                                plan.spec.size, plan.resize)


def _checksums(url: str, name: str, version: str) -> dict[str, str]:
    root = Path(url) / "datasets" / name / version
    out = {}
    for f in sorted(root.rglob("*")):
        if f.is_file() and f.name != "zarr.json":
            out[str(f.relative_to(root))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def test_round_trip(synth_root: Path, tmp_path: Path) -> None:
    plan = _plan(synth_root, size=64, shard_size=16)
    url = str(tmp_path / "s.zarr")
    _run(plan, url)
    summary = store.finalize_dataset(url, "ds", plan.spec.version)
    assert summary == {"listed": 56, "ingested": 56, "quarantined": 0, "pending": 0,
                       "shards": 4, "shards_done": 4, "complete": True}
    ds = store.open_dataset(url, "ds")
    assert ds.ids == [i.id for i in plan.items]
    assert len(ds.split_ids("train")) == 40 and len(ds.split_ids("val")) == 16
    assert ds.classes == plan.readers["train"].classes
    for item in plan.items[::7]:
        image, mask = plan.readers[item.split].load(item)
        small_image, small_mask = ingest.resize_pair(image, mask, 64)
        np.testing.assert_array_equal(ds.image(item.id), small_image)
        np.testing.assert_array_equal(ds.mask(item.id), small_mask)
        np.testing.assert_array_equal(ds.original_mask(item.id), mask)
        counts = np.bincount(mask.ravel(), minlength=256)[: len(ds.classes)]
        np.testing.assert_array_equal(ds.pixels(item.id), counts)
    assert ds.image(ds.ids[0]).shape == (64, 64, 3) and ds.mask(ds.ids[0]).dtype == np.uint8


def test_rerun_is_noop_and_resume_matches_clean_run(synth_root: Path, tmp_path: Path) -> None:
    plan = _plan(synth_root, size=64, shard_size=16)
    clean, crashed = str(tmp_path / "clean.zarr"), str(tmp_path / "crashed.zarr")
    _run(plan, clean)
    reference = _checksums(clean, "ds", plan.spec.version)

    mtimes = {p: os.stat(p).st_mtime_ns for p in Path(clean).rglob("*") if p.is_file()}
    assert all(r.skipped for r in _run(plan, clean))
    assert mtimes == {p: os.stat(p).st_mtime_ns for p in Path(clean).rglob("*") if p.is_file()}

    # A crash: two shards finished, a third wrote its arrays but died before its done flag.
    _run(plan, crashed, shards=[0, 2])
    results = [ingest.load_item(plan.readers[i.split], i, 64) for i in plan.shard_items(1)]
    store.write_shard(crashed, "ds", plan.spec.version, 1, results)
    flags = store._root(crashed)[f"datasets/ds/{plan.spec.version}/shard_done"]
    flags[1] = 0
    assert store.done_shards(crashed, "ds", plan.spec.version) == {0, 2}
    assert store.finalize_dataset(crashed, "ds", plan.spec.version)["complete"] is False
    with pytest.raises(store.StoreError, match="no completed version"):
        store.open_dataset(crashed, "ds")
    reports = _run(plan, crashed)
    assert [r.skipped for r in reports] == [True, False, True, False]
    assert _checksums(crashed, "ds", plan.spec.version) == reference


def test_changed_parameter_makes_new_version(synth_root: Path, tmp_path: Path) -> None:
    url = str(tmp_path / "s.zarr")
    a, b = _plan(synth_root, size=64, shard_size=32), _plan(synth_root, size=48, shard_size=32)
    assert a.spec.version != b.spec.version
    assert _plan(synth_root, size=64, shard_size=32).spec.version == a.spec.version
    for plan in (a, b):
        _run(plan, url)
        store.finalize_dataset(url, "ds", plan.spec.version)
    assert store.open_dataset(url, "ds").size == 48
    assert store.open_dataset(url, "ds", a.spec.version).size == 64
    info = store.inspect_store(url)["datasets"]["ds"]
    assert set(info) == {a.spec.version, b.spec.version} and info[b.spec.version]["latest"]


@pytest.mark.parametrize("name", ["../evil", "a/b", "", ".hidden", "x" * 200])
def test_invalid_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="invalid dataset name"):
        store.validate_name(name)


def _voc_with_bad_items(root: Path) -> dict[str, str]:
    """A VOC-layout folder with four good items and one of each bad case."""
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    rng = np.random.default_rng(0)

    def write(stem: str, size=(40, 30), labels=(0, 1), mask_size=None) -> None:
        img = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(img).save(root / "JPEGImages" / f"{stem}.jpg", quality=90)
        ms = mask_size or size
        mask = rng.choice(np.array(labels, np.uint8), (ms[1], ms[0]))
        png = root / "SegmentationClass" / f"{stem}.png"
        Image.fromarray(mask).convert("P").save(png)

    for k in range(4):
        write(f"good{k}")
    write("truncated")
    data = (root / "JPEGImages" / "truncated.jpg").read_bytes()
    (root / "JPEGImages" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    write("badsize", mask_size=(20, 30))
    write("badlabel", labels=(0, 1, 42))
    write("nomask")
    (root / "SegmentationClass" / "nomask.png").unlink()
    stems = ["good0", "truncated", "good1", "badsize", "badlabel", "missing", "nomask",
             "good2", "good3"]
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(stems) + "\n")
    # stem -> what its quarantine reason must say
    return {"truncated": "truncated", "badsize": "mask 20x30 != image 40x30",
            "badlabel": "unknown label ids [42]", "missing": "image file missing",
            "nomask": "nomask.png: mask file missing"}


def test_bad_items_are_quarantined_and_counts_reconcile(tmp_path: Path) -> None:
    bad = _voc_with_bad_items(tmp_path / "voc")
    readers = [make_reader("voc", tmp_path / "voc", "train")]
    plan = ingest.plan_ingest(readers, "bad", size=32, shard_size=4)
    url = str(tmp_path / "s.zarr")
    reports = _run(plan, url)
    summary = store.finalize_dataset(url, "bad", plan.spec.version)
    assert summary["ingested"] == 4 and summary["quarantined"] == 5
    assert summary["ingested"] + summary["quarantined"] == summary["listed"] == 9
    ds = store.open_dataset(url, "bad")
    assert ds.ids == ["good0", "good1", "good2", "good3"]
    q = ds.quarantine.set_index("id")
    assert sorted(q.index) == sorted(bad)
    for stem, needle in bad.items():
        assert q.at[stem, "source_path"].endswith(f"{stem}.jpg")
        assert needle in q.at[stem, "reason"], stem
    reported = [b["path"] for r in reports for b in r.quarantined]
    assert len(reported) == 5
    info = store.inspect_store(url)["datasets"]["bad"][plan.spec.version]
    assert len(info["quarantine"]) == 5 and info["listed"] == 9


def test_malformed_coco_annotation_is_quarantined(tmp_path: Path) -> None:
    import json

    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "train").mkdir()
    images, anns = [], []
    for k in range(3):
        Image.fromarray(np.full((20, 30, 3), 40 * k, np.uint8)).save(root / "train" / f"{k}.jpg")
        images.append({"id": k + 1, "file_name": f"{k}.jpg", "height": 20, "width": 30})
        anns.append({"id": 10 + k, "image_id": k + 1, "category_id": 1, "iscrowd": 0,
                     "area": 50.0, "bbox": [2, 2, 10, 5],
                     "segmentation": [[2, 2, 12, 2, 12, 7, 2, 7]]})
    anns[1]["segmentation"] = [[2, 2, 12]]  # a polygon needs at least 3 points
    (root / "annotations" / "instances_train.json").write_text(json.dumps(
        {"images": images, "annotations": anns,
         "categories": [{"id": 1, "name": "thing", "supercategory": "x"}]}))
    plan = ingest.plan_ingest([make_reader("coco", root, "train")], "c", size=16, shard_size=8)
    url = str(tmp_path / "s.zarr")
    _run(plan, url)
    summary = store.finalize_dataset(url, "c", plan.spec.version)
    assert (summary["ingested"], summary["quarantined"]) == (2, 1)
    q = store.open_dataset(url, "c").quarantine
    assert q["id"].tolist() == ["2"]
    assert "11" in q.at[0, "reason"]  # names the faulty annotation id


def test_wrong_root_stops_at_once(tmp_path: Path) -> None:
    with pytest.raises(DatasetError):
        ingest.plan_ingest([make_reader("voc", tmp_path / "nowhere", "train")], "x")
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_train.json").write_text("{not json")
    with pytest.raises(DatasetError):
        ingest.plan_ingest([make_reader("coco", tmp_path, "train")], "x")


def test_shard_cache_is_bounded(synth_root: Path, tmp_path: Path) -> None:
    plan = _plan(synth_root, size=32, shard_size=8)
    url = str(tmp_path / "s.zarr")
    _run(plan, url)
    store.finalize_dataset(url, "ds", plan.spec.version)
    one_shard = 8 * 32 * 32 * 3
    ds = store.open_dataset(url, "ds", cache_bytes=2 * one_shard)
    for image_id in ds.ids:
        ds.image(image_id)
    assert 0 < ds._reader._cache._bytes <= 2 * one_shard
