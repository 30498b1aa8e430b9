"""Ingest: list a source dataset, plan its store layout, and process one shard at a time.

Plain functions; `flows/ingest.py` fans `ingest_shards` out over Dask, a few contiguous shards
per Prefect task.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from PIL import Image

from tasks import defaults
from tasks.data import store
from tasks.data.readers import BadItem, DatasetError, Item, Reader
from tasks.malloc import large_buffers_on_heap

DEFAULT_SIZE = defaults.INGEST_SIZE
DEFAULT_SHARD_SIZE = defaults.SHARD_SIZE
# Larger images are quarantined: decoding one takes its pixels x 4 bytes (RGB and label) at
# least (Pillow itself refuses 179 Mpx as a decompression bomb). Original-size masks are
# stored ragged, each at its own size, so other images never pay for the largest one.
DEFAULT_MAX_PIXELS = 64_000_000
# How an image reaches the canonical S x S square: "square" stretches it (HSNet's choice, the
# default); "pad" keeps its aspect ratio, the longest side becoming S, and pads the rest at the
# bottom and right (PFENet's choice): image padding 0, mask padding 255 (ignored).
RESIZE_MODES = defaults.RESIZE_MODES


@dataclass
class IngestPlan:
    """What one ingest run writes: the layout and the items of every shard."""

    spec: store.DatasetSpec
    items: list[Item]
    readers: dict[str, Reader]  # by split

    @property
    def resize(self) -> str:
        """How images reach the square (`RESIZE_MODES`): a version parameter when not the
        default."""
        return self.spec.params.get("resize", defaults.RESIZE)

    def shard_items(self, shard: int) -> list[Item]:
        start, stop = store.shard_bounds(len(self.items), self.spec.shard_size)[shard]
        return self.items[start:stop]


@dataclass
class ShardReport:
    shard: int
    ingested: int = 0
    quarantined: list[dict[str, str]] = field(default_factory=list)
    skipped: bool = False  # already complete before this run


def plan_ingest(readers: Sequence[Reader], name: str, *, size: int = DEFAULT_SIZE,
                shard_size: int = DEFAULT_SHARD_SIZE,
                max_pixels: int = DEFAULT_MAX_PIXELS, resize: str = defaults.RESIZE) -> IngestPlan:
    """List every split's items (fails fast on a wrong root) and derive the dataset version.

    Items over ``max_pixels`` (by their file header) are quarantined; the shard writer also
    quarantines a decoded label over it. ``resize`` ("square" or
    "pad", `RESIZE_MODES`) is a parameter of the version (a "pad" ingest is a new version).
    """
    store.validate_name(name)
    if size < 16:
        raise ValueError(f"size must be at least 16 px, got {size}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")
    if max_pixels < size * size:
        raise ValueError(f"max_pixels must be at least size^2 = {size * size}, got {max_pixels}")
    first = readers[0]
    for r in readers[1:]:
        if r.classes != first.classes:
            raise ValueError("all splits of one dataset must share one class list")
    splits = [r.describe()["split"] for r in readers]
    twice = [s for s, n in Counter(splits).items() if n > 1]
    if twice:
        raise ValueError(f"split {twice[0]!r} is named twice: name each split once "
                         "(e.g. --split train,val)")
    items = guard_pixels(unique_items([r.list_items() for r in readers]), max_pixels)
    if not items:
        raise ValueError(f"no items listed for {name}: check the root and split")
    fingerprint = hashlib.sha256(
        "".join(r.fingerprint() for r in readers).encode()).hexdigest()
    params = {"size": size, "shard_size": shard_size, "kind": first.kind, "splits": splits,
              "max_pixels": max_pixels}
    # The default stays out of the parameters, so versions ingested before keep their id.
    if resize != defaults.RESIZE:
        params["resize"] = resize
    spec = store.DatasetSpec(
        name=name,
        version=store.version_id(params, fingerprint),
        size=size,
        shard_size=shard_size,
        classes=list(first.classes),
        source_ids=[int(s) for s in first.source_ids],
        ids=[i.id for i in items],
        splits=[i.split for i in items],
        source_paths=[i.image_path for i in items],
        params=params,
        fingerprint=fingerprint,
        source={"readers": [r.describe() for r in readers]},
        labelled=[i.labelled for i in items],
    )
    return IngestPlan(spec=spec, items=items, readers={s: r for s, r in zip(splits, readers,
                                                                                strict=True)})


def guard_pixels(items: Sequence[Item], max_pixels: int) -> list[Item]:
    """Quarantine items whose image (by its header) holds more than ``max_pixels``."""
    out = []
    for item in items:
        if not item.quarantine and item.height and item.width:
            pixels = item.height * item.width
            if pixels > max_pixels:
                item = replace(item, quarantine=(
                    f"image {item.width}x{item.height} has {pixels:,} pixels, over the limit "
                    f"of {max_pixels:,} (max_pixels)"))
        out.append(item)
    return out


def unique_items(listed: Sequence[Sequence[Item]]) -> list[Item]:
    """The items of every split (one list per split), with ids unique within the dataset.

    * The same image file twice in one split: the later item is quarantined as a duplicate.
    * The same image file in two splits: refused (`DatasetError`), since training would see
      test images; the message names one such file and the count.
    * An id that two splits use for different images (COCO exports that number each split
      from 1, as ``fss data synth`` does): every id of the dataset becomes ``<split>/<id>``
      (``train/1``, ``val/1``), so an id always names one image.
    """
    first_of: dict[str, Item] = {}
    out: list[Item] = []
    leaks: list[tuple[Item, Item]] = []
    for items in listed:
        for item in items:
            if item.quarantine:  # never read, so neither a duplicate nor a leak
                out.append(item)
                continue
            prev = first_of.setdefault(os.path.realpath(item.image_path), item)
            if prev is item:
                out.append(item)
            elif prev.split != item.split:
                leaks.append((prev, item))
            else:
                out.append(replace(item, quarantine=(
                    f"duplicate of {prev.id!r}: the same image file is listed twice in split "
                    f"{item.split!r}")))
    if leaks:
        a, b = leaks[0]
        raise DatasetError(
            f"{len(leaks)} image(s) listed in two splits, e.g. {a.image_path} as {a.split} "
            f"{a.id!r} and {b.split} {b.id!r}: an image must belong to one split (remove it "
            "from one list)")
    splits_of: dict[str, set[str]] = {}
    for item in out:
        splits_of.setdefault(item.id, set()).add(item.split)
    if any(len(s) > 1 for s in splits_of.values()):
        out = [replace(item, id=f"{item.split}/{item.id}") for item in out]
    repeated = [i for i, n in Counter(item.id for item in out).items() if n > 1]
    if repeated:
        raise DatasetError(f"id {repeated[0]!r} is listed more than once "
                           f"({len(repeated)} such ids): ids must be unique within a split")
    return out


def resize_pair(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Canonical size: images bilinear, labels nearest (never invent class ids)."""
    img = Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR)
    lbl = Image.fromarray(mask).resize((size, size), Image.Resampling.NEAREST)
    return np.asarray(img), np.asarray(lbl)


def content_box(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """Where resize "pad" puts an ``height`` x ``width`` image in the ``size`` square:
    ``(top, left, h, w)``, the longest side ``size``, the other rounded (at least 1 px)."""
    scale = size / max(height, width)
    return 0, 0, max(1, round(height * scale)), max(1, round(width * scale))


def pad_pair(image: np.ndarray, mask: np.ndarray,
             size: int) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]:
    """Resize "pad": the aspect-preserving resize of image (bilinear) and mask (nearest) into
    the top-left corner of the ``size`` square, the rest image 0 and mask 255; with the box."""
    top, left, h, w = box = content_box(*mask.shape, size)
    img = np.zeros((size, size, 3), np.uint8)
    lbl = np.full((size, size), store.IGNORE_INDEX, np.uint8)
    img[top:top + h, left:left + w] = np.asarray(
        Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))
    lbl[top:top + h, left:left + w] = np.asarray(
        Image.fromarray(mask).resize((w, h), Image.Resampling.NEAREST))
    return img, lbl, box


def load_item(reader: Reader, item: Item, size: int,
              resize: str = defaults.RESIZE) -> store.ItemResult:
    """Decode, validate and resize one item; a bad item becomes a quarantine reason."""
    if item.quarantine:  # found while listing: its files are not read
        return store.ItemResult(reason=item.quarantine)
    try:
        image, mask = reader.load(item)
    except BadItem as exc:
        # The failing file may be the label rather than the image: keep its path then.
        where = "" if exc.path == item.image_path else f"{exc.path}: "
        return store.ItemResult(reason=where + exc.reason)
    except Exception as exc:  # noqa: BLE001 - one unexpected failure must not sink the shard
        return store.ItemResult(reason=f"unexpected {type(exc).__name__}: {exc}")
    if resize == "pad":
        small_image, small_mask, box = pad_pair(image, mask, size)
    else:
        (small_image, small_mask), box = resize_pair(image, mask, size), (0, 0, size, size)
    return store.ItemResult(image=small_image, mask=small_mask, original_mask=mask, box=box)


def ingest_shard(store_url: str, name: str, version: str, shard: int, items: Sequence[Item],
                 readers: dict[str, Reader], size: int, resize: str = defaults.RESIZE,
                 writer: store.ShardWriter | None = None) -> ShardReport:
    """Process and write one shard; a no-op when the shard is already complete. ``writer``:
    the version's, opened once for a run of shards."""
    writer = writer or store.ShardWriter(store_url, name, version)
    if writer.is_done(shard):
        return ShardReport(shard=shard, skipped=True)
    results = [load_item(readers[item.split], item, size, resize) for item in items]
    writer.write(shard, results)
    report = ShardReport(shard=shard)
    for item, result in zip(items, results, strict=True):
        if result.ok:
            report.ingested += 1
        else:
            report.quarantined.append({"path": item.image_path, "reason": result.reason})
    return report


def ingest_shards(store_url: str, name: str, version: str, shards: Sequence[int],
                  items: Sequence[Sequence[Item]], readers: dict[str, Reader], size: int,
                  resize: str = defaults.RESIZE) -> list[ShardReport]:
    """`ingest_shard` for several shards one after another (``items[i]`` are the items of
    ``shards[i]``): what one task of the ingest flow runs on a Dask worker."""
    writer = store.ShardWriter(store_url, name, version)
    with large_buffers_on_heap():  # a Dask worker's malloc settings fault in every image
        return [ingest_shard(store_url, name, version, shard, shard_items, readers, size,
                             resize, writer)
                for shard, shard_items in zip(shards, items, strict=True)]


def default_splits(source: str, root: str) -> list[str]:
    """The splits to ingest when none are named: a layout file's own, else train and val."""
    if source.lower() == "layout":
        from tasks.data.layout import load_layout

        return list(load_layout(root)[0].splits)
    return ["train", "val"]


def ingest_dataset(source: str, root: str, store_url: str, name: str, *,
                   splits: Sequence[str] | None = None, size: int = DEFAULT_SIZE,
                   shard_size: int = DEFAULT_SHARD_SIZE, classes_file: str | None = None,
                   list_file: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                   resize: str = defaults.RESIZE) -> dict[str, Any]:
    """The whole ingest in this process, shard after shard (no Prefect, no Dask).

    What the flow does, for tests, scripts and small datasets; safe to run concurrently with
    other ingests of the same dataset into a local store (`store.create_dataset`). For
    ``source="layout"``, ``root`` is the layout file; ``splits`` default to its own.
    """
    from tasks.data.readers import make_reader

    readers = [make_reader(source, root, s, classes_file=classes_file, list_file=list_file)
               for s in splits or default_splits(source, root)]
    plan = plan_ingest(readers, name, size=size, shard_size=shard_size, max_pixels=max_pixels,
                       resize=resize)
    return ingest_plan(plan, store_url)


def ingest_plan(plan: IngestPlan, store_url: str) -> dict[str, Any]:
    """Create ``plan``'s version in ``store_url``, write every shard in this process
    (`ingest_shards`) and finalize it; the run's account (`summarize`)."""
    spec = plan.spec
    store.create_dataset(store_url, spec)
    reports = ingest_shards(store_url, spec.name, spec.version, range(spec.n_shards),
                            [plan.shard_items(k) for k in range(spec.n_shards)], plan.readers,
                            spec.size, plan.resize)
    return summarize(reports, plan, store.finalize_dataset(store_url, spec.name, spec.version))


def summarize(reports: Sequence[ShardReport], plan: IngestPlan,
              final: dict[str, Any]) -> dict[str, Any]:
    """The run's account: what this run did, and what the store now holds."""
    return {
        "name": plan.spec.name,
        "version": plan.spec.version,
        "listed": len(plan.items),
        "shards": plan.spec.n_shards,
        "shards_written": sum(not r.skipped for r in reports),
        "shards_skipped": sum(r.skipped for r in reports),
        "ingested": final["ingested"],
        "quarantined": final["quarantined"],
        "unlabelled": final.get("unlabelled", 0),  # of the ingested, those without a mask
        "pending": final["pending"],
        "complete": final["complete"],
    }
