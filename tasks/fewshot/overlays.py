"""Qualitative grids: what a person looks at before trusting a number.

One row per episode: each support with its mask, the query, the prediction and the ground
truth, masks blended over the image in one colour per episode class (the same colour for the
same episode label in every column) with a solid outline, ignore pixels (255) in light grey.
Captions name the support's class, the prediction's episode IoU and the ground-truth classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from models.conventions import IGNORE_INDEX
from tasks.fewshot.episodes import Episode
from tasks.fewshot.metrics import episode_iou

# Episode label j+1 -> colour; saturated and far apart so that 5-way episodes stay readable.
PALETTE = np.array([
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (145, 30, 180),
    (245, 130, 48), (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128),
], np.uint8)
IGNORE_COLOUR = np.array((220, 220, 220), np.uint8)
ALPHA = 0.55  # mask opacity: strong enough to read, weak enough to see the object underneath
MUTE = 0.6  # how far the image under a mask is pulled towards grey
OUTLINE = 2  # outline width in display pixels
PAD = 4  # pixels between tiles and around the grid
CAPTION = 14  # caption band under each tile (default font is ~11 px high)
HEADER = 18  # column titles above the first row
BG = (255, 255, 255)
TEXT = (20, 20, 20)
SWATCH = 9  # colour square before a class name in captions
Colour = tuple[int, int, int]


def label_colour(label: int) -> Colour:
    """Display colour of episode label ``label`` (1-based)."""
    r, g, b = PALETTE[(label - 1) % len(PALETTE)]
    return int(r), int(g), int(b)


def overlay(image: np.ndarray, mask: np.ndarray, tile: int) -> Image.Image:
    """``image`` (H, W, 3) resized to ``tile`` px with ``mask`` (any size, episode labels)
    blended on top: label k>0 in its colour with a solid outline, 255 in light grey.

    The image under the mask is muted towards grey first: objects are often saturated
    themselves and would otherwise swallow a mask of a similar hue.
    """
    rgb = np.asarray(Image.fromarray(image).resize((tile, tile), Image.Resampling.BILINEAR))
    m = np.asarray(Image.fromarray(mask.astype(np.uint8)).resize((tile, tile),
                                                                 Image.Resampling.NEAREST))
    colours = np.zeros((256, 3), np.float32)
    colours[1:IGNORE_INDEX] = PALETTE[np.arange(IGNORE_INDEX - 1) % len(PALETTE)]
    colours[IGNORE_INDEX] = IGNORE_COLOUR
    grey = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    out = MUTE * grey[..., None] + (1 - MUTE) * rgb
    shown = m > 0
    out[shown] = (1 - ALPHA) * out[shown] + ALPHA * colours[m[shown]]
    # Outline: labelled pixels within OUTLINE px of another label; solid so thin parts show.
    edge = np.zeros_like(shown)
    pad = np.pad(m, OUTLINE, mode="edge")
    for d in range(1, OUTLINE + 1):
        for dy, dx in ((d, 0), (-d, 0), (0, d), (0, -d)):
            edge |= pad[OUTLINE + dy:OUTLINE + dy + tile, OUTLINE + dx:OUTLINE + dx + tile] != m
    edge &= shown & (m != IGNORE_INDEX)
    out[edge] = colours[m[edge]]
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8))


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int, font: ImageFont.ImageFont) -> str:
    """``text`` shortened with '…' to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _caption(draw: ImageDraw.ImageDraw, parts: Sequence[tuple[str, Colour | None]], x: int,
             y: int, width: int, font: ImageFont.ImageFont) -> None:
    """Caption parts side by side in ``width`` px; a part with a colour gets a swatch (text
    stays dark: light colours such as yellow are unreadable as text on white)."""
    room = width // max(len(parts), 1)
    for text, colour in parts:
        left = x
        if colour is not None:
            draw.rectangle((x, y + 2, x + SWATCH - 1, y + 1 + SWATCH), fill=colour)
            left += SWATCH + 2
        draw.text((left, y), _fit(draw, text, room - (left - x) - 4, font), fill=TEXT,
                  font=font)
        x += room


def grid_size(n_rows: int, n_cols: int, tile: int) -> tuple[int, int]:
    """(width, height) in pixels of a grid of ``n_rows`` episodes by ``n_cols`` tiles."""
    return (PAD + n_cols * (tile + PAD), HEADER + n_rows * (tile + CAPTION + PAD) + PAD)


def render_grid(episodes: Sequence[Episode], predictions: Sequence[np.ndarray], path: str | Path,
                *, class_names: Sequence[str], max_rows: int = 8, tile: int = 160) -> Path:
    """Write a PNG of the first ``max_rows`` episodes and their predictions; returns its path.

    ``predictions`` are (h, w) episode labels, at canonical or original size (resized for
    display; the caption's IoU is computed against the label of the same size).
    ``class_names`` is indexed by absolute class id (``dataset.classes``).
    """
    if len(predictions) < min(len(episodes), max_rows):
        raise ValueError(f"{len(episodes)} episodes but {len(predictions)} predictions")
    rows = list(zip(episodes, predictions, strict=False))[:max_rows]
    if not rows:
        raise ValueError("render_grid needs at least one episode")
    n_sup = max(len(e.support_ids) for e, _ in rows)
    width, height = grid_size(len(rows), n_sup + 3, tile)
    canvas = Image.new("RGB", (width, height), BG)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()

    def x_of(col: int) -> int:
        return PAD + col * (tile + PAD)

    titles = [f"support {k + 1}" for k in range(n_sup)] + ["query", "prediction",
                                                             "ground truth (grey: ignore)"]
    for col, title in enumerate(titles):
        draw.text((x_of(col), 3), _fit(draw, title, tile, font), fill=TEXT, font=font)

    for r, (ep, pred) in enumerate(rows):
        y = HEADER + r * (tile + CAPTION + PAD)
        pred = np.asarray(pred)
        names = [class_names[c] for c in ep.classes]
        cells: list[tuple[Image.Image | None, list[tuple[str, Colour | None]]]] = []
        for k in range(len(ep.support_ids)):
            j = k // ep.shots
            cells.append((overlay(ep.support_images[k], ep.support_masks[k], tile),
                          [(names[j], label_colour(j + 1))]))
        cells += [(None, []) for _ in range(n_sup - len(ep.support_ids))]
        if pred.shape not in (ep.query_mask.shape, ep.query_original_mask.shape):
            raise ValueError(f"prediction of episode {r} is {pred.shape}; expected the "
                             f"canonical {ep.query_mask.shape} or original "
                             f"{ep.query_original_mask.shape} label size")
        truth = ep.query_original_mask if pred.shape == ep.query_original_mask.shape \
            else ep.query_mask
        iou = episode_iou(pred, truth, len(ep.classes))
        cells += [
            (Image.fromarray(ep.query_image).resize((tile, tile), Image.Resampling.BILINEAR),
             [(str(ep.query_id), None)]),
            (overlay(ep.query_image, pred, tile), [(f"IoU {iou:.2f}", None)]),
            (overlay(ep.query_image, ep.query_mask, tile),
             [(n, label_colour(j + 1)) for j, n in enumerate(names)]),
        ]
        for col, (img, caption) in enumerate(cells):
            if img is not None:
                canvas.paste(img, (x_of(col), y))
                _caption(draw, caption, x_of(col), y + tile + 2, tile, font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return path
