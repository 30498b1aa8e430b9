"""Qualitative grids: size, and colours exactly where the masks are."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.fewshot.episodes import Episode
from tasks.fewshot.overlays import (
    ALPHA,
    CAPTION,
    HEADER,
    IGNORE_COLOUR,
    PAD,
    grid_size,
    label_colour,
    render_grid,
)

S = 32  # canonical size; rendered with tile=S so that tile pixels map 1:1 to mask pixels
NAMES = ["background"] + [f"class_{k}" for k in range(1, 21)]


def _episode() -> Episode:
    """A 2-way 1-shot episode on black images: supports hold one square each, the query holds
    both classes and an ignore band."""
    black = np.zeros((S, S, 3), np.uint8)
    s0, s1 = np.zeros((S, S), np.uint8), np.zeros((S, S), np.uint8)
    s0[4:14, 4:14] = 1
    s1[18:30, 18:30] = 2
    query = np.zeros((S, S), np.uint8)
    query[2:12, 2:12] = 1
    query[16:28, 16:28] = 2
    query[:, 30:] = 255
    return Episode(classes=[7, 3], support_ids=["a", "b"], query_id="q",
                   support_images=np.stack([black, black]), support_masks=np.stack([s0, s1]),
                   query_image=black, query_mask=query, query_original_mask=query.copy())


def _tile(img: np.ndarray, row: int, col: int) -> np.ndarray:
    y = HEADER + row * (S + CAPTION + PAD)
    x = PAD + col * (S + PAD)
    return img[y:y + S, x:x + S]


def _blend(colour) -> np.ndarray:
    # Black image: the muted image is black too, so a mask interior is ALPHA * its colour.
    return np.round(ALPHA * np.asarray(colour, np.float32)).astype(np.uint8)


def test_grid_size_and_colours_where_masks_are(tmp_path: Path) -> None:
    ep = _episode()
    pred = np.zeros((S, S), np.uint8)
    pred[2:12, 2:12] = 2  # wrong label on class 1's object, to see the colour follow labels
    out = render_grid([ep, ep], [pred, ep.query_mask], tmp_path / "sub" / "grid.png",
                      class_names=NAMES, tile=S)
    img = np.asarray(Image.open(out).convert("RGB"))
    assert out.exists() and Image.open(out).format == "PNG"
    assert (img.shape[1], img.shape[0]) == grid_size(2, 2 + 3, S)
    red, green = _blend(label_colour(1)), _blend(label_colour(2))
    # support 1: class label 1 inside its square (interior, away from the outline), black outside
    sup0, sup1 = _tile(img, 0, 0), _tile(img, 0, 1)
    assert (sup0[6:12, 6:12] == red).all() and (sup0[20:, 20:] == 0).all()
    assert (sup0[4, 4:14] == label_colour(1)).all()  # solid outline in the class colour
    assert (sup1[20:28, 20:28] == green).all() and (sup1[6:12, 6:12] == 0).all()
    # query column: the plain image, no overlay
    assert (_tile(img, 0, 2) == 0).all()
    # prediction: label 2 colour where the prediction says 2; ground truth: both + ignore grey
    assert (_tile(img, 0, 3)[4:10, 4:10] == green).all()
    gt = _tile(img, 0, 4)
    assert (gt[4:10, 4:10] == red).all() and (gt[18:26, 18:26] == green).all()
    assert (gt[:, 30:] == _blend(IGNORE_COLOUR)).all() and (gt[14, 2:12] == 0).all()
    # second row: a perfect prediction looks like the ground truth
    np.testing.assert_array_equal(_tile(img, 1, 3), _tile(img, 1, 4))


def test_max_rows_tile_size_and_errors(tmp_path: Path) -> None:
    ep = _episode()
    out = render_grid([ep] * 10, [ep.query_mask] * 10, tmp_path / "g.png", class_names=NAMES,
                      max_rows=3)
    assert Image.open(out).size == grid_size(3, 5, 160)
    # A prediction at the label's original size is accepted; any other size is not.
    big = _episode()
    big.query_original_mask = np.zeros((50, 40), np.uint8)
    render_grid([big], [np.zeros((50, 40), np.uint8)], tmp_path / "o.png", class_names=NAMES)
    with pytest.raises(ValueError, match="expected the canonical"):
        render_grid([ep], [np.zeros((5, 5), np.uint8)], tmp_path / "x.png", class_names=NAMES)
    with pytest.raises(ValueError, match="predictions"):
        render_grid([ep, ep], [ep.query_mask], tmp_path / "x.png", class_names=NAMES)
