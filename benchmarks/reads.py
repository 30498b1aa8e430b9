"""Cold random episode reads from the store vs per-episode PIL loading, side by side.

    .venv/bin/python benchmarks/reads.py [--episodes 300] [--repeats 3] [--cases 144,417]

For each case it writes VOC-layout sources, ingests them into a fresh store folder made for
this run (serial shard function: the bytes the flow writes), and reads the same random 1-way
1-shot episodes (2 images + 2 masks, fixed seed) with every variant, interleaved, --repeats
times (tables show medians):

- PIL per episode: open the JPEG and the PNG and resize both, at every episode (HSNet-style);
- store, cold: a fresh `open_dataset` with no cache (cache_bytes=0), so every read goes to
  storage: local folder, and the same store through fsspec (a file:// URL);
- store, warm: the default cache, second pass over the same episodes;
- zarr-python: each row as ``array[i:i + 1]`` (what one read costs through zarr-python);
- previous reader: whole shards read through zarr-python into an LRU (the store's reader
  before this benchmark), from an empty cache;
- tensorstore (only if it is installed): ``array[i].read()`` on the same store.

Cases: "144": the synthetic benchmark's 144-px squares stored at 144 px; "417": VOC-like
500x375 JPEGs (the synthetic scenes upscaled, with sensor-like grain so that they compress
like photos) stored at 417 px. The OS page cache cannot be dropped without root: "cold" means
a store written by this run and never read through the process's caches before.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from tables import table  # a sibling module: the benchmarks run as scripts

from tasks.data import ingest, store
from tasks.data.readers import make_reader
from tasks.data.synth import render_sample, voc_palette

NAME = "reads"
GOAL, FLOOR = 5.0, 3.0


def write_sources(root: Path, n: int, width: int, height: int, seed: int) -> Path:
    """n VOC-layout items (JPEG quality 90, palette PNG) of width x height, made once."""
    listing = root / "ImageSets" / "Segmentation" / "train.txt"
    if listing.exists() and len(listing.read_text().split()) == n:
        return root
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    palette = voc_palette()
    stems = []
    for i in range(n):
        rgb, label, _ = render_sample(seed, "train", i, 144)
        image = Image.fromarray(rgb)
        mask = Image.frombytes("P", (144, 144), label.tobytes())
        if (width, height) != (144, 144):
            image = image.resize((width, height), Image.Resampling.BICUBIC)
            grain = rng.normal(0, 6, (height, width, 3))
            image = Image.fromarray(np.clip(np.asarray(image) + grain, 0, 255).astype(np.uint8))
            mask = mask.resize((width, height), Image.Resampling.NEAREST)
        stem = f"img_{i:06d}"
        image.save(root / "JPEGImages" / f"{stem}.jpg", quality=90)
        mask.putpalette(palette)
        mask.save(root / "SegmentationClass" / f"{stem}.png")
        stems.append(stem)
    listing.write_text("\n".join(stems) + "\n")
    return root


def ingest_store(voc: Path, url: str, size: int, shard_size: int) -> tuple[str, float]:
    """A fresh store of the sources (the flow's shard function, one shard after another)."""
    shutil.rmtree(url, ignore_errors=True)
    t0 = time.perf_counter()
    plan = ingest.plan_ingest([make_reader("voc", voc, "train")], NAME, size=size,
                              shard_size=shard_size)
    assert ingest.ingest_plan(plan, url)["complete"]
    return plan.spec.version, time.perf_counter() - t0


class PreviousReader:
    """The store's reader before: whole shards through zarr-python, kept in an LRU."""

    def __init__(self, url: str, version: str, max_bytes: int = 1 << 30):
        import zarr

        self.group = zarr.open_group(url, mode="r")[f"{store.DATASETS}/{NAME}/{version}"]
        self.rows = int(self.group.attrs["shard_size"])
        self.max_bytes, self.bytes = max_bytes, 0
        self.blocks: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self.arrays: dict[str, object] = {}

    def read(self, key: str, row: int) -> np.ndarray:
        shard, offset = divmod(row, self.rows)
        block = self.blocks.get((key, shard))
        if block is None:
            array = self.arrays.setdefault(key, self.group[key])
            block = array[shard * self.rows:(shard + 1) * self.rows]
            self.blocks[(key, shard)] = block
            self.bytes += block.nbytes
            while self.bytes > self.max_bytes and len(self.blocks) > 1:
                self.bytes -= self.blocks.popitem(last=False)[1].nbytes
        return block[offset].copy()


def tensorstore_reader(url: str, version: str) -> Callable[[str, int], np.ndarray] | None:
    try:
        import tensorstore as ts
    except ImportError:
        return None
    context = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
    arrays = {key: ts.open({"driver": "zarr3", "kvstore": {
        "driver": "file", "path": f"{url}/{store.DATASETS}/{NAME}/{version}/{key}"}},
        read=True, context=context).result() for key in ("images", "masks")}
    return lambda key, row: arrays[key][row].read().result()


def run_case(label: str, voc: Path, size: int, args: argparse.Namespace) -> dict[str, float]:
    url = str(args.workdir / f"store-{label}.zarr")
    version, ingest_s = ingest_store(voc, url, size, args.shard_size)
    items = {i.id: i for i in ingest.plan_ingest([make_reader("voc", voc, "train")], NAME,
                                                 size=size, shard_size=args.shard_size).items}
    ids = store.open_dataset(url, NAME, version).ids
    rng = np.random.default_rng(args.seed)
    episodes = [[ids[j] for j in rng.choice(len(ids), 2, replace=False)]
                for _ in range(args.episodes)]

    def pil(image_id: str) -> None:
        item = items[image_id]
        with Image.open(item.image_path) as im:
            np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
        with Image.open(str(item.label)) as m:
            np.asarray(m.resize((size, size), Image.Resampling.NEAREST))

    def dataset_pair(ds: store.Dataset) -> Callable[[str], object]:
        return lambda image_id: (ds.image(image_id), ds.mask(image_id))

    def rows_pair(read: Callable[[str, int], np.ndarray], ds: store.Dataset
                  ) -> Callable[[str], object]:
        return lambda image_id: (read("images", ds.row(image_id)),
                                 read("masks", ds.row(image_id)))

    def episodes_per_s(read: Callable[[str], object]) -> float:
        t0 = time.perf_counter()
        for episode in episodes:
            for image_id in episode:
                read(image_id)
        return len(episodes) / (time.perf_counter() - t0)

    def zarr_rows() -> Callable[[str, int], np.ndarray]:
        import zarr

        g = zarr.open_group(url, mode="r")[f"{store.DATASETS}/{NAME}/{version}"]
        arrays = {k: g[k] for k in ("images", "masks")}
        return lambda key, row: arrays[key][row:row + 1][0]

    index_ds = store.open_dataset(url, NAME, version)
    variants: dict[str, Callable[[], Callable[[str], object]]] = {
        "store, cold, local folder": lambda: dataset_pair(
            store.open_dataset(url, NAME, version, cache_bytes=0)),
        "store, cold, fsspec file:// URL": lambda: dataset_pair(
            store.open_dataset(f"file://{Path(url).resolve()}", NAME, version,
                               cache_bytes=0)),
        "zarr-python, array[i:i+1] per row": lambda: rows_pair(zarr_rows(), index_ds),
        "previous reader: whole shards, empty LRU": lambda: rows_pair(
            PreviousReader(url, version).read, index_ds),
    }
    if tensorstore_reader(url, version) is not None:
        variants["tensorstore 0.1, array[i].read() per row"] = lambda: rows_pair(
            tensorstore_reader(url, version), index_ds)
    res: dict[str, list[float]] = {"PIL per episode (decode + resize)": [],
                                   **{k: [] for k in variants}, "store, warm (cache filled)": []}
    opens: list[float] = []
    for _ in range(args.repeats):  # interleaved: each repeat runs every variant once
        res["PIL per episode (decode + resize)"].append(episodes_per_s(pil))
        for name, make in variants.items():
            t0 = time.perf_counter()
            reader = make()  # a fresh opening: no row, index or metadata cached from before
            if name == "store, cold, local folder":
                opens.append(time.perf_counter() - t0)
            res[name].append(episodes_per_s(reader))
        warm = store.open_dataset(url, NAME, version)
        episodes_per_s(dataset_pair(warm))
        res["store, warm (cache filled)"].append(episodes_per_s(dataset_pair(warm)))
    med = {k: statistics.median(v) for k, v in res.items()}
    base = med["PIL per episode (decode + resize)"]
    src = next(iter(items.values()))
    with Image.open(src.image_path) as im:
        src_size = f"{im.width}x{im.height}"
    jpeg_kb = statistics.mean(os.path.getsize(i.image_path) for i in items.values()) / 1024
    table(f"case {label}: {len(ids)} images, {src_size} sources (JPEG {jpeg_kb:.0f} KB on "
          f"average) stored at {size} px, shards of {args.shard_size}; {len(episodes)} random "
          f"1-way 1-shot episodes, seed {args.seed}, median of {args.repeats}",
          ["variant", "episodes/s", "ms/episode", "x PIL"],
          [[k, v, 1e3 / v, v / base] for k, v in med.items()])
    print(f"\ningest of this store: {ingest_s:.1f} s; open_dataset (index load, not in the "
          f"rates) {1e3 * statistics.median(opens):.0f} ms")
    shutil.rmtree(url, ignore_errors=True)
    return {"cold": med["store, cold, local folder"] / base,
            "fsspec": med["store, cold, fsspec file:// URL"] / base,
            "warm": med["store, warm (cache filled)"] / base,
            "previous": med["previous reader: whole shards, empty LRU"] / base}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default="144,417", help="which cases: 144 and/or 417")
    p.add_argument("--images-144", type=int, default=1280)
    p.add_argument("--images-417", type=int, default=320)
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--episodes", type=int, default=300)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=Path(__file__).resolve().parent / ".work")
    args = p.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    (args.workdir / ".gitignore").write_text("*\n")
    print(f"$ {Path(sys.executable).name} benchmarks/reads.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"machine: {platform.node()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}; Python {platform.python_version()}")
    cases = {"144": (144, 144, 144, args.images_144), "417": (500, 375, 417, args.images_417)}
    summary = {}
    for label in args.cases.split(","):
        width, height, size, n = cases[label]
        voc = write_sources(args.workdir / f"reads-voc-{width}x{height}-{n}", n, width, height,
                            args.seed)
        summary[label] = run_case(label, voc, size, args)
    print(f"\n## Summary (load average {os.getloadavg()[0]:.1f} at the end)\n")
    print("| random episode reads vs PIL per episode | cold, local | cold, file:// (fsspec) "
          "| warm | previous reader, cold | goal |\n| --- | --- | --- | --- | --- | --- |")
    for label, r in summary.items():
        what = "144 px" if label == "144" else "500x375 sources at 417 px"
        print(f"| {what} | {r['cold']:.1f}x | {r['fsspec']:.1f}x | {r['warm']:.1f}x | "
              f"{r['previous']:.2f}x | >= {GOAL:g}x ({FLOOR:g}x at the least) |")


if __name__ == "__main__":
    main()
