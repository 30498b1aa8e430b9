"""Few-shot fold definitions: which (contiguous, 1-based) class ids each fold tests.

PASCAL-5i: fold i tests 5i+1..5i+5. COCO-20i exists in two assignments in the literature: the
interleaved one (fold i tests i+1, i+5, ..., i+77; the default, as in PFENet/HSNet) and the
consecutive one (fold i tests 20i+1..20i+20). The base (training) classes of a fold are the
others. Any class count works: consecutive folds of an uneven count differ in size by one (the
first ``num_classes % n_folds`` folds hold one class more, as ``numpy.array_split`` does), and
interleaved fold i holds i+1, i+1+n_folds, ...
"""

from __future__ import annotations

import operator

VARIANTS = ("auto", "interleaved", "consecutive")


def _int(name: str, value: object) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _fold(fold: object, n_folds: int) -> int:
    fold = _int("fold", fold)
    if not 0 <= fold < n_folds:
        raise ValueError(f"fold must be in 0..{n_folds - 1}, got {fold}")
    return fold


def pascal_5i(fold: int) -> list[int]:
    """PASCAL-5i test classes of ``fold`` (0..3): 5i+1..5i+5."""
    fold = _fold(fold, 4)
    return list(range(5 * fold + 1, 5 * fold + 6))


def coco_20i(fold: int, variant: str = "interleaved") -> list[int]:
    """COCO-20i test classes of ``fold`` (0..3) in the ``interleaved`` or ``consecutive`` split."""
    fold = _fold(fold, 4)
    if variant == "interleaved":
        return list(range(fold + 1, 81, 4))
    if variant == "consecutive":
        return list(range(20 * fold + 1, 20 * fold + 21))
    raise ValueError(f"COCO-20i variant must be 'interleaved' or 'consecutive', got {variant!r}")


def fold_classes(num_classes: int, fold: int, n_folds: int = 4, variant: str = "auto") -> list[int]:
    """Test classes of ``fold`` among classes 1..num_classes split into ``n_folds`` folds.

    ``auto`` picks PASCAL-5i for 20 classes and interleaved COCO-20i for 80 (with 4 folds),
    consecutive blocks otherwise. A count that ``n_folds`` does not divide gives folds whose
    sizes differ by one (the first ``num_classes % n_folds`` folds are the larger ones).
    """
    num_classes = _int("num_classes", num_classes)
    n_folds = _int("n_folds", n_folds)
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if n_folds < 2:
        raise ValueError(f"n_folds must be at least 2 (a fold needs base classes), got {n_folds}")
    if num_classes < n_folds:
        raise ValueError(f"{num_classes} classes cannot be split into {n_folds} folds: every "
                         "fold needs a class (lower n_folds, or name novel_classes)")
    fold = _fold(fold, n_folds)
    if variant == "auto":
        # PASCAL-5i is the consecutive split of 20 classes, so only COCO needs a special case.
        variant = "interleaved" if (num_classes, n_folds) == (80, 4) else "consecutive"
    if variant == "interleaved":
        return list(range(fold + 1, num_classes + 1, n_folds))
    size, extra = divmod(num_classes, n_folds)
    start = fold * size + min(fold, extra)
    return list(range(start + 1, start + size + (fold < extra) + 1))


def base_classes(num_classes: int, fold: int, n_folds: int = 4, variant: str = "auto") -> list[int]:
    """Training (base) classes of ``fold``: 1..num_classes minus :func:`fold_classes`."""
    test = set(fold_classes(num_classes, fold, n_folds, variant))
    return [c for c in range(1, num_classes + 1) if c not in test]
