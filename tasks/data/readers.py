"""Dataset readers: one interface over PASCAL VOC (and the VOC layout), COCO, and any layout
described by a layout file (`tasks.data.layout`).

A reader lists the items of one split and loads each as ``(image, mask)``: an ``HxWx3`` uint8
RGB image and an ``HxW`` uint8 mask of *our* contiguous class ids (0 = background,
255 = ignore). Readers are pickled to Dask workers that call :meth:`Reader.load`, so they hold
only paths and small class tables; everything an item needs travels in its :class:`Item`.

Errors come in two kinds: :class:`DatasetError` (the dataset as a whole is unusable: stop) and
:class:`BadItem` (one item is unusable: quarantine it and go on).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import resource
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from models.conventions import IGNORE_INDEX

VOC_CLASSES: list[str] = [
    "background",
    "aeroplane", "bicycle", "bird", "boat", "bottle",
    "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person",
    "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip

# Class ids live in uint8 masks next to the ignore value 255.
MAX_CLASSES = 255


class DatasetError(Exception):
    """The dataset as a whole is unusable (wrong root, unreadable annotation file): stop at once."""


class BadItem(Exception):
    """One item is unusable; ingest quarantines it and goes on."""

    def __init__(self, path: str, reason: str):
        super().__init__(path, reason)
        self.path = str(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass(frozen=True)
class Item:
    """One image of a split and what is needed to load its mask."""

    id: str
    split: str
    image_path: str
    label: object
    height: int | None = None
    width: int | None = None
    # A reason found while listing (e.g. a path outside the image folder, a duplicate): the
    # item is quarantined with it and its files are never read.
    quarantine: str = ""
    # False for an image ingested without a mask (a layout with `unlabelled: true`): its
    # stored mask is all 255 and labelled samplers never draw it.
    labelled: bool = True


@dataclass(frozen=True)
class FileFacts:
    """What listing learns about one file in one read of it."""

    digest: str  # blake2b-128 of the bytes, "missing" when the file cannot be read
    height: int | None = None  # from the image header, when asked for and readable
    width: int | None = None
    orientation: int = 1  # the header's EXIF orientation (1: as stored), when asked for


MISSING = "missing"
# Reading and hashing release the GIL, so threads overlap I/O latency (cold caches, network
# file systems); header parsing holds it, so files in the page cache cost 3-4x the CPU on a
# pool (10,000 files: 1.3-1.7 s against 0.4 s on one thread). `scan_files` reads the first
# `SCAN_PROBE` files on one thread and hands the rest to `SCAN_THREADS` threads only when
# those reads went to the device or spent most of their time waiting.
SCAN_THREADS = min(16, 2 * len(os.sched_getaffinity(0)))
SCAN_PROBE = 64


def _file_facts(path: str, header: bool) -> FileFacts:
    try:
        with open(path, "rb") as fh:
            digest = hashlib.file_digest(fh, lambda: hashlib.blake2b(digest_size=16))
            if not header:
                return FileFacts(digest.hexdigest())
            fh.seek(0)
            try:
                with Image.open(fh) as im:
                    width, height = im.size
                    orientation = exif_orientation(im)
            except Exception:  # load() reports undecodable files properly; the size is optional
                return FileFacts(digest.hexdigest())
            return FileFacts(digest.hexdigest(), height, width, orientation)
    except OSError:
        return FileFacts(MISSING)


def scan_files(images: Sequence[str], others: Sequence[str] = (), *,
               threads: int | None = None) -> dict[str, FileFacts]:
    """Content digest of every file (and the header size of ``images``).

    One read per file: the digest makes a fingerprint that changes with any edit of a file's
    bytes (sizes alone miss a mask edited to the same byte count). ``threads`` None: one
    thread while the files come from the page cache, else `SCAN_THREADS` (see `SCAN_PROBE`);
    a number forces that many.
    """
    wanted = {str(p): True for p in images}
    for p in others:
        wanted.setdefault(str(p), False)
    jobs = list(wanted.items())
    facts: dict[str, FileFacts] = {}
    if threads is None:
        probe, jobs = jobs[:SCAN_PROBE], jobs[SCAN_PROBE:]
        start = _io_clock()
        facts.update((path, _file_facts(path, header)) for path, header in probe)
        threads = SCAN_THREADS if _waited_on_io(start) else 1
    if threads <= 1 or len(jobs) < 2:
        facts.update((path, _file_facts(path, header)) for path, header in jobs)
        return facts
    # A few jobs per thread, not one per file: a future per file costs more than its read.
    size = max(16, -(-len(jobs) // (4 * threads)))
    chunks = [jobs[i:i + size] for i in range(0, len(jobs), size)]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for chunk_facts in pool.map(lambda chunk: [(path, _file_facts(path, header))
                                                   for path, header in chunk], chunks):
            facts.update(chunk_facts)
    return facts


def _io_clock() -> tuple[float, float, int]:
    """(wall time, this thread's CPU time, blocks this thread read from a device) so far."""
    usage = resource.getrusage(getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF))
    return time.perf_counter(), time.thread_time(), usage.ru_inblock


def _waited_on_io(since: tuple[float, float, int]) -> bool:
    """Whether the reads since ``since`` (an `_io_clock`) went to a device, or spent most of
    their time off the CPU (a network file system)."""
    wall, cpu, blocks = _io_clock()
    return blocks > since[2] or wall - since[0] > 3 * (cpu - since[1])


class Reader:
    """Common interface of the dataset readers."""

    kind: str
    root: Path
    split: str
    classes: list[str]
    source_ids: list[int]
    # The latest listing and the digests of its files: fingerprint() describes exactly what
    # list_items() returned (never pickled).
    _listed: tuple[list[Item], dict[str, FileFacts]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Workers only call load(): listings would make every pickled task huge.
        return {k: v for k, v in self.__dict__.items() if k not in ("_listed", "_items")}

    def list_items(self) -> list[Item]:
        """The split's items, sorted deterministically."""
        raise NotImplementedError

    def load(self, item: Item) -> tuple[np.ndarray, np.ndarray]:
        """``(image HxWx3 uint8 RGB, mask HxW uint8 class ids)``; raises :class:`BadItem`."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """sha256 hex of what defines the source: listing, the bytes of every listed file,
        annotations, class list. Reuses the digests of the latest `list_items`."""
        raise NotImplementedError

    def _latest_listing(self) -> tuple[list[Item], dict[str, FileFacts]]:
        if self._listed is None:
            self.list_items()
        assert self._listed is not None
        return self._listed

    def describe(self) -> dict[str, Any]:
        """A json-able description of the source."""
        return {
            "kind": self.kind,
            "root": str(self.root),
            "split": self.split,
            "classes": list(self.classes),
            "source_ids": list(self.source_ids),
        }

    def _hash(self, listing: list[list[Any]], extra: dict[str, Any]) -> str:
        # The root is left out on purpose: moving a dataset must not invalidate its store.
        payload = {
            "kind": self.kind,
            "classes": self.classes,
            "source_ids": self.source_ids,
            "listing": listing,
            **extra,
        }
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()


def make_reader(
    source: str,
    root: str | Path,
    split: str = "train",
    *,
    classes_file: str | Path | None = None,
    list_file: str | Path | None = None,
) -> Reader:
    """Build the reader for ``source`` ("voc", "coco" or "layout").

    For COCO, ``list_file`` names the annotation json explicitly; ``classes_file`` is refused
    because COCO's classes come from its json. For "layout", ``root`` is the layout file
    (`tasks.data.layout`), which names the dataset root, the files and the classes itself.
    """
    kind = source.lower()
    if kind == "layout":
        if classes_file is not None or list_file is not None:
            raise ValueError("a layout file names the classes and the files itself; drop "
                             "classes_file and list_file")
        from tasks.data.layout import LayoutReader

        return LayoutReader(root, split)
    if kind == "voc":
        return VOCReader(root, split, classes_file=classes_file, list_file=list_file)
    if kind == "coco":
        if classes_file is not None:
            raise ValueError("COCO takes its classes from the annotation json; drop classes_file")
        return COCOReader(root, split, annotation_file=list_file)
    raise ValueError(f"unknown dataset source {source!r}; expected 'voc', 'coco' or 'layout'")


# ---------------------------------------------------------------------------------------------
# shared helpers


def _root_dir(root: str | Path) -> Path:
    path = Path(root).expanduser().absolute()
    if not path.is_dir():
        raise DatasetError(f"dataset root {path} is not a directory")
    return path


def _rel(path: str | Path, root: Path) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def _require_some_images(items: list[Item], where: Path) -> None:
    """A wrong root or an undownloaded image folder is a dataset error, not N bad items."""
    readable = [item for item in items if not item.quarantine]
    if readable and not any(os.path.isfile(item.image_path) for item in readable):
        raise DatasetError(
            f"none of the {len(readable)} listed images exist (looked under {where})")


def _inside(path: str | Path, folder: Path) -> bool:
    """Whether ``path`` stays inside ``folder`` lexically (no ``..`` escape, no absolute
    override). Symlinks inside the folder are the folder owner's choice and are followed."""
    path, folder_s = os.path.normpath(path), os.path.normpath(folder)
    return os.path.isabs(path) and os.path.commonpath([path, folder_s]) == folder_s


# Labels must survive their file format bit for bit: lossy codecs (JPEG, and JPEG or WebP
# inside TIFF) smear class ids at every edge and invent ids that no annotator drew.
LOSSLESS_MASK_FORMATS = ("PNG", "BMP", "TIFF")
_LOSSY_TIFF = {"jpeg", "tiff_jpeg", "webp"}


def _lossy(im: Image.Image) -> str:
    """Why a decoded label file cannot hold class ids exactly; "" when it can."""
    allowed = ", ".join(LOSSLESS_MASK_FORMATS[:-1]) + " or " + LOSSLESS_MASK_FORMATS[-1]
    if im.format not in LOSSLESS_MASK_FORMATS:
        return (f"mask is {im.format or 'unknown'} data, whatever its suffix: lossy or "
                f"unsupported for labels (masks must be {allowed})")
    compression = str(im.info.get("compression", "")).lower()
    if im.format == "TIFF" and compression in _LOSSY_TIFF:
        return f"mask is a TIFF with lossy {compression} compression (masks must be lossless)"
    return ""


def _decode(path: str | Path, what: str, *, lossless: bool = False) -> Image.Image:
    """Open and fully decode an image file, mapping every failure to BadItem.

    ``lossless`` requires a lossless format, judged by the decoded data (``Image.format``),
    never by the file's suffix.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise BadItem(path, f"{what} file missing")
    try:
        with Image.open(path) as im:
            reason = _lossy(im) if lossless else ""
            if reason:
                raise BadItem(path, reason)
            im.load()  # forces a full decode: truncated files fail here, not later
            return im.copy()  # detached from the file, which the with-block closes
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise BadItem(path, f"{what} fails to decode: {exc}") from exc


# EXIF orientation (tag 0x0112): how a viewer turns the stored pixels to show the image.
EXIF_ORIENTATION = 0x0112
ORIENTATIONS = {2: "mirrored", 3: "rotated 180°", 4: "flipped upside down",
                5: "mirrored and rotated 90° counter-clockwise", 6: "rotated 90° clockwise",
                7: "mirrored and rotated 90° clockwise", 8: "rotated 90° counter-clockwise"}
SWAPS_SIDES = frozenset({5, 6, 7, 8})  # orientations that exchange width and height


def exif_orientation(im: Image.Image) -> int:
    """The image's EXIF orientation, 1 (as stored) when absent, unreadable or out of range."""
    try:
        value = im.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not sink an image
        return 1
    return value if value in ORIENTATIONS else 1


def _to_rgb(im: Image.Image) -> np.ndarray:
    # EXIF orientation is not applied here: VOC and COCO annotate the stored pixels (their
    # masks and annotated sizes are those of the stored grid); a layout file chooses
    # (`orientation`, tasks/data/layout.py) and applies it before calling this.
    if im.mode == "P":
        im = im.convert("RGBA")  # palette transparency must go through RGBA (Pillow warns)
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.array(im, dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# VOC


def _read_classes_file(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read classes file {path}: {exc}") from exc
    names = [line.strip() for line in lines]
    while names and not names[-1]:
        names.pop()
    if len(names) < 2:
        raise DatasetError(f"classes file {path} needs background plus at least one class")
    if len(names) > MAX_CLASSES:
        raise DatasetError(f"classes file {path} has {len(names)} classes; at most 255 fit")
    if "" in names:
        raise DatasetError(f"classes file {path} has a blank line {names.index('') + 1}")
    if len(set(names)) != len(names):
        raise DatasetError(f"classes file {path} repeats a class name")
    # labelme-style files write "_background_"; any spelling of background is accepted.
    if names[0].strip("_").lower() != "background":
        raise DatasetError(f"classes file {path}: line 1 must be the background, got {names[0]!r}")
    return ["background", *names[1:]]


class VOCReader(Reader):
    """PASCAL VOC 2012, its SBD-augmented variant, or any dataset in the VOC layout.

    Resolution rules:

    * images are ``root/JPEGImages/<stem>.jpg``;
    * masks are ``root/SegmentationClass/<stem>.png`` (palette PNG, raw indices are the class
      ids), or ``root/SegmentationClassAug/<stem>.png`` (grayscale) for split names ending in
      ``_aug`` such as ``train_aug``;
    * the list is ``list_file`` when given, else ``root/ImageSets/Segmentation/<split>.txt``,
      and for ``_aug`` splits also ``root/ImageSets/SegmentationAug/<split>.txt`` (the first
      that exists wins);
    * a list line is either a stem (``2007_000032``) or an image/mask pair relative to the root
      (``JPEGImages/x.jpg SegmentationClassAug/x.png``, leading slash optional, as in
      PFENet/HSNet/DeepLab lists); a pair's paths override the rules above and may not
      leave the root (``..``);
    * classes are ``classes_file`` when given, else ``root/classes.txt`` when present, else
      :data:`VOC_CLASSES`; a classes file has one name per line, line i is class id i and the
      first line is the background.
    """

    kind = "voc"

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        classes_file: str | Path | None = None,
        list_file: str | Path | None = None,
    ):
        self.root = _root_dir(root)
        self.split = split
        self.mask_dir = "SegmentationClassAug" if split.endswith("_aug") else "SegmentationClass"
        self.list_file = self._find_list(list_file)
        if classes_file is not None:
            self.classes_file: Path | None = Path(classes_file).expanduser().absolute()
        elif (self.root / "classes.txt").is_file():
            self.classes_file = self.root / "classes.txt"
        else:
            self.classes_file = None
        self.classes = (
            _read_classes_file(self.classes_file) if self.classes_file else list(VOC_CLASSES)
        )
        self.source_ids = list(range(len(self.classes)))

    def _find_list(self, list_file: str | Path | None) -> Path:
        if list_file is not None:
            candidates = [Path(list_file).expanduser().absolute()]
        else:
            candidates = [self.root / "ImageSets" / "Segmentation" / f"{self.split}.txt"]
            if self.split.endswith("_aug"):
                candidates.append(self.root / "ImageSets" / "SegmentationAug" / f"{self.split}.txt")
        for path in candidates:
            if path.is_file():
                return path
        tried = ", ".join(str(p) for p in candidates)
        raise DatasetError(f"no list file for split {self.split!r} (tried {tried})")

    def _entries(self) -> dict[str, tuple[Path, Path]]:
        """stem -> (image path, mask path), from the list file."""
        try:
            lines = self.list_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise DatasetError(f"cannot read list file {self.list_file}: {exc}") from exc
        entries: dict[str, tuple[Path, Path]] = {}
        for number, line in enumerate(lines, 1):
            fields = line.split()
            if not fields:
                continue
            stem = line.strip()
            by_stem = (
                self.root / "JPEGImages" / f"{stem}.jpg",
                self.root / self.mask_dir / f"{stem}.png",
            )
            # A stem may hold spaces ("my image"): the whole line names it when that image
            # exists, or when nothing else fits (one field, or fields that are not two paths).
            if len(fields) == 1 or by_stem[0].is_file():
                pair = by_stem
            elif len(fields) == 2 and all(Path(f).suffix for f in fields):
                outside = [f for f in fields
                           if os.path.normpath(f.lstrip("/")).split(os.sep)[0] == ".."]
                if outside:  # lexically: a symlinked JPEGImages/ inside the root is fine
                    raise DatasetError(f"{self.list_file}:{number}: {outside[0]} leaves the "
                                       f"dataset root {self.root}: list paths are relative to it")
                pair = (self.root / fields[0].lstrip("/"), self.root / fields[1].lstrip("/"))
                stem = pair[0].stem
            else:
                raise DatasetError(
                    f"{self.list_file}:{number}: expected a stem or an image/mask pair, "
                    f"got {len(fields)} fields (a stem with spaces must name an existing "
                    f"JPEGImages/<stem>.jpg)"
                )
            if entries.setdefault(stem, pair) != pair:
                raise DatasetError(
                    f"{self.list_file}:{number}: stem {stem!r} listed twice with different files"
                )
        if not entries:
            raise DatasetError(f"list file {self.list_file} lists no images")
        return entries

    def list_items(self) -> list[Item]:
        entries = sorted(self._entries().items())
        facts = scan_files([str(image) for _, (image, _) in entries],
                           [str(mask) for _, (_, mask) in entries])
        items = []
        for stem, (image, mask) in entries:
            f = facts[str(image)]
            items.append(Item(stem, self.split, str(image), str(mask), f.height, f.width))
        _require_some_images(items, self.root)
        self._listed = (items, facts)
        return list(items)

    def load(self, item: Item) -> tuple[np.ndarray, np.ndarray]:
        if item.quarantine:
            raise BadItem(item.image_path, item.quarantine)
        image_im = _decode(item.image_path, "image")
        mask_path = str(item.label)
        mask_im = _decode(mask_path, "mask", lossless=True)
        if mask_im.size != image_im.size:
            (mw, mh), (iw, ih) = mask_im.size, image_im.size
            raise BadItem(mask_path, f"mask {mw}x{mh} != image {iw}x{ih}")
        if mask_im.mode not in ("P", "L", "1", "I", "I;16"):
            raise BadItem(
                mask_path, f"mask mode {mask_im.mode} holds no class ids (palette/grayscale)"
            )
        raw = np.asarray(mask_im)
        values = np.unique(raw)
        unknown = values[((values < 0) | (values >= len(self.classes))) & (values != IGNORE_INDEX)]
        if unknown.size:
            raise BadItem(mask_path, f"unknown label ids {unknown.tolist()}")
        return _to_rgb(image_im), raw.astype(np.uint8)

    def fingerprint(self) -> str:
        items, facts = self._latest_listing()
        listing = [
            [
                item.id,
                _rel(item.image_path, self.root),
                facts[item.image_path].digest,
                _rel(str(item.label), self.root),
                facts[str(item.label)].digest,
            ]
            for item in items
        ]
        return self._hash(listing, {"digest": "blake2b-128"})

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "list_file": str(self.list_file),
            "mask_dir": self.mask_dir,
            "classes_file": str(self.classes_file) if self.classes_file else None,
        }


# ---------------------------------------------------------------------------------------------
# COCO

# What load() needs from an annotation; the rest (bbox, area, ...) is not shipped to workers.
_ANN_KEYS = ("id", "category_id", "iscrowd", "segmentation")


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return (_integer(value) or isinstance(value, float)) and math.isfinite(value)


def _string_rle_counts(counts: str) -> list[int]:
    """Decode COCO's compressed RLE string (maskApi.c rleFrString) to run lengths."""
    runs: list[int] = []
    pos = 0
    while pos < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if pos >= len(counts):
                raise ValueError("RLE string ends inside a number")
            char = ord(counts[pos]) - 48
            if not 0 <= char < 64:
                raise ValueError(f"RLE string has an invalid character {counts[pos]!r}")
            value |= (char & 0x1F) << shift
            more = bool(char & 0x20)
            pos += 1
            shift += 5
            if not more and char & 0x10:
                value -= 1 << shift  # sign-extend
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


class COCOReader(Reader):
    """COCO instance annotations in the official layout, read with pycocotools' mask API.

    * Split ``train`` resolves to ``root/annotations/instances_train.json``, else
      ``instances_train2017.json``, else ``instances_train2014.json``; ``train2017`` names its
      file directly; ``annotation_file`` overrides the search. Images are
      ``root/<split-dir>/<file_name>``, the split-dir being the json's ``instances_`` suffix.
    * Every image in the json is an item, also those without annotations (all background).
    * Class index 1..N = categories sorted by category id (COCO's 80 ids become 1..80);
      ``source_ids`` keeps the category ids, names are the json's.
    * Mask: per-category union of instance masks. Non-crowd instances are painted in
      *descending* pixel area (ties: ascending annotation id, the later wins), so smaller
      instances, which usually lie in front, win overlaps. Crowd (``iscrowd=1``) regions then
      become 255 where no non-crowd instance labelled the pixel.

    The json is parsed with :mod:`json` rather than ``pycocotools.coco.COCO`` so that a broken
    file gives a clear :class:`DatasetError`; no index survives listing (pickles stay small).
    """

    kind = "coco"

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        annotation_file: str | Path | None = None,
    ):
        self.root = _root_dir(root)
        self.split = split
        self.annotation_file = self._find_annotations(annotation_file)
        match = re.fullmatch(r"instances_(.+)\.json", self.annotation_file.name)
        self.image_dir = self.root / (match.group(1) if match else split)
        if not self.image_dir.is_dir():
            raise DatasetError(f"image folder {self.image_dir} is missing")
        self._items: list[Item] | None = None
        self._parse()

    def _find_annotations(self, annotation_file: str | Path | None) -> Path:
        if annotation_file is not None:
            candidates = [Path(annotation_file).expanduser().absolute()]
        else:
            names = [self.split]
            if not re.search(r"\d{4}$", self.split):
                names += [f"{self.split}2017", f"{self.split}2014"]
            candidates = [self.root / "annotations" / f"instances_{n}.json" for n in names]
        for path in candidates:
            if path.is_file():
                return path
        tried = ", ".join(str(p) for p in candidates)
        raise DatasetError(f"no annotation file for split {self.split!r} (tried {tried})")

    def _parse(self) -> None:
        """Read the json: class tables and the item list (kept until pickling)."""
        path = self.annotation_file
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DatasetError(f"cannot read annotation file {path}: {exc}") from exc
        try:
            categories = sorted(data["categories"], key=lambda c: c["id"])
            cat_ids = [c["id"] for c in categories]
            names = [str(c["name"]) for c in categories]
            rows = sorted(
                (im["id"], im["file_name"], im["height"], im["width"]) for im in data["images"]
            )
            by_image: dict[int, list[dict[str, Any]]] = {row[0]: [] for row in rows}
            ann_ids = []
            for ann in data["annotations"]:
                ann_ids.append(ann["id"])
                if ann["image_id"] in by_image:
                    entry = {k: ann[k] for k in _ANN_KEYS if k in ann}
                    by_image[ann["image_id"]].append(entry)
        except (KeyError, TypeError, AttributeError) as exc:
            raise DatasetError(f"{path}: not a COCO instances file ({exc!r})") from exc
        if not all(_integer(i) and i > 0 for i in cat_ids):
            raise DatasetError(f"{path}: category ids must be positive integers")
        if not all(_integer(i) for i in ann_ids) or not all(_integer(row[0]) for row in rows):
            raise DatasetError(f"{path}: image and annotation ids must be integers")
        if not all(_integer(v) and v > 0 for row in rows for v in row[2:]):
            raise DatasetError(f"{path}: image height and width must be positive integers")
        if len(set(cat_ids)) != len(cat_ids) or len(set(names)) != len(names):
            raise DatasetError(f"{path}: category ids and names must be unique")
        if not 0 < len(cat_ids) < MAX_CLASSES:
            raise DatasetError(f"{path}: {len(cat_ids)} categories; 1..254 fit in a uint8 mask")
        if len(by_image) != len(rows):
            raise DatasetError(f"{path}: duplicate image ids")
        self.classes = ["background", *names]
        self.source_ids = [0, *cat_ids]
        self.category_index = {cid: index for index, cid in enumerate(cat_ids, 1)}
        self._items = [
            Item(
                str(image_id),
                self.split,
                str(self.image_dir / str(file_name)),
                tuple(by_image[image_id]),
                height,
                width,
                quarantine=self._outside(file_name),
            )
            for image_id, file_name, height, width in rows
        ]

    def _outside(self, file_name: Any) -> str:
        """A quarantine reason when ``file_name`` would be read from outside the image folder."""
        if not isinstance(file_name, str) or not file_name:
            return f"file_name {file_name!r} is not a file name"
        if not _inside(self.image_dir / file_name, self.image_dir):
            return f"file_name {file_name!r} points outside the image folder {self.image_dir}"
        return ""

    def __getstate__(self) -> dict[str, Any]:
        # Workers only call load(): the item list would make every pickled task huge.
        return {**super().__getstate__(), "_items": None}

    def list_items(self) -> list[Item]:
        if self._items is None:
            self._parse()
        assert self._items is not None
        items = list(self._items)
        _require_some_images(items, self.image_dir)
        facts = scan_files([i.image_path for i in items if not i.quarantine])
        items = [self._check_size(item, facts.get(item.image_path)) for item in items]
        self._listed = (items, facts)
        return list(items)

    @staticmethod
    def _check_size(item: Item, facts: FileFacts | None) -> Item:
        """The json's size claim against the file's header: a layout is sized by verified
        sizes only (a claim of 20000x20000 for a small image must not size the store)."""
        if facts is None or item.quarantine:
            return item
        if facts.height is None:  # unreadable header: load() decodes and reports it
            return replace(item, height=None, width=None)
        if (facts.height, facts.width) != (item.height, item.width):
            return replace(item, height=facts.height, width=facts.width, quarantine=(
                f"image {facts.width}x{facts.height} != annotated size "
                f"{item.width}x{item.height}"))
        return item

    def _rle(self, item: Item, ann: dict[str, Any], height: int, width: int) -> dict[str, Any]:
        """Validate one annotation's segmentation and return its (compressed) RLE."""

        def bad(reason: str) -> BadItem:
            return BadItem(
                str(self.annotation_file),
                f"image {item.id} annotation {ann.get('id')}: {reason}",
            )

        seg = ann.get("segmentation")
        if not seg:
            raise bad("missing or empty segmentation")
        if isinstance(seg, list):
            # pycocotools' rasteriser allocates per unit of edge length: far-off points are fatal.
            reach = 2 * max(height, width)
            for poly in seg:
                if not isinstance(poly, list) or not all(_number(v) for v in poly):
                    raise bad("polygon is not a list of finite numbers")
                if len(poly) < 6 or len(poly) % 2:
                    raise bad(f"polygon with {len(poly)} coordinates (need an even number >= 6)")
                if not all(-reach <= v <= reach for v in poly):
                    raise bad("polygon coordinates far outside the image")
            return mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
        if not isinstance(seg, dict) or "counts" not in seg or "size" not in seg:
            raise bad("segmentation is neither polygons nor an RLE with counts and size")
        size = seg["size"]
        if not isinstance(size, list | tuple) or list(size) != [height, width]:
            raise bad(f"RLE size {size!r} != image size {[height, width]}")
        counts = seg["counts"]
        if isinstance(counts, str | bytes):
            try:
                text = counts.decode("ascii") if isinstance(counts, bytes) else counts
                runs = _string_rle_counts(text)
            except (ValueError, UnicodeDecodeError) as exc:
                raise bad(f"corrupt RLE: {exc}") from exc
        elif isinstance(counts, list) and all(isinstance(c, int) for c in counts):
            runs = counts
        else:
            raise bad("RLE counts are neither a string nor a list of integers")
        # pycocotools decodes without bounds checks: bad run lengths would overrun its buffer.
        if any(r < 0 for r in runs) or sum(runs) != height * width:
            raise bad(f"RLE runs cover {sum(runs)} pixels, image has {height * width}")
        if isinstance(counts, list):
            return mask_utils.frPyObjects(seg, height, width)
        return {"size": [height, width], "counts": counts}

    def load(self, item: Item) -> tuple[np.ndarray, np.ndarray]:
        if item.quarantine:
            raise BadItem(item.image_path, item.quarantine)
        if not _inside(item.image_path, self.image_dir):  # an Item built by hand
            raise BadItem(item.image_path, f"outside the image folder {self.image_dir}")
        image_im = _decode(item.image_path, "image")
        width, height = image_im.size
        if item.height is not None and (item.height, item.width) != (height, width):
            raise BadItem(
                item.image_path,
                f"image {width}x{height} != annotated size {item.width}x{item.height}",
            )
        things: list[tuple[int, int, int, dict[str, Any]]] = []
        crowds: list[dict[str, Any]] = []
        for ann in item.label:
            index = self.category_index.get(ann.get("category_id"))
            if index is None:
                raise BadItem(
                    str(self.annotation_file),
                    f"image {item.id} annotation {ann.get('id')}: "
                    f"unknown category_id {ann.get('category_id')!r}",
                )
            crowd = ann.get("iscrowd", 0)
            if crowd not in (0, 1):
                raise BadItem(
                    str(self.annotation_file),
                    f"image {item.id} annotation {ann.get('id')}: iscrowd must be 0 or 1",
                )
            rle = self._rle(item, ann, height, width)
            if crowd:
                crowds.append(rle)
            else:
                things.append((-int(mask_utils.area(rle)), ann["id"], index, rle))
        mask = np.zeros((height, width), np.uint8)
        labelled = np.zeros((height, width), bool)
        # Largest first: smaller instances, painted later, win overlaps.
        for _, _, index, rle in sorted(things, key=lambda t: (t[0], t[1])):
            instance = mask_utils.decode(rle).astype(bool)
            mask[instance] = index
            labelled |= instance
        if crowds:
            crowd = mask_utils.decode(mask_utils.merge(crowds)).astype(bool)
            mask[crowd & ~labelled] = IGNORE_INDEX
        return _to_rgb(image_im), mask

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        try:
            with open(self.annotation_file, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
        except OSError as exc:
            raise DatasetError(
                f"cannot read annotation file {self.annotation_file}: {exc}"
            ) from exc
        items, facts = self._latest_listing()
        listing = [
            [item.id, _rel(item.image_path, self.root),
             facts[item.image_path].digest if item.image_path in facts else item.quarantine]
            for item in items
        ]
        return self._hash(listing, {"annotations_sha256": digest.hexdigest(),
                                    "digest": "blake2b-128"})

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "annotation_file": str(self.annotation_file),
            "image_dir": str(self.image_dir),
        }
