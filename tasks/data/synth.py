"""Synthetic few-shot segmentation benchmark, written in real PASCAL VOC and COCO formats.

Every class is a family: a *shape* x a *texture* x a *hue band*, each with intra-class variation
(scale, rotation, aspect ratio, shape deformation, colour jitter, texture period/phase/angle).
5 shapes x 4 textures give the 20 classes; the hue band is ``(shape + texture) % 5``, so every
band is shared by 4 classes of different shape *and* texture: no single cue separates them.

Class ids follow PASCAL-5i (fold f = ids 5f+1..5f+5); each fold holds all 5 shapes, all 4
textures and repeats a hue band::

    id fold name               hue     id fold name               hue
     1  0   plain_blob           0      11  2   checked_blob       130
     2  0   striped_star       130      12  2   dotted_star        285
     3  0   checked_box        285      13  2   plain_box          130
     4  0   dotted_triangle     55      14  2   striped_triangle   285
     5  0   plain_cross        285      15  2   checked_cross       55
     6  1   striped_blob        55      16  3   dotted_blob        210
     7  1   checked_star       210      17  3   plain_star          55
     8  1   dotted_box           0      18  3   striped_box        210
     9  1   plain_triangle     210      19  3   checked_triangle     0
    10  1   striped_cross        0      20  3   dotted_cross       130

Hue is the band centre in degrees, jittered by +-20 per object. Backgrounds are smooth noise
in random colours with stripes/grids at random angles; distractors (mottled blobs, strokes)
are background (0). Crowds (a tight group of small same-class objects) are ``iscrowd=1`` RLE in
COCO and 255 in VOC; VOC masks also carry 255 borders around every object, like VOC itself.
"""

from __future__ import annotations

import colorsys
import io
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from skimage import draw, measure
from tqdm import tqdm

from tasks import defaults
from tasks.jsonsafe import write_text

VERSION = 1
SHAPES = ("blob", "star", "box", "triangle", "cross")
TEXTURES = ("plain", "striped", "checked", "dotted")
HUE_CENTRES = (0.0, 55.0, 130.0, 210.0, 285.0)
HUE_JITTER = 20.0
SPLITS = ("train", "val")
SPEC = {
    "shapes": {
        "blob": "ellipse with random low-order radial harmonics",
        "star": "5-7 points, inner radius 0.38-0.55, per-vertex radius jitter",
        "box": "superellipse |x|^p+|y|^p=1, p in [3.5, 8] (rounded to sharp corners)",
        "triangle": "vertex angles +-0.25 rad, radii +-12 %",
        "cross": "plus sign, arm half-width 0.25-0.4, arm lengths +-15 %",
        "all": "area 4-40 % of the image, aspect ratio 0.7-1.4, any rotation",
    },
    "textures": {
        "plain": "one colour with strong shading ramp and low-frequency mottling",
        "striped": "two-tone stripes, period 10-20 % of object size, duty 0.35-0.6",
        "checked": "two-tone checkerboard, period 10-20 % of object size",
        "dotted": "dots of a second tone on a grid, spacing 12-22 % of object size",
        "all": "angle and phase random; second tone = same hue, much lighter/darker",
    },
    "colour": "HSV: hue = band centre +-20 deg, saturation 0.45-0.95, value 0.5-0.95",
}


def _class_table() -> list[dict]:
    table = []
    for k in range(20):
        fold, j = divmod(k, 5)
        t = (j + fold) % 4  # each fold sees all 4 textures and all 5 shapes
        hue = HUE_CENTRES[(j + t) % 5]
        table.append({
            "id": k + 1, "name": f"{TEXTURES[t]}_{SHAPES[j]}", "shape": SHAPES[j],
            "texture": TEXTURES[t], "hue_centre_deg": hue,
            "hue_range_deg": [hue - HUE_JITTER, hue + HUE_JITTER], "fold": fold,
        })
    return table


CLASS_TABLE = _class_table()
CLASS_NAMES: list[str] = ["background"] + [c["name"] for c in CLASS_TABLE]


def voc_palette() -> list[int]:
    """The standard PASCAL VOC colour map (flat list of 768 ints; 255 -> (224, 224, 192))."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


# ---------------------------------------------------------------- drawing primitives


def _hsv(h_deg: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb((h_deg % 360.0) / 360.0, s, v), np.float32)


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return _hsv(rng.uniform(0, 360), rng.uniform(0.05, 0.7), rng.uniform(0.2, 0.9))


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Value noise in [0, 1]: a random (cells+1)^2 lattice, smoothstep-interpolated."""
    g = rng.random((cells + 1, cells + 1)).astype(np.float32)
    x = np.linspace(0, cells, size, endpoint=False, dtype=np.float32)
    i = x.astype(np.int64)
    f = x - i
    f = f * f * (3 - 2 * f)
    fy, fx = f[:, None], f[None, :]
    top = g[i][:, i] * (1 - fx) + g[i][:, i + 1] * fx
    bot = g[i + 1][:, i] * (1 - fx) + g[i + 1][:, i + 1] * fx
    return top * (1 - fy) + bot * fy


def _rotated(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, angle: float):
    c, s = math.cos(angle), math.sin(angle)
    return (xx - cx) * c + (yy - cy) * s, -(xx - cx) * s + (yy - cy) * c


def _pattern(rng: np.random.Generator, kind: str, u: np.ndarray, v: np.ndarray, period: float):
    """Boolean two-tone pattern in rotated coordinates (u, v)."""
    ph = rng.random(2)
    if kind == "striped":
        return (u / period + ph[0]) % 1.0 < rng.uniform(0.35, 0.6)
    if kind == "checked":
        return (np.floor(u / period + ph[0]) + np.floor(v / period + ph[1])) % 2 == 0
    # dotted: period is the grid spacing
    du, dv = (u / period + ph[0]) % 1.0 - 0.5, (v / period + ph[1]) % 1.0 - 0.5
    return du * du + dv * dv < rng.uniform(0.22, 0.36) ** 2


def _shape_polygon(rng: np.random.Generator, shape: str) -> np.ndarray:
    """A randomly deformed member of a shape family: (N, 2) xy, roughly unit radius."""
    if shape == "star":
        n = int(rng.integers(5, 8))
        t = np.arange(2 * n) * math.pi / n
        r = np.where(np.arange(2 * n) % 2 == 0, 1.0, rng.uniform(0.38, 0.55))
        r = r * rng.uniform(0.9, 1.1, 2 * n)
    elif shape == "triangle":
        t = math.pi / 2 + np.arange(3) * 2 * math.pi / 3 + rng.uniform(-0.25, 0.25, 3)
        r = rng.uniform(0.88, 1.12, 3)
    elif shape == "cross":
        w, (a, b, c, d) = rng.uniform(0.25, 0.4), rng.uniform(0.85, 1.15, 4)
        return np.array([(a, -w), (a, w), (w, w), (w, b), (-w, b), (-w, w), (-c, w), (-c, -w),
                         (-w, -w), (-w, -d), (w, -d), (w, -w)], np.float64)
    else:
        t = np.linspace(0, 2 * math.pi, 72, endpoint=False)
        if shape == "box":
            p = rng.uniform(3.5, 8.0)
            ct, st = np.cos(t), np.sin(t)
            return np.stack([np.sign(ct) * np.abs(ct) ** (2 / p),
                             np.sign(st) * np.abs(st) ** (2 / p)], 1)
        r = np.ones_like(t)  # blob
        for k in (2, 3, 4, 5):
            r += rng.uniform(0, 0.3 / k) * np.cos(k * t + rng.uniform(0, 2 * math.pi))
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _poly_area(xy: np.ndarray) -> float:
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _place_shape(rng, shape: str, area_px: float, centre, size: int):
    """Random aspect/rotation, scaled to ``area_px``; returns (mask, angle, scale)."""
    xy = _shape_polygon(rng, shape)
    aspect = math.exp(rng.uniform(-0.35, 0.35))
    angle = rng.uniform(0, 2 * math.pi)
    xy = xy * [aspect, 1 / aspect]
    c, s = math.cos(angle), math.sin(angle)
    xy = xy @ np.array([[c, s], [-s, c]])
    scale = math.sqrt(area_px / abs(_poly_area(xy)))
    xy = xy * scale + centre
    mask = np.zeros((size, size), bool)
    rr, cc = draw.polygon(xy[:, 1], xy[:, 0], shape=mask.shape)
    mask[rr, cc] = True
    return mask, angle, scale


def _paint_object(rng, cls: dict, mask: np.ndarray, angle: float, scale: float, grid,
                  canvas: np.ndarray) -> None:
    """Paint one object of class ``cls`` into ``canvas`` (HxWx3 float) where ``mask`` is set."""
    ys, xs = np.nonzero(mask)
    if not len(ys):
        return
    sl = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))  # work on the bbox only
    yy, xx = grid[0][sl], grid[1][sl]
    size = mask.shape[0]
    hue = cls["hue_centre_deg"] + rng.uniform(-HUE_JITTER, HUE_JITTER)
    s, v = rng.uniform(0.45, 0.95), rng.uniform(0.5, 0.95)
    base = _hsv(hue, s, v)
    # The second tone keeps the hue, so the object's mean hue stays in its band.
    v2 = v * rng.uniform(0.3, 0.5) if v > 0.7 else min(1.0, v + rng.uniform(0.3, 0.45))
    second = _hsv(hue + rng.uniform(-8, 8), s * rng.uniform(0.6, 1.0), v2)
    cy, cx = ys.mean(), xs.mean()
    u, w = _rotated(yy, xx, cy, cx, angle + rng.uniform(-0.6, 0.6))
    if cls["texture"] == "plain":
        mottle = _smooth_noise(rng, size, max(2, size // 24))[sl][..., None]
        layer = base * (0.9 + 0.2 * mottle)
        shade_amp = 0.3
    else:
        period = rng.uniform(0.2, 0.4) * scale  # scale ~ object radius: scale-invariant texture
        period = max(period * (1.6 if cls["texture"] == "dotted" else 1.0), 3.5 * size / 144)
        layer = np.where(_pattern(rng, cls["texture"], u, w, period)[..., None], second, base)
        shade_amp = 0.15
    # A shading ramp along a random direction: objects are never flat-coloured.
    ramp, _ = _rotated(yy, xx, cy, cx, rng.uniform(0, 2 * math.pi))
    ramp = np.clip(ramp / max(scale, 1.0), -1, 1)[..., None]
    m = mask[sl]
    canvas[sl][m] = (layer * (1 + shade_amp * ramp))[m]


def _stroke(rng, grid, size: int) -> np.ndarray:
    """A thick 1-2 segment polyline (cables, sticks): background clutter."""
    yy, xx = grid
    width = rng.uniform(1.5, 4.0) * size / 144
    p = rng.uniform(0, size, 2)
    mask = np.zeros((size, size), bool)
    for _ in range(int(rng.integers(1, 3))):
        a = rng.uniform(0, 2 * math.pi)
        q = p + rng.uniform(0.2, 0.6) * size * np.array([math.cos(a), math.sin(a)])
        d = q - p
        t = np.clip(((xx - p[0]) * d[0] + (yy - p[1]) * d[1]) / float(d @ d), 0, 1)
        mask |= (xx - p[0] - t * d[0]) ** 2 + (yy - p[1] - t * d[1]) ** 2 < (width / 2) ** 2
        p = q
    return mask


def _background(rng, grid, size: int) -> np.ndarray:
    yy, xx = grid
    n = _smooth_noise(rng, size, int(rng.integers(2, 7)))[..., None]
    img = _random_colour(rng) * n + _random_colour(rng) * (1 - n)
    for _ in range(int(rng.integers(0, 3))):  # stripes or grids at random angles
        u, v = _rotated(yy, xx, 0, 0, rng.uniform(0, math.pi))
        period = rng.uniform(6, 28) * size / 144
        lines = (u / period) % 1.0 < rng.uniform(0.2, 0.5)
        if rng.random() < 0.5:
            lines |= (v / period) % 1.0 < rng.uniform(0.1, 0.3)
        alpha = rng.uniform(0.15, 0.45)
        img = np.where(lines[..., None], (1 - alpha) * img + alpha * _random_colour(rng), img)
    return img * (0.94 + 0.12 * _smooth_noise(rng, size, max(2, size // 8))[..., None])


def _has_hole(mask: np.ndarray) -> bool:
    # 4-connected background: diagonal gaps count as holes (conservative for polygon tracing).
    return measure.label(np.pad(~mask, 1, constant_values=True), connectivity=1).max() > 1


def _spoils(m: np.ndarray, inst: np.ndarray, n: int, max_cover: float) -> bool:
    """Would drawing ``m`` on top hide too much of, or punch a hole into, an earlier instance?"""
    hit = np.bincount(inst[m], minlength=n + 1)
    for j in np.flatnonzero(hit[1:]) + 1:  # only the instances that ``m`` touches
        vis = inst == j
        if hit[j] > max_cover * np.count_nonzero(vis) or _has_hole(vis & ~m):
            return True
    return False


def _mask_to_polygons(mask: np.ndarray) -> list[list[float]]:
    """COCO polygons tracing a binary mask's outer contours (COCO pixel corners at integers)."""
    polys = []
    for c in measure.find_contours(np.pad(mask, 1).astype(np.float32), 0.5):
        c = c[:-1]  # closed contour: drop the repeated point
        # Drop points on straight runs (exact, vectorised; approximate_polygon is slow).
        d0, d1 = c - np.roll(c, 1, 0), np.roll(c, -1, 0) - c
        c = c[np.abs(d0[:, 0] * d1[:, 1] - d0[:, 1] * d1[:, 0]) > 1e-9]
        xy = c[:, ::-1] - 0.5  # undo the pad (-1), pixel centre -> COCO corner (+0.5)
        if len(xy) < 3 or _poly_area(xy) <= 0:  # fragments and (oriented) hole contours
            continue
        polys.append([round(float(z), 2) for z in xy.ravel()])
    return polys


# ---------------------------------------------------------------- one image


def render_sample(seed: int, split: str, index: int, size: int):
    """Render one image from its own RNG (seed, split, index).

    Returns (rgb uint8 HxWx3, VOC label uint8 HxW, COCO annotations without ids)."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    grid = np.mgrid[0:size, 0:size].astype(np.float32)
    img_area = float(size * size)
    rgb = _background(rng, grid, size)
    for _ in range(int(rng.integers(1, 5))):  # distractors under the objects
        if rng.random() < 0.5:
            m = _stroke(rng, grid, size)
        else:
            m, *_ = _place_shape(rng, "blob", rng.uniform(0.01, 0.05) * img_area,
                                 rng.uniform(0, size, 2), size)
        n = _smooth_noise(rng, size, max(3, size // 6))[..., None]
        rgb[m] = (_random_colour(rng) * n + _random_colour(rng) * (1 - n))[m]

    # Balanced classes: the primary class cycles over all 20 (7 is coprime with 20).
    primary = 1 + (7 * index + seed + 3 * SPLITS.index(split)) % 20
    classes = [primary]
    for _ in range(int(rng.choice(4, p=[0.25, 0.35, 0.25, 0.15]))):
        same = rng.random() < 0.15  # a second instance of a class already present
        classes.append(int(rng.choice(classes)) if same else int(rng.integers(1, 21)))
    items = [(c, False) for c in classes]
    if rng.random() < 0.25:
        items.append((int(rng.integers(1, 21)), True))
    items = [items[i] for i in rng.permutation(len(items))]  # random z-order: occlusion

    inst = np.zeros((size, size), np.int32)
    records: list[tuple[int, bool]] = []
    for cls_id, crowd in items:
        cls = CLASS_TABLE[cls_id - 1]
        frac = math.exp(rng.uniform(math.log(0.04), math.log(0.4 if not records else 0.25)))
        for _ in range(12):
            if crowd:
                layer = np.zeros((size, size, 3), np.float32)  # 4-8 small objects around a centre
                m = np.zeros((size, size), bool)
                centre = rng.uniform(0.2, 0.8, 2) * size
                for _ in range(int(rng.integers(4, 9))):
                    mm, ang, sc = _place_shape(rng, cls["shape"], rng.uniform(0.004, 0.012) *
                                               img_area, centre + rng.normal(0, 0.07 * size, 2),
                                               size)
                    _paint_object(rng, cls, mm, ang, sc, grid, layer)
                    m |= mm
                ok = m.sum() > 0.01 * img_area
            else:
                centre = rng.uniform(0.15, 0.85, 2) * size
                m, ang, sc = _place_shape(rng, cls["shape"], frac * img_area, centre, size)
                ok = m.sum() > 0.75 * frac * img_area  # mostly inside the frame
            if ok and not _spoils(m, inst, len(records), 0.4):
                if crowd:
                    rgb[m] = layer[m]
                else:
                    _paint_object(rng, cls, m, ang, sc, grid, rgb)
                records.append((cls_id, crowd))
                inst[m] = len(records)
                break
            frac = max(0.03, frac * 0.85)  # crowded image: try smaller
    if records and rng.random() < 0.3:  # a stroke across the objects (label 0)
        m = _stroke(rng, grid, size)
        if not _spoils(m, inst, len(records), 0.3):
            inst[m] = 0
            rgb[m] = _random_colour(rng)

    rgb += 0.015 * rng.standard_normal(rgb.shape, dtype=np.float32)  # sensor noise
    rgb8 = (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)

    lut = np.array([0] + [255 if crowd else c for c, crowd in records], np.uint8)
    label = lut[inst]
    anns = []
    for k, (cls_id, crowd) in enumerate(records, 1):
        vis = inst == k
        if crowd:
            rle = mask_utils.encode(np.asfortranarray(vis.astype(np.uint8)))
        else:
            polys = _mask_to_polygons(vis)
            if not polys:  # nothing traceable left: ignore it in VOC too
                label[vis] = 255
                continue
            rle = mask_utils.merge(mask_utils.frPyObjects(polys, size, size))
        anns.append({
            "category_id": cls_id,
            "segmentation": ({"size": [size, size], "counts": rle["counts"].decode("utf-8")}
                             if crowd else polys),
            "area": float(mask_utils.area(rle)),
            "bbox": [round(float(z), 2) for z in mask_utils.toBbox(rle)],
            "iscrowd": int(crowd),
        })
    # VOC-style void border (~2 px at 144 px): pixels next to a different instance.
    r = max(1, round(size / 160))
    pad = np.pad(inst, r, mode="edge")
    border = np.zeros_like(label, bool)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            border |= pad[r + dy:r + dy + size, r + dx:r + dx + size] != inst
    label[border] = 255
    return rgb8, label, anns


# ---------------------------------------------------------------- the benchmark on disk


def _with_paths(summary: dict, root: Path) -> dict:
    out = dict(summary)
    out["paths"] = {k: str(root / v) for k, v in summary["files"].items()}
    out["paths"]["root"] = str(root)
    return out


def synthesize(out_dir: str | Path, *, n_train: int = defaults.SYNTH_TRAIN,
               n_val: int = defaults.SYNTH_VAL, size: int = defaults.SYNTH_SIZE,
               seed: int = defaults.SEED, progress: bool = False) -> dict:
    """Write the benchmark; return a summary dict (params, counts per split, per-class image
    counts, paths). A rerun with the same params is a no-op; other params raise ValueError."""
    for name, val, lo in (("n_train", n_train, 1), ("n_val", n_val, 1), ("size", size, 64),
                          ("seed", seed, 0)):
        if isinstance(val, bool) or not isinstance(val, int | np.integer) or val < lo:
            raise ValueError(f"synthesize: {name} must be an integer >= {lo}, got {val!r}")
    params = {"n_train": int(n_train), "n_val": int(n_val), "size": int(size),
              "seed": int(seed), "version": VERSION}
    root = Path(out_dir)
    meta, marker = root / "synth.json", root / ".synth_params.json"
    if meta.exists():
        summary = json.loads(meta.read_text())
        if summary.get("params") != params:
            raise ValueError(f"{root} holds a benchmark made with {summary.get('params')}; "
                             f"refusing to overwrite it with {params}: use another out_dir")
        return _with_paths(summary, root)
    if root.exists() and any(root.iterdir()):
        # Only an unfinished run with the same params (marker, no synth.json) may be redone.
        if not marker.exists() or json.loads(marker.read_text()) != params:
            raise ValueError(f"{root} is not empty and is not an unfinished synth run with "
                             f"params {params}: use an empty or new out_dir")
    voc, coco = root / "voc", root / "coco"
    for d in (voc / "JPEGImages", voc / "SegmentationClass", voc / "ImageSets" / "Segmentation",
              coco / "annotations", coco / "train", coco / "val"):
        d.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(params))
    palette = voc_palette()
    categories = [{"id": c["id"], "name": c["name"], "supercategory": c["shape"]}
                  for c in CLASS_TABLE]
    counts: dict = {k: {} for k in ("images", "instances", "crowd_instances",
                                    "images_with_2plus_classes", "per_class_images")}
    bar = tqdm(total=n_train + n_val, desc="synth", disable=not progress)
    for split, n in (("train", n_train), ("val", n_val)):
        ids = [f"synth_{split}_{i:06d}" for i in range(n)]
        images, anns, per_class = [], [], np.zeros(21, np.int64)
        multi = 0
        for i, img_id in enumerate(ids):
            rgb, label, img_anns = render_sample(seed, split, i, size)
            buf = io.BytesIO()
            Image.fromarray(rgb).save(buf, format="JPEG", quality=95)
            for path in (voc / "JPEGImages" / f"{img_id}.jpg", coco / split / f"{img_id}.jpg"):
                path.write_bytes(buf.getvalue())
            png = Image.frombytes("P", (size, size), label.tobytes())
            png.putpalette(palette)
            png.save(voc / "SegmentationClass" / f"{img_id}.png")
            present = np.bincount(label.ravel(), minlength=256)[1:21] > 0
            per_class[1:] += present
            multi += int(present.sum() >= 2)
            images.append({"id": i + 1, "file_name": f"{img_id}.jpg", "height": size,
                           "width": size})
            for a in img_anns:
                anns.append({"id": len(anns) + 1, "image_id": i + 1, **a})
            bar.update()
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        info = {"description": f"synthetic few-shot segmentation benchmark ({split})",
                "version": str(VERSION), "year": 2026, "contributor": "tasks.data.synth"}
        with open(coco / "annotations" / f"instances_{split}.json", "w") as f:
            json.dump({"info": info, "licenses": [], "images": images, "annotations": anns,
                       "categories": categories}, f, separators=(",", ":"))
        counts["images"][split] = n
        counts["instances"][split] = len(anns)
        counts["crowd_instances"][split] = sum(a["iscrowd"] for a in anns)
        counts["images_with_2plus_classes"][split] = multi
        counts["per_class_images"][split] = {CLASS_NAMES[c]: int(per_class[c])
                                             for c in range(1, 21)}
    bar.close()
    names = "\n".join(CLASS_NAMES) + "\n"
    (root / "classes.txt").write_text(names)
    (voc / "classes.txt").write_text(names)
    summary = {
        "params": params, "class_names": CLASS_NAMES, "classes": CLASS_TABLE, "spec": SPEC,
        "counts": counts,
        "files": {"classes": "classes.txt", "voc_root": "voc",
                  "coco_train_json": "coco/annotations/instances_train.json",
                  "coco_val_json": "coco/annotations/instances_val.json",
                  "coco_train_images": "coco/train", "coco_val_images": "coco/val"},
    }
    # synth.json appears last and whole: it marks completion
    write_text(meta, json.dumps(summary, indent=1) + "\n")
    marker.unlink()
    return _with_paths(summary, root)
