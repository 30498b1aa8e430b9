"""Write a small street-scene dataset in its own layout, for README "Bring your own dataset".

    python docs/byod/make_streets.py --out data/streets

Layout: ``{split}/images/{stem}.jpg`` and ``{split}/labels/{stem}.png`` (8-bit grayscale label
values), as many public street-scene datasets ship: label values 0..10 are 11 real classes
(none of them a background) and 11 is void ("not annotated": here the ego vehicle's bonnet at
the bottom of every frame). ``--unlabelled`` extra training images have no label file.
``docs/byod/streets.yaml`` describes it. Deterministic from ``--seed``; numpy and Pillow only.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["sky", "building", "road", "sidewalk", "vegetation", "car", "pedestrian", "pole",
           "sign", "bicycle", "terrain"]
VOID = 11
SKY, BUILDING, ROAD, SIDEWALK, VEGETATION, CAR, PEDESTRIAN, POLE, SIGN, BICYCLE, TERRAIN = range(11)
# Mean colours (Cityscapes' palette) and texture strength per label value, void last.
COLOURS = np.array([[70, 130, 180], [70, 70, 70], [128, 64, 128], [244, 35, 232],
                    [107, 142, 35], [0, 0, 142], [220, 20, 60], [153, 153, 153],
                    [220, 220, 0], [119, 11, 32], [152, 251, 152], [20, 20, 20]], np.int64)
TEXTURE = np.array([6, 18, 10, 12, 30, 14, 20, 8, 8, 20, 24, 4])


def scene(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Label values of one frame: sky, a building skyline, sidewalk and road bands, then
    objects (cars on the road, pedestrians and poles on the sidewalk, trees, grass), void."""
    lab = np.full((height, width), BUILDING, np.uint8)
    horizon = int(height * rng.uniform(0.15, 0.3))
    x = 0
    while x < width:  # buildings of different heights
        w = int(rng.integers(width // 8, width // 3))
        lab[: horizon + int(rng.integers(-horizon // 2, horizon // 2 + 1)), x:x + w] = SKY
        x += w
    road = int(height * rng.uniform(0.6, 0.7))
    walk = road - int(rng.integers(height // 14, height // 8))
    lab[walk:road] = SIDEWALK
    lab[road:] = ROAD
    if rng.random() < 0.5:  # a tree
        cy, cx = int(rng.integers(horizon, walk)), int(rng.integers(0, width))
        r = int(rng.integers(height // 10, height // 6))
        yy, xx = np.ogrid[:height, :width]
        lab[((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & (yy < walk)] = VEGETATION
    if rng.random() < 0.4:  # grass at a corner of the road
        w = int(rng.integers(width // 6, width // 3))
        x = 0 if rng.random() < 0.5 else width - w
        lab[road:road + height // 8, x:x + w] = TERRAIN
    for _ in range(int(rng.integers(0, 3))):  # poles, some with a sign
        x, h = int(rng.integers(0, width - 3)), int(rng.integers(height // 3, height // 2))
        lab[road - h:road, x:x + 2] = POLE
        if rng.random() < 0.6:
            s = int(rng.integers(6, 10))
            lab[road - h:road - h + s, max(0, x - s // 2):x + s // 2 + 2] = SIGN
    for _ in range(int(rng.integers(0, 3))):  # pedestrians on the sidewalk
        h, w = int(rng.integers(height // 4, height // 3)), int(rng.integers(6, 10))
        x = int(rng.integers(0, width - w))
        foot = int(rng.integers(walk, road + 1))
        lab[foot - h:foot, x:x + w] = PEDESTRIAN
        lab[foot - h:foot - h + w // 2 + 1, x + 1:x + w - 1] = PEDESTRIAN  # a head
    if rng.random() < 0.3:  # a bicycle
        h, w = int(rng.integers(height // 8, height // 5)), int(rng.integers(14, 22))
        x, foot = int(rng.integers(0, width - w)), int(rng.integers(walk + 2, road + 3))
        lab[foot - h:foot, x:x + w] = BICYCLE
    for _ in range(int(rng.integers(0, 3))):  # cars on the road, nearer ones larger
        foot = int(rng.integers(road + 4, height - height // 12))
        scale = (foot - road) / (height - road)
        h = int(height * (0.12 + 0.2 * scale))
        w = int(h * rng.uniform(1.5, 2.2))
        x = int(rng.integers(-w // 3, width - 2 * w // 3))
        lab[foot - h:foot, max(0, x):x + w] = CAR
        lab[foot - h - h // 3:foot - h, max(0, x + w // 5):x + 4 * w // 5] = CAR  # the cabin
    lab[height - max(2, height // 16):] = VOID  # the ego vehicle's bonnet: not annotated
    return lab


def render(lab: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An RGB frame for the labels: class colour, per-class texture, a random exposure."""
    noise = rng.normal(size=lab.shape + (3,)) * TEXTURE[lab][..., None]
    light = rng.uniform(0.75, 1.2)
    return np.clip(COLOURS[lab] * light + noise, 0, 255).astype(np.uint8)


def write(out: Path, *, n_train: int, n_unlabelled: int, n_test: int, height: int, width: int,
          seed: int) -> dict[str, int]:
    rng = np.random.default_rng(seed)
    counts = {}
    for split, n, bare in (("train", n_train, n_unlabelled), ("test", n_test, 0)):
        (out / split / "images").mkdir(parents=True, exist_ok=True)
        (out / split / "labels").mkdir(parents=True, exist_ok=True)
        for k in range(n + bare):
            stem = f"{split}_{k:04d}"
            lab = scene(rng, height, width)
            Image.fromarray(render(lab, rng)).save(out / split / "images" / f"{stem}.jpg",
                                                   quality=92)
            if k < n:  # the last `bare` frames were never annotated
                Image.fromarray(lab).save(out / split / "labels" / f"{stem}.png")
        counts[split] = n + bare
    return counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="data/streets", help="output folder (default: %(default)s)")
    p.add_argument("--train", type=int, default=60, help="annotated training frames")
    p.add_argument("--unlabelled", type=int, default=5, help="training frames without labels")
    p.add_argument("--test", type=int, default=20, help="annotated test frames")
    p.add_argument("--height", type=int, default=72)
    p.add_argument("--width", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    counts = write(Path(a.out), n_train=a.train, n_unlabelled=a.unlabelled, n_test=a.test,
                   height=a.height, width=a.width, seed=a.seed)
    print(f"street scenes in {a.out}: " + ", ".join(f"{s} {n}" for s, n in counts.items())
          + f" ({a.unlabelled} train frames without labels), {a.width}x{a.height} px")


if __name__ == "__main__":
    main()
