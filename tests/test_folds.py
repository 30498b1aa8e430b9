"""Fold definitions: known values, disjointness, coverage, argument checks."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.data.folds import base_classes, coco_20i, fold_classes, pascal_5i
from tasks.data.readers import VOC_CLASSES


def test_pascal_5i_known_values():
    assert pascal_5i(0) == [1, 2, 3, 4, 5]
    assert [VOC_CLASSES[c] for c in pascal_5i(0)] == [
        "aeroplane", "bicycle", "bird", "boat", "bottle",
    ]  # fmt: skip
    assert [VOC_CLASSES[c] for c in pascal_5i(1)][::4] == ["bus", "cow"]
    assert [VOC_CLASSES[c] for c in pascal_5i(2)][::4] == ["diningtable", "person"]
    assert [VOC_CLASSES[c] for c in pascal_5i(3)][::4] == ["pottedplant", "tvmonitor"]
    for fold in range(4):
        assert fold_classes(20, fold) == pascal_5i(fold)


def test_coco_20i_known_values():
    assert coco_20i(0) == list(range(1, 78, 4))
    assert coco_20i(0)[:3] == [1, 5, 9] and coco_20i(0)[-1] == 77
    assert coco_20i(3)[:2] == [4, 8] and coco_20i(3)[-1] == 80
    assert coco_20i(1, "consecutive") == list(range(21, 41))
    for fold in range(4):
        assert fold_classes(80, fold) == coco_20i(fold)
        assert fold_classes(80, fold, variant="consecutive") == coco_20i(fold, "consecutive")


@pytest.mark.parametrize(
    "num_classes, n_folds, variant",
    [(20, 4, "auto"), (80, 4, "auto"), (80, 4, "consecutive"), (20, 4, "interleaved"),
     (12, 3, "auto"), (10, 2, "interleaved"), (6, 6, "auto")],
)  # fmt: skip
def test_folds_partition_the_classes(num_classes: int, n_folds: int, variant: str):
    folds = [fold_classes(num_classes, f, n_folds, variant) for f in range(n_folds)]
    flat = sorted(c for fold in folds for c in fold)
    assert flat == list(range(1, num_classes + 1))  # disjoint and covering
    assert {len(fold) for fold in folds} == {num_classes // n_folds}
    for f, test in enumerate(folds):
        base = base_classes(num_classes, f, n_folds, variant)
        assert not set(base) & set(test)
        assert sorted(base + test) == list(range(1, num_classes + 1))


def test_custom_class_count_uses_consecutive_blocks():
    assert fold_classes(12, 1, n_folds=3) == [5, 6, 7, 8]
    assert base_classes(12, 1, n_folds=3) == [1, 2, 3, 4, 9, 10, 11, 12]
    assert fold_classes(np.int64(20), np.int64(2)) == pascal_5i(2)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: pascal_5i(4), "fold must be in 0..3"),
        (lambda: pascal_5i(-1), "fold must be in 0..3"),
        (lambda: pascal_5i(1.0), "fold must be an integer"),
        (lambda: pascal_5i(True), "fold must be an integer"),
        (lambda: coco_20i(0, "random"), "variant"),
        (lambda: coco_20i(5), "fold must be in 0..3"),
        (lambda: fold_classes(3, 0), "cannot be split"),
        (lambda: fold_classes(20, 0, n_folds=1), "n_folds must be at least 2"),
        (lambda: fold_classes(20, 5, n_folds=5), "fold must be in 0..4"),
        (lambda: fold_classes(20, 0, variant="pascal"), "variant must be one of"),
        (lambda: base_classes("20", 0), "num_classes must be an integer"),
    ],
)
def test_bad_arguments(call, message: str):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("variant", ["consecutive", "interleaved"])
@pytest.mark.parametrize("num_classes, n_folds", [(11, 4), (21, 4), (7, 3), (5, 5)])
def test_uneven_class_counts_make_a_partition(num_classes: int, n_folds: int, variant: str):
    folds = [fold_classes(num_classes, f, n_folds, variant) for f in range(n_folds)]
    assert sorted(c for f in folds for c in f) == list(range(1, num_classes + 1))
    sizes = [len(f) for f in folds]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    if variant == "consecutive":  # the larger folds come first
        assert sizes == sorted(sizes, reverse=True)
    assert fold_classes(11, 0, 4, "consecutive") == [1, 2, 3]
    assert fold_classes(11, 3, 4, "consecutive") == [10, 11]
