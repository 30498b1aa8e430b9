"""Protocol metrics on hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tasks.fewshot.metrics import SegmentationMeter, episode_iou, upsample_logits_to


def _box(shape: tuple[int, int], y0: int, y1: int, x0: int, x1: int, label: int = 1,
         base: np.ndarray | None = None) -> np.ndarray:
    out = np.zeros(shape, np.uint8) if base is None else base.copy()
    out[y0:y1, x0:x1] = label
    return out


def test_class_iou_is_summed_over_episodes_not_averaged() -> None:
    meter = SegmentationMeter([6, 7])
    # Episode A, class 6: a large object, prediction covers 90 of its 100 pixels.
    meter.update(_box((20, 20), 0, 10, 0, 9), _box((20, 20), 0, 10, 0, 10), [6])
    # Episode B, class 6: a small object, prediction hits 1 of 4 pixels and adds 3 wrong ones.
    meter.update(_box((20, 20), 0, 2, 1, 3), _box((20, 20), 0, 2, 0, 2), [6])
    # I = 90 + 2, U = 100 + 6 (pred 4 px, target 4 px, overlap 2).
    assert meter.per_class() == {6: pytest.approx(92 / 106)}
    assert meter.miou() == pytest.approx(92 / 106)
    per_episode_mean = (90 / 100 + 2 / 6) / 2
    assert abs(meter.miou() - per_episode_mean) > 0.2
    assert meter.n_episodes == 2
    assert 7 not in meter.per_class()  # never drawn: excluded, not counted as 0


def test_ignore_pixels_change_nothing() -> None:
    target = _box((16, 16), 4, 12, 4, 12)
    target[:, :3] = 255
    target[10:12, 10:12] = 255
    pred = _box((16, 16), 5, 12, 5, 12)
    a, b = SegmentationMeter([3]), SegmentationMeter([3])
    a.update(pred, target, [3])
    scribbled = np.where(target == 255, 1 - pred, pred).astype(np.uint8)  # flip every one
    b.update(torch.from_numpy(scribbled), torch.from_numpy(target), [3])
    assert (a.intersection, a.union) == (b.intersection, b.union)
    assert a.fbiou() == b.fbiou() and a.miou() == b.miou()


def test_fbiou_by_hand() -> None:
    # 4x4 image, 2 pixels ignored. Target fg: top row (4 px). Pred fg: top-left 2x2 (4 px).
    target = np.zeros((4, 4), np.uint8)
    target[0] = 1
    target[3, 2:] = 255
    pred = _box((4, 4), 0, 2, 0, 2)
    meter = SegmentationMeter([1])
    meter.update(pred, target, [1])
    # 14 valid px. fg: I = 2 (0,0),(0,1); U = 4 + 4 - 2 = 6.
    # bg: target bg valid = 14 - 4 = 10, pred bg valid = 14 - 4 = 10, I = 14 - 6 = 8, U = 12.
    assert meter.fbiou() == pytest.approx((2 / 6 + 8 / 12) / 2)
    assert meter.miou() == pytest.approx(2 / 6)


def test_two_way_episodes_accumulate_into_absolute_classes() -> None:
    target = _box((10, 10), 0, 5, 0, 5, label=1)
    target = _box((10, 10), 5, 10, 5, 10, label=2, base=target)  # 25 px each
    pred = _box((10, 10), 0, 5, 0, 4, label=1)  # 20 px inside label 1
    pred = _box((10, 10), 5, 10, 0, 10, label=2, base=pred)  # 50 px over label 2's 25
    meter = SegmentationMeter([11, 12, 13, 14, 15])
    meter.update(pred, target, [14, 12])  # episode label 1 is class 14, label 2 is class 12
    assert meter.per_class() == {14: pytest.approx(20 / 25), 12: pytest.approx(25 / 50)}
    meter.update(target, target, [12, 14])  # swapped order: label 1 is now class 12
    assert meter.per_class() == {14: pytest.approx(45 / 50), 12: pytest.approx(50 / 75)}
    assert meter.class_episodes.tolist() == [0, 2, 0, 2, 0]
    assert meter.miou() == pytest.approx((45 / 50 + 50 / 75) / 2)
    with pytest.raises(ValueError, match="not among this meter's classes"):
        meter.update(pred, target, [1, 12])


def test_merge_equals_one_meter() -> None:
    rng = np.random.default_rng(0)
    classes = [1, 2, 3, 4, 5]
    episodes = []
    for _ in range(12):
        target = rng.integers(0, 3, (24, 24)).astype(np.uint8)
        target[rng.random((24, 24)) < 0.1] = 255
        pred = rng.integers(0, 3, (24, 24)).astype(np.uint8)
        episodes.append((pred, target, list(rng.choice(classes, 2, replace=False))))
    whole = SegmentationMeter(classes)
    parts = [SegmentationMeter(classes) for _ in range(3)]
    for k, ep in enumerate(episodes):
        whole.update(*ep)
        parts[k % 3].update(*ep)
    merged = SegmentationMeter(classes)
    for p in parts:
        merged.merge(p)
    assert merged.summary() == whole.summary()
    assert merged.n_episodes == 12 and merged.per_class() == whole.per_class()
    with pytest.raises(ValueError, match="different classes"):
        merged.merge(SegmentationMeter([1, 2]))


def test_empty_meter_and_shape_errors() -> None:
    meter = SegmentationMeter([1, 2])
    assert np.isnan(meter.miou()) and np.isnan(meter.fbiou())
    with pytest.raises(ValueError, match="upsample the logits"):
        meter.update(np.zeros((4, 4)), np.zeros((8, 8)), [1])


def test_episode_iou() -> None:
    target = _box((8, 8), 0, 4, 0, 4)
    assert episode_iou(_box((8, 8), 0, 4, 0, 2), target, 1) == pytest.approx(0.5)
    assert episode_iou(target, target, 2) == 1.0  # label 2 absent from both: left out


def test_upsample_logits_to() -> None:
    logits = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    up = upsample_logits_to(logits, (10, 7))
    assert up.shape == (2, 3, 10, 7)
    ref = torch.nn.functional.interpolate(logits, size=(10, 7), mode="bilinear",
                                          align_corners=False)
    torch.testing.assert_close(up, ref)
    assert upsample_logits_to(logits, (4, 4)) is logits
    # A constant map stays constant: no corner alignment artefacts.
    flat = upsample_logits_to(torch.ones(1, 2, 3, 5), (7, 11))
    torch.testing.assert_close(flat, torch.ones(1, 2, 7, 11))
    with pytest.raises(ValueError, match=r"\(B, C, h, w\)"):
        upsample_logits_to(logits[0], (8, 8))
