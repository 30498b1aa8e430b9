"""The Zarr store: the one module that knows array paths, chunking and sharding.

Layout (Zarr v3, a local folder or any fsspec URL)::

    <store>/datasets/<name>/                  attrs: latest version, versions and their summaries
    <store>/datasets/<name>/<version>/        attrs: params, source fingerprint, classes, summary
        images            (N, S, S, 3) uint8   canonical size; uncompressed (photos barely compress)
        masks             (N, S, S)    uint8   class ids at canonical size, 255 = ignore
        original_masks    (N,) bytes   each label at its own original size (h, w) uint8,
                                      zstd-compressed on its own (ragged: layout 2; in
                                      layout 1, (N, Hmax, Wmax) uint8 padded with 255)
        index/id, index/split, index/source_path      (N,) str, written once at creation
        index/status      (N,) uint8  0 pending, 1 ingested, 2 quarantined
        index/reason      (N,) str    why an item was quarantined
        index/height, index/width (N,) int32  original size
        index/class_pixels (N, C) int64       pixels of each class at original resolution
        index/labelled    (N,) uint8  1, or 0 for an image ingested without a mask (its masks
                                      are all 255); absent in versions made before it existed
        index/box         (N, 4) int32 where the image lies in the canonical square: top, left,
                                      height, width (the whole square unless ingested with
                                      resize "pad"); absent in versions made before it existed
        shard_done        (n_shards,) uint8   1 once every array of the shard is written
        derived/<kind>-<hash>/                attrs: kind, params, fields, complete, summary
            <field>       (N, ...)             per-image outputs of a later stage, row-aligned
            extra/<name>  any shape            small whole arrays (e.g. cluster centres)
            shard_done    (n_shards,) uint8

Derived arrays (features, pseudo masks, ...) follow the same rules as the dataset's own arrays:
rows aligned with the dataset (quarantined rows keep the fill value), chunks of one row, shards
of ``shard_size`` rows, one writer per shard, ``shard_done`` written last. Their key is the
stage's kind plus a hash of its parameters (which name their inputs, e.g. the features key), so
a changed parameter makes a new group and never overwrites an old one.

Chunks hold one image; shards hold ``shard_size`` images and every per-row index array is
chunked by the same rows, so exactly one writer owns each shard (partial-shard writes through
Dask lose data silently: see docs/architecture.md). A shard's ``shard_done`` flag is written last,
so a crash leaves it unset and a rerun rewrites it; a finished shard is skipped. A version is a
hash of the ingest parameters and the source fingerprint: a changed parameter makes a new version
instead of overwriting the old one.

Reads: `Dataset`, `Derived` and `UnlabelledImages` read through one mechanism (`_RowReader`).
Because a chunk is one row inside a Zarr v3 shard, a row is read as the sharding spec lays it
out: the shard's index (offsets and lengths, read once per shard) names the row's bytes, and one
ranged read fetches exactly those (`_ShardedRows`, `_ByteRanges`); no shard is decoded whole to
serve one image. The bytes on disk are what zarr-python writes and reads.

Writes, symmetrically, encode a whole shard here (`_ArrayWriter`): each row's chunk through
the array's own codec chain (numcodecs, as zarr-python applies it), the shard index with its
crc32c, and one write of the shard file (a temporary file renamed into place on local folders,
one put through zarr's store API elsewhere). The files are byte for byte those zarr-python
writes (tests/test_store_writes.py); arrays with codecs or chunks it does not know are written
through zarr-python.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import re
import shutil
import threading
import time
import uuid
import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from filelock import FileLock
from numcodecs import Zstd
from zarr.codecs import ZstdCodec
from zarr.dtype import VariableLengthBytes
from zarr.errors import (
    ContainsArrayAndGroupError,
    ContainsArrayError,
    ContainsGroupError,
    UnstableSpecificationWarning,
)

from models.conventions import IGNORE_INDEX

if TYPE_CHECKING:  # pandas costs 0.25 s to import: writers (Dask workers) never need it
    import pandas as pd

# Layout of a dataset version. 2: original_masks ragged (one compressed blob per row), so
# memory follows the image at hand; 1: padded to the dataset's largest image (still read).
# Part of the version id: a rerun of an ingest made under layout 1 makes a new version.
LAYOUT_VERSION = 2
DERIVED_LAYOUT_VERSION = 1  # derived groups did not change: their keys stay what they were
DATASETS = "datasets"
PENDING, INGESTED, QUARANTINED = 0, 1, 2
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # used with fullmatch: no "\n" slips by
_MASK_CODEC = ZstdCodec(level=3)  # masks compress 40-190x; images are stored raw
_BLOB_CODEC = Zstd(level=3)  # the same, applied by the writer to each original mask on its own
ORIGINAL_MASK_ENCODING = ("zstd frame of the label's (height, width) uint8 pixels in C order; "
                          "height and width in index/height and index/width")
# Local stores only: groups under construction (<store>/.staging/<unique>) and the locks that
# serialise read-modify-writes of a dataset's attributes (<store>/.locks/<name>.lock).
# Neither is a Zarr node, so listings of the store never show them.
STAGING, LOCKS = ".staging", ".locks"
_STALE_STAGING_S = 24 * 3600  # a creator that died mid-build leaves its staging group behind
_VERSION_ARRAYS = ("images", "masks", "original_masks", "index/id", "index/split",
                   "index/source_path", "index/status", "index/reason", "index/height",
                   "index/width", "index/class_pixels", "shard_done")


class StoreError(Exception):
    """The store or a dataset in it is missing or inconsistent."""


def validate_name(name: str) -> str:
    """Dataset names become path segments: refuse anything that could leave the store."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise ValueError(
            f"invalid dataset name {name!r}: use letters, digits, '.', '_' and '-' "
            "(starting with a letter or digit, at most 128 characters)"
        )
    return name


def version_id(params: dict[str, Any], fingerprint: str) -> str:
    """Deterministic version of a dataset: same source and parameters, same version."""
    blob = json.dumps({"layout": LAYOUT_VERSION, "params": params, "source": fingerprint},
                      sort_keys=True)
    return "v-" + hashlib.sha256(blob.encode()).hexdigest()[:12]


def shard_bounds(n_items: int, shard_size: int) -> list[tuple[int, int]]:
    """Row ranges [start, stop) of each shard."""
    return [(s, min(s + shard_size, n_items)) for s in range(0, n_items, shard_size)]


@dataclass(frozen=True)
class DatasetSpec:
    """Everything needed to lay out one dataset version before any shard is written."""

    name: str
    version: str
    size: int
    shard_size: int
    classes: list[str]
    source_ids: list[int]
    ids: list[str]
    splits: list[str]
    source_paths: list[str]
    params: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""
    source: dict[str, Any] = field(default_factory=dict)
    # Per item: False for an image without a mask (stored all 255, never in labelled episodes).
    labelled: list[bool] | None = None

    @property
    def n_items(self) -> int:
        return len(self.ids)

    @property
    def n_shards(self) -> int:
        return len(shard_bounds(self.n_items, self.shard_size))


@dataclass
class ItemResult:
    """One ingested (arrays set) or quarantined (reason set) item, as a shard writer gets it."""

    image: np.ndarray | None = None  # (S, S, 3) uint8
    mask: np.ndarray | None = None  # (S, S) uint8
    original_mask: np.ndarray | None = None  # (h, w) uint8
    reason: str = ""
    # (top, left, height, width) of the image inside the canonical square; None: all of it
    box: tuple[int, int, int, int] | None = None

    @property
    def ok(self) -> bool:
        return self.image is not None


def _root(store_url: str, mode: str = "a", storage_options: dict | None = None) -> zarr.Group:
    for attempt in range(5):
        try:
            return zarr.open_group(store=store_url, mode=mode, storage_options=storage_options)
        except FileNotFoundError as exc:
            raise StoreError(f"no Zarr store at {store_url}") from exc
        except (ContainsGroupError, ContainsArrayAndGroupError):
            # Another process created the store between zarr's check and its write: open it.
            if attempt == 4:
                raise
            time.sleep(0.05)
    raise AssertionError("unreachable")


def _require_unique_ids(ids: np.ndarray, where: str) -> None:
    """Refuse a version whose ids do not each name one row: reads by id would mix images."""
    ids = [str(i) for i in ids]
    if len(set(ids)) != len(ids):
        dup = [i for i, n in Counter(ids).items() if n > 1]
        raise StoreError(
            f"{where} has {len(dup)} id(s) that name more than one row (e.g. {dup[0]!r}): "
            "it was ingested before ids were made unique per dataset; rerun its ingest, "
            "which makes a new version")


def _version_path(name: str, version: str) -> str:
    return f"{DATASETS}/{validate_name(name)}/{version}"


def _local_dir(store_url: str) -> Path | None:
    """The folder of a store on the local filesystem; None for object storage and the like."""
    if "://" not in store_url:
        return Path(store_url)
    if store_url.startswith("file://"):
        return Path(store_url[len("file://"):])
    return None


def _group_or_none(root: zarr.Group, path: str) -> zarr.Group | None:
    try:
        node = root[path]
    except (KeyError, FileNotFoundError, ValueError):
        return None
    return node if isinstance(node, zarr.Group) else None


def version_problems(group: zarr.Group, keys: Sequence[str] | None = None) -> list[str]:
    """What is wrong with a dataset version: [] when it was created and every array opens
    with its rows (a version counts as existing, and as complete, only then). ``keys`` limits
    the check to those arrays (a label-free reader must not even open a label array)."""
    attrs = group.attrs
    if not attrs.get("created"):
        return ["its creation never finished"]
    n = int(attrs.get("n_listed", -1))
    n_shards = len(shard_bounds(n, int(attrs.get("shard_size", 1))))
    problems = []
    # index/labelled exists in the versions made since it was introduced (they say how many
    # images are unlabelled); older versions have every image labelled.
    optional = (("index/labelled",) if "unlabelled" in attrs else ()) + (
        ("index/box",) if "resize" in attrs else ())
    for key in keys if keys is not None else _VERSION_ARRAYS + optional:
        try:
            array = group[key]
        except Exception as exc:  # noqa: BLE001 - any failure to open is the finding
            problems.append(f"{key} does not open ({type(exc).__name__}: {exc})")
            continue
        rows = n_shards if key == "shard_done" else n
        if not isinstance(array, zarr.Array) or array.shape[:1] != (rows,):
            problems.append(f"{key} is not an array of {rows} rows")
    return problems


def _derived_problems(group: zarr.Group) -> list[str]:
    attrs = group.attrs
    if not attrs.get("created"):
        return ["its creation never finished"]
    problems = []
    for key in [f["name"] for f in attrs.get("fields", [])] + ["shard_done"]:
        try:
            if not isinstance(group[key], zarr.Array):
                problems.append(f"{key} is not an array")
        except Exception as exc:  # noqa: BLE001 - any failure to open is the finding
            problems.append(f"{key} does not open ({type(exc).__name__}: {exc})")
    return problems


def _existing_problems(root: zarr.Group, path: str,
                       check: Callable[[zarr.Group], list[str]]) -> list[str] | None:
    """None when no group is at ``path``, [] when a sound one is, else what is wrong."""
    group = _group_or_none(root, path)
    return None if group is None else check(group)


def _require_group(root: zarr.Group, path: str) -> zarr.Group:
    for _ in range(5):  # another process may create it between zarr's check and its write
        with contextlib.suppress(ContainsGroupError, ContainsArrayAndGroupError, FileExistsError):
            return root.require_group(path)
        time.sleep(0.05)
    return root.require_group(path)


def _sweep_staging(local: Path) -> None:
    now = time.time()
    with contextlib.suppress(OSError):
        for entry in (local / STAGING).iterdir():
            with contextlib.suppress(OSError):
                if now - entry.stat().st_mtime > _STALE_STAGING_S:
                    shutil.rmtree(entry, ignore_errors=True)


@contextlib.contextmanager
def _dataset_lock(store_url: str, name: str):
    """Serialise read-modify-writes of a dataset's attributes (local stores; elsewhere a
    no-op: object storage offers no lock, and there concurrent finalizes may lose an entry of
    ``versions``, never data)."""
    local = _local_dir(store_url)
    if local is None:
        yield
        return
    (local / LOCKS).mkdir(parents=True, exist_ok=True)
    with FileLock(str(local / LOCKS / f"{validate_name(name)}.lock"), timeout=120):
        yield


def _forget_version(store_url: str, root: zarr.Group, name: str, version: str) -> None:
    """Stop naming a version latest (it is being rebuilt): readers then get a clear error
    instead of a half-written version."""
    parent = _group_or_none(root, f"{DATASETS}/{name}")
    if parent is None or (parent.attrs.get("latest") != version
                          and version not in parent.attrs.get("versions", {})):
        return
    with _dataset_lock(store_url, name):
        versions = dict(parent.attrs.get("versions", {}))
        versions.pop(version, None)
        latest = parent.attrs.get("latest")
        parent.attrs.update({"latest": None if latest == version else latest,
                             "versions": versions})


def _create_group(store_url: str, path: str, build: Callable[[zarr.Group], None],
                  check: Callable[[zarr.Group], list[str]]) -> bool:
    """Create the group at ``path`` with ``build`` unless a sound one (``check``) is there;
    a damaged or unfinished one is rebuilt. Returns True when it was built now.

    Local filesystems: the group is built under ``<store>/.staging/<unique>`` and renamed into
    place. ``rename(2)`` of a directory is atomic and refuses a non-empty target, so racing
    creators cannot destroy each other's arrays: one rename wins, the others find a sound
    group, discard theirs, and go on with the winner's.

    Object storage (s3://, gs://, ... through fsspec) has neither an atomic rename of a prefix
    nor an exclusive lock, so there the group is created in place without overwriting: a second
    concurrent creator fails with a clear `StoreError` instead of destroying the first one's
    arrays. Run one ingest (or stage) of a dataset at a time on object storage.
    """
    root = _root(store_url)
    problems = _existing_problems(root, path, check)
    if problems == []:
        return False  # reads only: a no-op rerun works on a read-only store
    local = _local_dir(store_url)
    if local is None:
        if problems is not None:  # damaged or unfinished: start over
            zarr.core.sync.sync(root.store.delete_dir(path))
        try:
            build(_require_group(root, path))
        except (ContainsArrayError, ContainsGroupError, ContainsArrayAndGroupError) as exc:
            raise StoreError(f"another process is creating {path} in {store_url}: on object "
                             "storage run one ingest of a dataset at a time") from exc
        return True
    _sweep_staging(local)
    staging = local / STAGING / f"{uuid.uuid4().hex}"
    staging.parent.mkdir(parents=True, exist_ok=True)
    try:
        build(zarr.open_group(store=str(staging), mode="w"))
        _require_group(root, path.rsplit("/", 1)[0])
        final = local / path
        for _ in range(8):
            try:
                os.rename(staging, final)
                return True
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
            if _existing_problems(root, path, check) == []:
                return False  # another creator won: use its group
            # Damaged, unfinished or a leftover without metadata: move it aside atomically
            # (a racing repairer may have moved it already), then place ours.
            aside = local / STAGING / f"damaged-{uuid.uuid4().hex}"
            with contextlib.suppress(FileNotFoundError):
                os.rename(final, aside)
            shutil.rmtree(aside, ignore_errors=True)
        raise StoreError(f"could not place {path} in {store_url}: it keeps being replaced")
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful rename


def create_dataset(store_url: str, spec: DatasetSpec) -> bool:
    """Create the arrays of a dataset version; a no-op when a sound one already exists.

    Returns True when the arrays were created now. Safe against concurrent creators of the same
    version on a local store (see `_create_group`: build under a temporary name, rename into
    place; object storage: see there). A version that exists but does not verify (an array
    that does not open, a creation that never finished: `version_problems`) is rebuilt, and
    its shards are written again by the ingest that follows.
    """
    root = _root(store_url)
    path = _version_path(spec.name, spec.version)
    problems = _existing_problems(root, path, version_problems)
    if problems == []:
        return False
    if problems is not None:
        _forget_version(store_url, root, spec.name, spec.version)
    return _create_group(store_url, path, functools.partial(_build_version, spec=spec),
                         version_problems)


def _build_version(g: zarr.Group, spec: DatasetSpec) -> None:
    """Every array and attribute of a fresh version group; ``created`` is written last."""
    n, s, c = spec.n_items, spec.size, len(spec.classes)
    rows = spec.shard_size

    def arr(key: str, shape: tuple, dtype: Any, chunks: tuple, fill: Any, **kw: Any) -> Any:
        return g.create_array(key, shape=shape, dtype=dtype, chunks=chunks, fill_value=fill,
                              **kw)

    arr("images", (n, s, s, 3), "uint8", (1, s, s, 3), 0, shards=(rows, s, s, 3),
        compressors=None)
    arr("masks", (n, s, s), "uint8", (1, s, s), IGNORE_INDEX, shards=(rows, s, s),
        compressors=_MASK_CODEC)
    # Ragged: one blob per row (the row's own (h, w) label, zstd-compressed by the writer), so
    # neither a writer nor a reader ever holds more than the labels of the rows at hand.
    with warnings.catch_warnings():  # zarr-python calls the data type's spec unstable
        warnings.simplefilter("ignore", UnstableSpecificationWarning)
        arr("original_masks", (n,), VariableLengthBytes(), (1,), b"", shards=(rows,),
            compressors=None, attributes={"encoding": ORIGINAL_MASK_ENCODING})
    for key, values in (("id", spec.ids), ("split", spec.splits),
                        ("source_path", spec.source_paths)):
        arr(f"index/{key}", (n,), str, (rows,), "")[:] = np.asarray(values, dtype=str)
    arr("index/status", (n,), "uint8", (rows,), PENDING)
    arr("index/reason", (n,), str, (rows,), "")
    arr("index/height", (n,), "int32", (rows,), 0)
    arr("index/width", (n,), "int32", (rows,), 0)
    arr("index/class_pixels", (n, c), "int64", (rows, c), 0)
    labelled = np.ones(n, np.uint8) if spec.labelled is None else np.asarray(spec.labelled,
                                                                               np.uint8)
    arr("index/labelled", (n,), "uint8", (rows,), 1)[:] = labelled
    arr("index/box", (n, 4), "int32", (rows, 4), 0)
    arr("shard_done", (spec.n_shards,), "uint8", (1,), 0)
    g.attrs.update({
        "layout": LAYOUT_VERSION,
        "name": spec.name,
        "version": spec.version,
        "size": s,
        "shard_size": rows,
        "classes": spec.classes,
        "source_ids": spec.source_ids,
        "params": spec.params,
        "fingerprint": spec.fingerprint,
        "source": spec.source,
        "n_listed": n,
        "unlabelled": int(n - labelled.sum()),  # listed without a mask
        "resize": resize_mode(spec.params),  # and so index/box exists
        "created": True,  # last: without it the version does not verify and is rebuilt
    })


def done_shards(store_url: str, name: str, version: str, derived: str | None = None) -> set[int]:
    """Indices of completely written shards of a dataset version, or of one derived group."""
    path = _version_path(name, version)
    if derived is not None:
        path = _derived_path(name, version, derived)
    flags = _root(store_url, mode="r")[path]["shard_done"][:]
    return {int(i) for i in np.flatnonzero(flags)}


def shard_is_done(store_url: str, name: str, version: str, shard: int,
                  derived: str | None = None) -> bool:
    """Whether one shard of a dataset version (or of a derived group) is completely written:
    what a shard writer asks before it starts. Reads that one flag, where `done_shards` reads
    them all (one chunk each: per shard of a run, a cost that grows with the dataset)."""
    path = _version_path(name, version)
    if derived is not None:
        path = _derived_path(name, version, derived)
    return bool(_root(store_url, mode="r")[path]["shard_done"][shard])


# ---------------------------------------------------------------------------------------------
# Shard writes. zarr-python runs its codec pipeline once per chunk (~0.2-0.3 ms each, a thread
# hop per zstd call included), and a chunk here is one row, so a shard written through it costs
# ~1 ms per image. `_ArrayWriter` encodes the rows of a whole shard with the array's own codec
# chain (read from its metadata, applied through numcodecs as zarr-python applies it), lays
# them out as the Zarr v3 sharding spec says, and writes the shard file in one go. The bytes
# are those zarr-python writes (tests/test_store_writes.py compares them); arrays whose codecs
# or chunking it does not know are written through zarr-python.


def _chunk_encoder(codecs: Sequence[Any], dtype: Any) -> Callable[[np.ndarray], Any] | None:
    """The codec chain of one chunk as a function from the chunk's values to its stored bytes,
    or None for a chain this module does not encode itself (zarr-python then does)."""
    import google_crc32c  # zarr's own checksum dependency
    from numcodecs.vlen import VLenBytes, VLenUTF8
    from zarr.codecs import BytesCodec, Crc32cCodec, VLenBytesCodec, VLenUTF8Codec

    if not codecs:
        return None
    first, rest = codecs[0], codecs[1:]
    steps: list[Callable[[Any], Any]] = []
    if isinstance(first, BytesCodec):
        try:
            native = np.dtype(dtype)
        except TypeError:
            return None
        if native.hasobject:
            return None
        if first.endian is not None and native.itemsize > 1:
            native = native.newbyteorder("<" if first.endian.value == "little" else ">")
        steps.append(lambda chunk: np.ascontiguousarray(chunk, native).reshape(-1).view(np.uint8))
    elif isinstance(first, VLenUTF8Codec | VLenBytesCodec):
        vlen = VLenUTF8() if isinstance(first, VLenUTF8Codec) else VLenBytes()
        steps.append(lambda chunk: vlen.encode(np.asarray(chunk, dtype=object).reshape(-1)))
    else:
        return None
    for codec in rest:
        if isinstance(codec, ZstdCodec):
            steps.append(Zstd(level=codec.level, checksum=codec.checksum).encode)
        elif isinstance(codec, Crc32cCodec):
            steps.append(lambda data: bytes(data) + google_crc32c.value(
                bytes(data)).to_bytes(4, "little"))
        else:
            return None

    def encode(chunk: np.ndarray) -> Any:
        data: Any = chunk
        for step in steps:
            data = step(data)
        return data

    return encode


class _KeyWriter:
    """Whole-object writes and deletes of a Zarr store's keys. Local folders: a temporary file
    renamed over the key, so a reader never sees half a shard (as zarr-python's LocalStore
    writes); anything else (object storage, whose puts are atomic per object): zarr's store API."""

    def __init__(self, store: Any):
        """``store``: a zarr store, or the path of a local store's folder."""
        self.store = store
        self.local = (os.path.join(store, "") if isinstance(store, str)
                      else os.path.join(store.root, "")
                      if isinstance(store, zarr.storage.LocalStore) else None)

    def put(self, key: str, parts: Sequence[Any]) -> None:
        if self.local is None:
            from zarr.core.buffer import default_buffer_prototype

            blob = b"".join(bytes(p) if not isinstance(p, bytes) else p for p in parts)
            zarr.core.sync.sync(self.store.set(
                key, default_buffer_prototype().buffer.from_bytes(blob)))
            return
        path = self.local + key
        os.makedirs(os.path.dirname(path), exist_ok=True)
        temp = f"{path}.{uuid.uuid4().hex}.partial"  # zarr-python's own LocalStore does so too
        try:
            with open(temp, "xb") as f:
                for part in parts:
                    f.write(part)
            os.replace(temp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise

    def delete(self, key: str) -> None:
        if self.local is None:
            zarr.core.sync.sync(self.store.delete(key))
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.local + key)


class _ArrayWriter:
    """Whole-shard (sharded arrays) or whole-chunk (plain arrays) writes of one array's rows,
    encoded here instead of by zarr-python's per-chunk pipeline, with the same bytes.

    Takes Zarr v3 arrays chunked by rows (every chunk spans all trailing dimensions), either
    sharded with one row per inner chunk or not sharded, whose chunk codecs `_chunk_encoder`
    knows (bytes or vlen-utf8 / vlen-bytes, then zstd and crc32c), with a sharding index of
    bytes and crc32c at either end. What zarr-python does, it does too: a chunk equal to the
    fill value is not stored unless the array writes empty chunks, a shard or chunk with
    nothing stored is deleted, rows past the array's end are left out of the last shard (a
    plain array's last chunk is padded with the fill value), and inner chunks are laid out in
    Morton order, which for one row per chunk is row order.
    """

    def __init__(self, metadata: Any, keys: _KeyWriter, path: str, plan: dict[str, Any]):
        self.metadata = metadata
        self.shape: tuple[int, ...] = tuple(metadata.shape)
        self.path = path
        self.plan = plan
        self._keys = keys
        self._fill_bytes: dict[tuple[int, ...], bytes] = {}  # an empty chunk, by shape

    @classmethod
    def of(cls, array: zarr.Array) -> _ArrayWriter | None:
        """A writer for an open array, or None when zarr-python must write it."""
        if array.metadata.zarr_format != 3:
            return None
        return cls.from_metadata(array.metadata, _KeyWriter(array.store_path.store),
                                 array.store_path.path,
                                 bool(array._async_array.config.write_empty_chunks))

    @classmethod
    def from_metadata(cls, metadata: Any, keys: _KeyWriter, path: str,
                      write_empty: bool) -> _ArrayWriter | None:
        """A writer for the array at ``path`` described by its (Zarr v3) metadata, or None
        when zarr-python must write it."""
        from zarr.codecs import ShardingCodec

        shape = tuple(metadata.shape)
        if len(shape) < 1:
            return None
        dtype = metadata.dtype.to_native_dtype()
        codecs = metadata.codecs
        rest = shape[1:]
        grid = tuple(getattr(metadata.chunk_grid, "chunk_shape", ()))  # the shard, if sharded
        if len(grid) != len(shape) or grid[1:] != rest:
            return None
        plan: dict[str, Any] = {"fill": metadata.fill_value, "write_empty": write_empty,
                                "dtype": dtype, "rows": int(grid[0])}
        if len(codecs) == 1 and isinstance(codecs[0], ShardingCodec):
            sharding = codecs[0]
            if tuple(sharding.chunk_shape) != (1, *rest):
                return None
            plan.update(
                sharded=True,
                encode=_chunk_encoder(sharding.codecs, dtype),
                # the index: (rows, 1, ..., 1, 2) uint64 offsets and lengths
                encode_index=_chunk_encoder(sharding.index_codecs, np.uint64),
                index_shape=(plan["rows"], *(1,) * len(rest), 2),
                at_start=sharding.index_location.value == "start")
            if plan["encode_index"] is None:
                return None
        elif any(isinstance(c, ShardingCodec) for c in codecs):
            return None
        else:
            plan.update(sharded=False, encode=_chunk_encoder(codecs, dtype))
        if plan["encode"] is None:
            return None
        return cls(metadata, keys, path, plan)

    def _is_fill(self, chunk: np.ndarray) -> bool:
        """zarr-python's test of an empty chunk (`NDBuffer.all_equal`). Where equal values
        are equal bytes (integers, and floats whose fill is 0, which zarr-python compares
        bit for bit), a byte comparison, cut short by the first byte: most rows are not
        empty, and zarr-python's test costs ~10 us a row."""
        fill = self.plan["fill"]
        dtype = chunk.dtype
        if dtype.kind in "biu" or (dtype.kind == "f" and fill == 0):
            data = np.ascontiguousarray(chunk).reshape(-1).view(np.uint8)
            empty = self._fill_bytes.get(chunk.shape)
            if empty is None:
                empty = self._fill_bytes[chunk.shape] = np.full(chunk.shape, fill, dtype) \
                    .tobytes()
            return data.size == 0 or (data[0] == empty[0] and data.tobytes() == empty)
        if dtype.kind == "O":  # vlen bytes or str: compared one value at a time, as numpy does
            return all(value == fill for value in chunk.reshape(-1))
        from zarr.core.buffer.cpu import NDBuffer

        return NDBuffer.from_numpy_array(chunk).all_equal(fill)

    def holds(self, block: int, values: np.ndarray) -> bool | None:
        """Whether chunk ``block`` of an unsharded array in a local folder is stored with
        ``values`` (not the fill value), read from its file: True when its bytes are those
        this writer writes for them, False when there is no such file; None when this cannot
        tell (ask zarr-python)."""
        local = self._keys.local
        if self.plan["sharded"] or local is None:
            return None
        try:
            with open(local + self._key(block), "rb") as f:
                stored = f.read()
        except FileNotFoundError:
            return False
        except OSError:
            return None
        return True if stored == bytes(self.plan["encode"](values)) else None

    def _key(self, block: int) -> str:
        chunk = self.metadata.encode_chunk_key((block,) + (0,) * (len(self.shape) - 1))
        return f"{self.path}/{chunk}".lstrip("/")

    def write(self, start: int, values: np.ndarray) -> None:
        """Rows ``[start, start + len(values))``: exactly one shard (or chunk), or what the
        array holds of its last one."""
        plan, n = self.plan, self.shape[0]
        block, offset = divmod(start, plan["rows"])
        stop = start + len(values)
        if offset or stop != min(start + plan["rows"], n):
            raise ValueError(f"rows {start}..{stop} of {self.path} are not one whole "
                             f"{'shard' if plan['sharded'] else 'chunk'} of {plan['rows']}")
        if values.dtype != object:
            values = np.asarray(values, dtype=plan["dtype"])
        if plan["sharded"]:
            self._write_shard(block, values)
        else:
            self._write_chunk(block, values)

    def _write_chunk(self, block: int, values: np.ndarray) -> None:
        plan = self.plan
        if len(values) < plan["rows"]:  # the array's last chunk: padded as zarr-python pads it
            padded = np.empty((plan["rows"], *values.shape[1:]), values.dtype)
            padded[...] = plan["fill"]
            padded[:len(values)] = values
            values = padded
        if not plan["write_empty"] and self._is_fill(values):
            self._keys.delete(self._key(block))
        else:
            self._keys.put(self._key(block), [plan["encode"](values)])

    def _write_shard(self, block: int, values: np.ndarray) -> None:
        plan = self.plan
        index = np.full(plan["index_shape"], _EMPTY_CHUNK, np.uint64)
        flat = index.reshape(plan["rows"], 2)  # a view: filling it fills the index
        parts: list[Any] = []
        position = 0
        for row in range(len(values)):
            chunk = values[row:row + 1]
            if not plan["write_empty"] and self._is_fill(chunk):
                continue
            blob = plan["encode"](chunk)
            length = memoryview(blob).nbytes
            flat[row] = (position, length)
            parts.append(blob)
            position += length
        if not parts:
            self._keys.delete(self._key(block))
            return
        encoded_index = plan["encode_index"](index)
        if plan["at_start"]:  # offsets count from the start of the shard, index included
            stored = flat[:, 0] != _EMPTY_CHUNK
            flat[stored, 0] += np.uint64(memoryview(encoded_index).nbytes)
            parts.insert(0, plan["encode_index"](index))  # again, with the offsets moved
        else:
            parts.append(encoded_index)
        self._keys.put(self._key(block), parts)


class _GroupForWrite:
    """The attributes and arrays of one group, opened for whole-shard writes.

    zarr-python opens an array in ~0.4 ms (a trip through its event loop, a store read and
    the metadata's parse), ~5 ms for the dozen arrays a shard writes. On a local folder this
    reads each ``zarr.json`` itself and parses it with zarr-python's own metadata class
    (~0.1 ms); anything else, and any array whose metadata it cannot take that way, goes
    through zarr-python.
    """

    def __init__(self, store_url: str, path: str):
        self.store_url, self.path = store_url, path
        self._group: zarr.Group | None = None
        self._local = _local_dir(store_url)
        self._keys = None if self._local is None else _KeyWriter(str(self._local))
        self.attrs: dict[str, Any] = {}
        raw = self._metadata(path)
        if raw is not None and raw.get("node_type") == "group":
            self.attrs = raw.get("attributes", {})
        else:
            self.attrs = dict(self.group.attrs)

    @property
    def group(self) -> zarr.Group:
        if self._group is None:
            self._group = _root(self.store_url)[self.path]
        return self._group

    def _metadata(self, path: str) -> dict[str, Any] | None:
        if self._local is None:
            return None
        try:
            with open(self._local / path / "zarr.json", "rb") as f:
                raw = json.loads(f.read())
        except (OSError, ValueError):
            return None
        return raw if isinstance(raw, dict) and raw.get("zarr_format") == 3 else None

    def array(self, key: str) -> _ArrayWriter | zarr.Array:
        """A writer of the array ``key``, or the array itself when zarr-python must write it."""
        from zarr.core.metadata.v3 import ArrayV3Metadata

        path = f"{self.path}/{key}"
        raw = self._metadata(path) if ENCODE_SHARDS_HERE else None
        if raw is not None and raw.get("node_type") == "array" and self._keys is not None:
            try:
                metadata = ArrayV3Metadata.from_dict(raw)
            except Exception:  # noqa: BLE001 - zarr-python then opens it, or says what is wrong
                metadata = None
            if metadata is not None:
                writer = _ArrayWriter.from_metadata(
                    metadata, self._keys, path, bool(zarr.config.get("array.write_empty_chunks")))
                if writer is not None:
                    return writer
        array = self.group[key]
        return (_ArrayWriter.of(array) or array) if ENCODE_SHARDS_HERE else array


# False: every shard write goes through zarr-python (the reference the tests compare with).
ENCODE_SHARDS_HERE = True


def _write_rows(array: _ArrayWriter | zarr.Array, start: int, values: np.ndarray) -> None:
    """Rows ``[start, start + len(values))`` of ``array``, one whole shard or chunk of it:
    encoded here when `_ArrayWriter` knows the array, else through zarr-python."""
    if isinstance(array, zarr.Array):
        writer = _ArrayWriter.of(array) if ENCODE_SHARDS_HERE else None
        if writer is None:
            array[start:start + len(values)] = values
            return
        array = writer
    array.write(start, values)


_DONE = np.ones(1, np.uint8)  # a shard's done flag, as written


def write_shard(store_url: str, name: str, version: str, shard: int,
                results: Sequence[ItemResult]) -> None:
    """Write all rows of one shard, then mark it done. The caller owns the whole shard."""
    ShardWriter(store_url, name, version).write(shard, results)


class ShardWriter:
    """Whole-shard writes into one dataset version, for a run of shards: its arrays are opened
    once (~4 ms a shard otherwise), and on a local folder a done flag is read from its file
    (~4 ms through zarr-python)."""

    def __init__(self, store_url: str, name: str, version: str):
        self.store_url, self.name, self.version = store_url, name, version
        g = _GroupForWrite(store_url, _version_path(name, version))
        self.layout = int(g.attrs.get("layout", 1))
        if self.layout < 2:
            raise StoreError(f"{name}/{version} has the padded layout {self.layout} of an "
                             "older version of this tool: it is read, not written; rerun its "
                             "ingest, which makes a new version")
        self.arrays = {key: g.array(key) for key in (
            "images", "masks", "original_masks", "index/status", "index/reason",
            "index/height", "index/width", "index/class_pixels", "shard_done")}
        if "resize" in g.attrs:  # versions made before index/box existed resume without it
            self.arrays["index/box"] = g.array("index/box")
        self.attrs = g.attrs

    def is_done(self, shard: int) -> bool:
        """`shard_is_done`, from the flag's own file where this writer can tell."""
        flags = self.arrays["shard_done"]
        known = flags.holds(shard, _DONE) if isinstance(flags, _ArrayWriter) else None
        return known if known is not None else shard_is_done(self.store_url, self.name,
                                                             self.version, shard)

    def write(self, shard: int, results: Sequence[ItemResult]) -> None:
        """Write all rows of one shard, then mark it done. The caller owns the whole shard."""
        name, version, arrays = self.name, self.version, self.arrays
        rows = int(self.attrs["shard_size"])
        start = shard * rows
        stop = start + len(results)
        n_rows = arrays["images"].shape[0]
        if stop > n_rows or (stop - start != rows and stop != n_rows):
            raise StoreError(f"shard {shard} of {name}/{version} must hold rows {start}..{stop}")
        n, s = len(results), int(self.attrs["size"])
        max_pixels = self.attrs["params"].get("max_pixels")
        n_classes = arrays["index/class_pixels"].shape[1]
        images = np.zeros((n, s, s, 3), np.uint8)
        masks = np.full((n, s, s), IGNORE_INDEX, np.uint8)
        originals = np.full(n, b"", dtype=object)  # compressed, one label at a time
        status = np.full(n, QUARANTINED, np.uint8)
        reasons = [r.reason for r in results]
        heights = np.zeros(n, np.int32)
        widths = np.zeros(n, np.int32)
        class_pixels = np.zeros((n, n_classes), np.int64)
        boxes = np.zeros((n, 4), np.int32)
        for i, r in enumerate(results):
            if not r.ok:
                continue
            h, w = r.original_mask.shape
            if max_pixels is not None and h * w > max_pixels:  # the header said less
                status[i], reasons[i] = QUARANTINED, (
                    f"label {w}x{h} has {h * w:,} pixels, over the limit of {max_pixels:,} "
                    "(max_pixels)")
                continue
            images[i], masks[i] = r.image, r.mask
            originals[i] = encode_original_mask(r.original_mask)
            heights[i], widths[i], status[i] = h, w, INGESTED
            boxes[i] = r.box if r.box is not None else (0, 0, s, s)
            class_pixels[i] = label_histogram(r.original_mask)[:n_classes]
        # Whole-shard writes: each call covers exactly one shard, so no read-modify-write races.
        columns = {"images": images, "masks": masks, "original_masks": originals,
                   "index/status": status, "index/reason": np.asarray(reasons, dtype=str),
                   "index/height": heights, "index/width": widths,
                   "index/class_pixels": class_pixels, "index/box": boxes}
        for key, values in columns.items():
            if key in arrays:
                _write_rows(arrays[key], start, values)
        _write_rows(arrays["shard_done"], shard, _DONE)  # last: the shard is done


def label_histogram(label: np.ndarray) -> np.ndarray:
    """(256,) int64: the pixels of each value of a uint8 label (Pillow's histogram: ~3x
    faster than ``np.bincount``, which widens every pixel to 64 bits first)."""
    from PIL import Image

    return np.asarray(Image.fromarray(np.ascontiguousarray(label, np.uint8)).histogram(),
                      np.int64)


def encode_original_mask(mask: np.ndarray) -> bytes:
    """One original-size label as stored in a layout-2 ``original_masks`` row."""
    return bytes(_BLOB_CODEC.encode(np.ascontiguousarray(mask, dtype=np.uint8)))


def decode_original_mask(blob: bytes, height: int, width: int, where: str = "") -> np.ndarray:
    """The (height, width) uint8 label of a layout-2 ``original_masks`` row."""
    raw = _BLOB_CODEC.decode(bytes(blob)) if len(blob) else b""
    if len(raw) != height * width:
        raise StoreError(f"{where or 'an original mask'}: {len(raw)} bytes stored for a "
                         f"{width}x{height} label: the version is damaged, rerun its ingest")
    return np.frombuffer(raw, np.uint8).reshape(height, width).copy()


def _layout(group: zarr.Group) -> int:
    return int(group.attrs.get("layout", 1))


def resize_mode(params: dict[str, Any]) -> str:
    """How a version's images reached the canonical square: "square" (stretched, the default
    and all that versions before the parameter knew) or "pad" (aspect kept, padded)."""
    return str(params.get("resize", "square"))


def _boxes(group: zarr.Group) -> np.ndarray:
    """(N, 4) int32 (top, left, height, width) of each image in the canonical square; the
    whole square in versions older than index/box (all stretched) and for rows not ingested."""
    n, s = int(group["index/status"].shape[0]), int(group.attrs["size"])
    full = np.tile(np.asarray([0, 0, s, s], np.int32), (n, 1))
    if "resize" not in group.attrs:
        return full
    boxes = group["index/box"][:]
    return np.where((boxes[:, 2:3] > 0) & (boxes[:, 3:4] > 0), boxes, full)


def _labelled(group: zarr.Group) -> np.ndarray:
    """(N,) bool: whether each row has a mask (all True in versions older than the flag)."""
    if "unlabelled" not in group.attrs:
        return np.ones(int(group["index/status"].shape[0]), bool)
    return group["index/labelled"][:].astype(bool)


def finalize_dataset(store_url: str, name: str, version: str) -> dict[str, Any]:
    """Record the version's summary and make it the dataset's latest; returns the summary."""
    root = _root(store_url)
    path = _version_path(name, version)
    g = _group_or_none(root, path)
    problems = ["it does not exist"] if g is None else version_problems(g)
    if problems:
        raise StoreError(f"dataset version {name}/{version} is damaged ({problems[0]}): "
                         "rerun its ingest to rebuild it")
    status = g["index/status"][:]
    done = g["shard_done"][:]
    summary = {
        "listed": int(status.size),
        "ingested": int((status == INGESTED).sum()),
        "quarantined": int((status == QUARANTINED).sum()),
        "pending": int((status == PENDING).sum()),
        "shards": int(done.size),
        "shards_done": int(done.sum()),
    }
    summary["complete"] = summary["shards_done"] == summary["shards"]
    unlabelled = int(((status == INGESTED) & ~_labelled(g)).sum())
    if unlabelled:  # of the ingested, images without a mask (layouts with unlabelled: true)
        summary["unlabelled"] = unlabelled
    # Attributes are written only when they change: a no-op rerun writes nothing, so it also
    # works on a read-only store.
    if g.attrs.get("summary") != summary:
        g.attrs["summary"] = summary
    if summary["complete"]:
        parent = root[f"{DATASETS}/{name}"]
        entry = {"params": g.attrs["params"], "summary": summary}
        if (parent.attrs.get("latest") != version
                or parent.attrs.get("versions", {}).get(version) != entry):
            with _dataset_lock(store_url, name):  # another version may be finalizing too
                versions = dict(parent.attrs.get("versions", {}))
                versions[version] = entry
                parent.attrs.update({"latest": version, "versions": versions})
    return summary


class _RowCache:
    """Byte-bounded LRU of decoded rows (and of whole shards read by `_RowReader.shard`).

    A row read from storage costs one ranged read and a decode (`_ShardedRows`), so the cache
    only saves that for rows read again; it is no longer what makes random reads affordable.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._blocks: OrderedDict[tuple[str, str, int], np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str, int], load: Callable[[], np.ndarray]) -> np.ndarray:
        if self.max_bytes <= 0:
            return load()
        with self._lock:
            block = self._blocks.get(key)
            if block is not None:
                self._blocks.move_to_end(key)
                return block
        block = load()
        with self._lock:
            if key not in self._blocks and block.nbytes <= self.max_bytes:
                self._blocks[key] = block
                self._bytes += block.nbytes
                while self._bytes > self.max_bytes:
                    _, old = self._blocks.popitem(last=False)
                    self._bytes -= old.nbytes
        return block


_EMPTY_CHUNK = 2**64 - 1  # a shard index entry (offset and length) of a chunk never written


class _ByteRanges:
    """Ranged reads of a Zarr store's keys, the cheapest way the store allows.

    Local folders: ``os.pread`` (~10 us). fsspec stores with a synchronous filesystem
    (``file://``, ``memory://``): that filesystem's ``cat_file`` (~60 us). Anything else
    (s3://, gs://, ...: network latency dominates there): zarr's own async store API.
    zarr-python's array reads cost ~1 ms per call however few bytes they need, which is why
    rows are not read through it (`_ShardedRows`).
    """

    def __init__(self, store: Any):
        self.store = store
        self._local: str | None = None  # a folder, with a trailing separator
        self._fs: Any = None
        if isinstance(store, zarr.storage.LocalStore):
            self._local = os.path.join(store.root, "")
        elif isinstance(store, zarr.storage.FsspecStore):
            fs = store.fs
            sync_fs = getattr(fs, "sync_fs", None)  # fsspec's AsyncFileSystemWrapper
            if sync_fs is not None or not getattr(fs, "async_impl", False):
                self._fs = sync_fs or fs

    def read(self, key: str, start: int | None = None, stop: int | None = None) -> bytes | None:
        """Bytes ``[start, stop)`` of ``key`` (a negative ``start`` counts from the end, None
        reads to the end); None when the key does not exist. Every row read of the store's
        readers comes through here (the label-accounting tests watch it)."""
        if self._local is not None:
            try:
                fd = os.open(self._local + key, os.O_RDONLY)
            except FileNotFoundError:
                return None
            try:
                if start is not None and start >= 0 and stop is not None:  # a row: no stat
                    return os.pread(fd, max(stop - start, 0), start)
                size = os.fstat(fd).st_size
                lo = 0 if start is None else (max(size + start, 0) if start < 0 else start)
                hi = size if stop is None else min(stop, size)
                return os.pread(fd, max(hi - lo, 0), lo)
            finally:
                os.close(fd)
        if self._fs is not None:
            try:
                return self._fs.cat_file(f"{self.store.path}/{key}", start=start, end=stop)
            except FileNotFoundError:
                return None
        from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
        from zarr.core.buffer import default_buffer_prototype

        byte_range = (None if start is None else SuffixByteRequest(-start) if start < 0
                      else OffsetByteRequest(start) if stop is None
                      else RangeByteRequest(start, stop))
        buf = zarr.core.sync.sync(self.store.get(key, default_buffer_prototype(), byte_range))
        return None if buf is None else buf.to_bytes()


class _ShardedRows:
    """Reads of rows of one array chunked by row and sharded by rows (Zarr v3 sharding).

    A row is one inner chunk of its shard: its offset and length come from the shard's index
    (read once per shard and kept: a shard is written whole, once, before its done flag), and
    the row is one ranged read of exactly those bytes plus its decode. A whole shard is one
    read. The layout is read as the Zarr v3 sharding spec defines it (the index of
    (offset, length) uint64 pairs, at the start or end, optionally crc32c-checked); arrays
    whose codecs this does not decode (not sharded by rows, variable-length bytes, codecs
    other than zstd) are read through zarr-python, which gives the same values.
    """

    def __init__(self, array: zarr.Array, ranges: _ByteRanges, where: str):
        self.array = array
        self.where = where
        self.n_rows = int(array.shape[0])
        self._ranges = ranges
        self._index: dict[int, np.ndarray] = {}
        self._keys: dict[int, str] = {}
        self._plan = self._decodable(array)

    @staticmethod
    def _decodable(array: zarr.Array) -> dict[str, Any] | None:
        from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec

        codecs = array.metadata.codecs if array.metadata.zarr_format == 3 else ()
        if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
            return None
        sharding = codecs[0]
        row_shape = tuple(array.shape[1:])
        if tuple(sharding.chunk_shape) != (1, *row_shape) or array.shards is None \
                or tuple(array.shards[1:]) != row_shape:
            return None
        inner = list(sharding.codecs)
        if not inner or not isinstance(inner[0], BytesCodec) or any(
                not isinstance(c, ZstdCodec) for c in inner[1:]) or len(inner) > 2:
            return None
        index_codecs = list(sharding.index_codecs)
        if not index_codecs or not isinstance(index_codecs[0], BytesCodec) or any(
                not isinstance(c, Crc32cCodec) for c in index_codecs[1:]):
            return None
        try:
            dtype = np.dtype(array.dtype)
        except TypeError:
            return None
        if dtype.hasobject:
            return None
        endian = inner[0].endian
        if endian is not None and dtype.itemsize > 1:
            dtype = dtype.newbyteorder("<" if endian.value == "little" else ">")
        rows = int(array.shards[0])
        return {"dtype": dtype, "row_shape": row_shape, "rows": rows,
                "zstd": len(inner) == 2, "crc32c": len(index_codecs) == 2,
                "index_bytes": 16 * rows + 4 * (len(index_codecs) == 2),
                "at_end": sharding.index_location.value == "end",
                "fill": np.full(row_shape, array.fill_value, dtype)}

    def _key(self, shard: int) -> str:
        key = self._keys.get(shard)
        if key is None:
            chunk = self.array.metadata.encode_chunk_key((shard,) + (0,) * (self.array.ndim - 1))
            key = self._keys[shard] = f"{self.array.store_path.path}/{chunk}".lstrip("/")
        return key

    def _parse_index(self, raw: bytes, shard: int) -> np.ndarray:
        plan = self._plan
        if len(raw) != plan["index_bytes"]:
            raise StoreError(f"{self.where}: shard {shard} is truncated: rerun the stage that "
                             "wrote it")
        if plan["crc32c"]:
            import google_crc32c  # zarr's own checksum dependency

            if google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
                raise StoreError(f"{self.where}: shard {shard}'s index fails its checksum: "
                                 "rerun the stage that wrote it")
            raw = raw[:-4]
        return np.frombuffer(raw, "<u8").reshape(plan["rows"], 2)

    def _shard_index(self, shard: int) -> np.ndarray | None:
        index = self._index.get(shard)
        if index is None:
            n = self._plan["index_bytes"]
            raw = self._ranges.read(self._key(shard), -n if self._plan["at_end"] else 0,
                                    None if self._plan["at_end"] else n)
            if raw is None:
                return None  # never written (all fill), or not yet: not kept
            index = self._index[shard] = self._parse_index(raw, shard)
        return index

    def _decode(self, blob: bytes) -> np.ndarray:
        plan = self._plan
        if plan["zstd"]:  # into a buffer of the row's size: saves a third of the decode
            out = np.empty(plan["row_shape"], plan["dtype"])
            _BLOB_CODEC.decode(blob, out=out.reshape(-1).view(np.uint8))
            return out
        return np.frombuffer(blob, plan["dtype"]).reshape(plan["row_shape"])

    def row(self, row: int) -> np.ndarray:
        """One row (read-only when it came from storage; copy it to modify it)."""
        if not 0 <= row < self.n_rows:
            raise IndexError(f"{self.where}: row {row} outside 0..{self.n_rows - 1}")
        if self._plan is None:
            return self.array[row:row + 1][0]  # a slice: see Dataset.original_mask
        shard, offset = divmod(row, self._plan["rows"])
        index = self._shard_index(shard)
        if index is None or int(index[offset, 0]) == _EMPTY_CHUNK:
            return self._plan["fill"]
        start, length = (int(v) for v in index[offset])
        blob = self._ranges.read(self._key(shard), start, start + length)
        if blob is None or len(blob) != length:
            raise StoreError(f"{self.where}: row {row} could not be read whole")
        return self._decode(blob)

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of one shard, with one read of the shard."""
        if self._plan is None:
            return self.array[start:stop]
        shard = start // self._plan["rows"]
        if stop > min((shard + 1) * self._plan["rows"], self.n_rows) or start >= stop:
            raise ValueError(f"{self.where}: rows {start}..{stop} are not within one shard")
        out = np.empty((stop - start, *self._plan["row_shape"]), self._plan["dtype"])
        blob = self._ranges.read(self._key(shard))
        if blob is None:
            out[...] = self._plan["fill"]
            return out
        n = self._plan["index_bytes"]
        at_end = self._plan["at_end"]
        index = self._parse_index(blob[-n:] if at_end else blob[:n], shard)
        self._index.setdefault(shard, index)
        base = start - shard * self._plan["rows"]
        for k in range(stop - start):
            offset, length = (int(v) for v in index[base + k])
            out[k] = (self._plan["fill"] if offset == _EMPTY_CHUNK
                      else self._decode(blob[offset:offset + length]))
        return out


class _RowReader:
    """The one reading mechanism of `Dataset`, `Derived` and `UnlabelledImages`: rows and
    whole shards of the arrays of one group, by key, through `_ShardedRows` and one
    `_RowCache`. An array is opened on its first read, so a reader never touches an array it
    is not asked for; ``allowed`` limits the keys it will read at all (label accounting)."""

    def __init__(self, group: zarr.Group, shard_size: int, cache_bytes: int, where: str,
                 allowed: Sequence[str] | None = None):
        self.group = group
        self.shard_size = shard_size
        self.where = where
        self.allowed = None if allowed is None else frozenset(allowed)
        self._cache = _RowCache(cache_bytes)
        self._ranges = _ByteRanges(group.store_path.store)
        self._arrays: dict[str, _ShardedRows] = {}

    def array(self, key: str) -> _ShardedRows:
        """The reader of one array, opened (its metadata read) on first use."""
        if self.allowed is not None and key not in self.allowed:
            raise StoreError(f"{self.where}: {key!r} is not readable here (only "
                             f"{sorted(self.allowed)})")
        rows = self._arrays.get(key)
        if rows is None:
            rows = self._arrays[key] = _ShardedRows(self.group[key], self._ranges,
                                                     f"{self.where} {key}")
        return rows

    def row(self, key: str, row: int) -> np.ndarray:
        """One row of ``key`` (cached; do not modify the result)."""
        return self._cache.get((key, "row", row), lambda: self.array(key).row(row))

    def shard(self, key: str, shard: int) -> np.ndarray:
        """All rows of one shard of ``key`` (cached; do not modify the result)."""
        start = shard * self.shard_size
        reader = self.array(key)
        stop = min(start + self.shard_size, reader.n_rows)
        return self._cache.get((key, "shard", shard), lambda: reader.rows(start, stop))


class Dataset:
    """Read API of one dataset version: ids, images, masks, labels at original size, index."""

    def __init__(self, group: zarr.Group, cache_bytes: int):
        attrs = group.attrs
        self.group = group
        self.name: str = attrs["name"]
        self.version: str = attrs["version"]
        self.size: int = int(attrs["size"])
        self.shard_size: int = int(attrs["shard_size"])
        self.classes: list[str] = list(attrs["classes"])
        self.source_ids: list[int] = list(attrs["source_ids"])
        self.params: dict[str, Any] = dict(attrs["params"])
        self.fingerprint: str = attrs["fingerprint"]
        self.summary: dict[str, Any] = dict(attrs.get("summary", {}))
        idx = {k: group[f"index/{k}"][:] for k in
               ("id", "split", "source_path", "status", "reason", "height", "width")}
        import pandas as pd

        self.index = pd.DataFrame({k: np.asarray(v) for k, v in idx.items()})
        self.index["id"] = self.index["id"].astype(str)
        _require_unique_ids(self.index["id"].to_numpy(), f"dataset {self.name}/{self.version}")
        ok = self.index["status"].to_numpy() == INGESTED
        self._rows = np.flatnonzero(ok)
        self.ids: list[str] = self.index["id"].to_numpy()[ok].tolist()
        self.index["labelled"] = _labelled(group)
        # Ingested without a mask: images for the label-free stages, never labelled samples.
        self.unlabelled_ids: list[str] = self.index["id"].to_numpy()[
            ok & ~self.index["labelled"].to_numpy()].tolist()
        self._row_of = {i: int(r) for i, r in zip(self.ids, self._rows, strict=True)}
        self._reader = _RowReader(group, self.shard_size, cache_bytes,
                                  f"{self.name}/{self.version}")
        self._sizes = self.index[["height", "width"]].to_numpy()
        self.resize: str = resize_mode(self.params)
        self._boxes = _boxes(group)
        self._layout = _layout(group)

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, version={self.version!r}, images={len(self)}, "
                f"classes={len(self.classes) - 1}, size={self.size})")

    @functools.cached_property
    def class_pixels(self) -> np.ndarray:
        """(rows, classes) pixel counts at original resolution: label statistics, so read only
        when asked for (label-free stages open datasets too)."""
        return self.group["index/class_pixels"][:]

    @property
    def quarantine(self) -> pd.DataFrame:
        """Items that were listed but not ingested, with their source path and reason."""
        q = self.index[self.index["status"] == QUARANTINED]
        return q[["id", "split", "source_path", "reason"]].reset_index(drop=True)

    def split_ids(self, split: str, *, unlabelled: bool = False) -> list[str]:
        """The ingested images of ``split`` that have a mask (with ``unlabelled``, also those
        ingested without one, for label-free uses such as pseudo episodes)."""
        rows = self.index.iloc[self._rows]
        keep = rows["split"] == split
        if not unlabelled:
            keep &= rows["labelled"]
        return rows.loc[keep, "id"].tolist()

    def row(self, image_id: str) -> int:
        try:
            return self._row_of[str(image_id)]
        except KeyError:
            raise KeyError(f"{image_id!r} is not an ingested image of {self.name}") from None

    def pixels(self, image_id: str) -> np.ndarray:
        """Per-class pixel counts at original resolution."""
        return self.class_pixels[self.row(image_id)]

    def image(self, image_id: str) -> np.ndarray:
        """(S, S, 3) uint8: one ranged read of this image's bytes (`_ShardedRows`)."""
        return self._reader.row("images", self.row(image_id)).copy()

    def mask(self, image_id: str) -> np.ndarray:
        """(S, S) uint8 class ids, 255 = ignore: one ranged read and a zstd decode."""
        return self._reader.row("masks", self.row(image_id)).copy()

    def original_mask(self, image_id: str) -> np.ndarray:
        """(h, w) uint8: the label at its own original size. Reads and decodes this one row
        (layout 2), so memory follows this label, whatever the other images' sizes."""
        row = self.row(image_id)
        h, w = (int(v) for v in self._sizes[row])
        if self._layout < 2:  # padded to the dataset's largest image
            return self._reader.row("original_masks", row)[:h, :w].copy()
        # Variable-length bytes (read through zarr-python, as a slice: `_ShardedRows.row`),
        # not cached: evaluation reads each once.
        blob = self._reader.array("original_masks").row(row)
        return decode_original_mask(blob, h, w,
                                    f"{self.name}/{self.version} original mask of {image_id!r}")

    def box(self, image_id: str) -> tuple[int, int, int, int]:
        """``(top, left, height, width)`` of the image inside its canonical square: the whole
        square, or with resize "pad" the part that is not padding. Crop logits to it before
        upsampling them to ``original_mask``'s size (`tasks.fewshot.metrics.upsample_logits_to`)."""
        top, left, h, w = self._boxes[self.row(image_id)]
        return int(top), int(left), int(h), int(w)


class LabelAccessError(AttributeError):
    """Pretraining asked for something label-bearing (masks, class pixel counts, the index)."""


class UnlabelledImages:
    """The images of one dataset version, with ids and splits, and no way to reach a label.

    Label-free stages (self-supervised pretraining) read through this view.

    Only ``ids``, ``split_ids``, ``image``, ``name``, ``version`` and ``size`` exist; any other
    attribute (``mask``, ``original_mask``, ``pixels``, ``class_pixels``, ``index``, ...) raises
    `LabelAccessError`. Opens the arrays ``images`` and ``index/{id,split,status}`` only.
    """

    _ARRAYS = ("images", "index/id", "index/split", "index/status")

    def __init__(self, store_url: str, name: str, version: str | None = None, *,
                 cache_bytes: int = 1 << 30) -> None:
        version = resolve_version(store_url, name, version)
        group = _root(store_url, mode="r")[_version_path(name, version)]
        _require_sound(group, name, version, keys=self._ARRAYS)
        self.name, self.version = name, version
        self.size = int(group.attrs["size"])
        # Reads "images" only: any other key is refused before it is opened.
        self._reader = _RowReader(group, int(group.attrs["shard_size"]), cache_bytes,
                                  f"{name}/{version}", allowed=("images",))
        ok = group["index/status"][:] == INGESTED
        rows = np.flatnonzero(ok)
        all_ids = group["index/id"][:]
        _require_unique_ids(all_ids, f"dataset {name}/{version}")
        self.ids: list[str] = [str(i) for i in all_ids[ok]]
        self._split = {i: str(s) for i, s in zip(self.ids, group["index/split"][:][ok],
                                                  strict=True)}
        self._row = dict(zip(self.ids, rows.tolist(), strict=True))

    def __getattr__(self, name: str) -> Any:
        raise LabelAccessError(f"pretraining sees no labels: {type(self).__name__} has no {name!r}")

    def __len__(self) -> int:
        return len(self.ids)

    def split_ids(self, split: str) -> list[str]:
        return [i for i in self.ids if self._split[i] == split]

    def image(self, image_id: str) -> np.ndarray:
        """(S, S, 3) uint8: one ranged read of this image's bytes (`_ShardedRows`)."""
        return self._reader.row("images", self._row[image_id]).copy()


def open_dataset(store_url: str, name: str, version: str | None = None, *,
                 cache_bytes: int = 1 << 30, storage_options: dict | None = None) -> Dataset:
    """Open a dataset (its latest complete version unless one is named)."""
    version = resolve_version(store_url, name, version, storage_options=storage_options)
    group = _root(store_url, mode="r", storage_options=storage_options)[
        _version_path(name, version)]
    _require_sound(group, name, version)
    return Dataset(group, cache_bytes)


def _require_sound(group: zarr.Group, name: str, version: str,
                   keys: Sequence[str] | None = None) -> None:
    problems = version_problems(group, keys)
    if problems:
        raise StoreError(f"dataset version {name}/{version} is damaged ({problems[0]}): "
                         "rerun its ingest to rebuild it")


def list_datasets(store_url: str) -> list[str]:
    root = _root(store_url, mode="r")
    if DATASETS not in root:
        return []
    return sorted(k for k, _ in root[DATASETS].groups())


def _nbytes(root: zarr.Group, prefix: str) -> int:
    return int(zarr.core.sync.sync(root.store.getsize_prefix(prefix)))


def inspect_store(store_url: str) -> dict[str, Any]:
    """A json-able description of every dataset version in the store."""
    root = _root(store_url, mode="r")
    out: dict[str, Any] = {"store": store_url, "datasets": {}}
    for name in list_datasets(store_url):
        parent = root[f"{DATASETS}/{name}"]
        versions = {}
        for version, g in sorted(parent.groups()):
            a = g.attrs
            status = g["index/status"][:]
            split = g["index/split"][:]
            reason = g["index/reason"][:]
            paths = g["index/source_path"][:]
            q = np.flatnonzero(status == QUARANTINED)
            bare = (status == INGESTED) & ~_labelled(g)
            versions[version] = {
                "latest": parent.attrs.get("latest") == version,
                "params": a.get("params", {}),
                "size": a.get("size"),
                "resize": resize_mode(a.get("params", {})),
                "classes": a.get("classes", []),
                "listed": int(status.size),
                "ingested": int((status == INGESTED).sum()),
                "quarantined": int(q.size),
                "pending": int((status == PENDING).sum()),
                "splits": {str(s): int(((split == s) & (status == INGESTED)).sum())
                           for s in np.unique(split)},
                # of the ingested images above, those without a mask
                "unlabelled": {str(s): int((bare & (split == s)).sum())
                               for s in np.unique(split) if (bare & (split == s)).any()},
                "quarantine": [{"path": str(paths[i]), "reason": str(reason[i])} for i in q],
                "bytes": {k: _nbytes(root, f"{DATASETS}/{name}/{version}/{k}")
                          for k in ("images", "masks", "original_masks", "index")},
            }
        out["datasets"][name] = versions
    return out


# ---------------------------------------------------------------------------------------------
# Shard-level reads of a dataset version, for stages that must not touch more than they need
# (features and clustering read images and the index only, never a label array).

_ROW_ARRAYS = ("images", "masks")  # original masks are ragged: `Dataset.original_mask`
_INDEX_COLUMNS = ("id", "split", "status", "height", "width")


def resolve_version(store_url: str, name: str, version: str | None = None, *,
                    storage_options: dict | None = None) -> str:
    """The named version, checked to exist as a group, or the dataset's latest complete one."""
    root = _root(store_url, mode="r", storage_options=storage_options)
    path = f"{DATASETS}/{validate_name(name)}"
    if path not in root:
        known = ", ".join(sorted(k for k, _ in root[DATASETS].groups())) \
            if DATASETS in root else ""
        raise StoreError(f"no dataset {name!r} in {store_url} (datasets: {known or 'none'})")
    version = version or root[path].attrs.get("latest")
    if version is None:
        raise StoreError(f"dataset {name!r} has no completed version yet: rerun its ingest")
    if _group_or_none(root, f"{path}/{version}") is None:
        raise StoreError(f"dataset {name!r} has no version {version!r}")
    return version


def dataset_attrs(store_url: str, name: str, version: str) -> dict[str, Any]:
    """A dataset version's attributes: size, shard_size, classes, params, ..."""
    return dict(_root(store_url, mode="r")[_version_path(name, version)].attrs)


def read_index(store_url: str, name: str, version: str, shard: int | None = None) -> pd.DataFrame:
    """Id, split, status and original size of every listed row, or of one shard's rows.

    Row-aligned (index = row number); per-class label counts are deliberately not included.
    """
    g = _root(store_url, mode="r")[_version_path(name, version)]
    rows = slice(None)
    if shard is not None:
        size = int(g.attrs["shard_size"])
        rows = slice(shard * size, (shard + 1) * size)
    import pandas as pd

    df = pd.DataFrame({k: np.asarray(g[f"index/{k}"][rows]) for k in _INDEX_COLUMNS})
    df["id"] = df["id"].astype(str)
    df.index = np.arange(df.shape[0]) + (rows.start or 0)
    return df


def read_dataset_shard(store_url: str, name: str, version: str, array: str,
                       shard: int) -> np.ndarray:
    """All rows of one shard of ``images`` or ``masks`` (one whole read). Original-size
    masks are read one at a time (`Dataset.original_mask`): a shard of them is as large as
    its largest image."""
    if array not in _ROW_ARRAYS:
        raise ValueError(f"unknown dataset array {array!r}; known: {_ROW_ARRAYS} (original "
                         "masks: Dataset.original_mask, one at a time)")
    g = _root(store_url, mode="r")[_version_path(name, version)]
    reader = _RowReader(g, int(g.attrs["shard_size"]), 0, f"{name}/{version}",
                        allowed=(array,))
    return reader.shard(array, shard)


# ---------------------------------------------------------------------------------------------
# Derived arrays: per-image outputs of later stages, stored under the dataset version.

DERIVED = "derived"
_KIND = re.compile(r"[a-z][a-z0-9_]{0,31}")  # fullmatch, like the names
_KEY = re.compile(r"([a-z][a-z0-9_]{0,31})-([0-9a-f]{12})")


@dataclass(frozen=True)
class DerivedField:
    """One row-aligned array of a derived group: ``(N, *shape)`` of ``dtype``."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    fill: int | float = 0
    compress: bool = False  # zstd pays off for label-like arrays, not for float features

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype,
                "fill": self.fill, "compress": self.compress}


def _check_kind(kind: str, what: str = "derived kind") -> str:
    if not _KIND.fullmatch(kind):
        raise ValueError(f"invalid {what} {kind!r}: lowercase letters, digits and '_', "
                         "starting with a letter, at most 32 characters")
    return kind


def derived_key(kind: str, params: dict[str, Any]) -> str:
    """``<kind>-<hash of params>``: the same stage with the same inputs gets the same key."""
    blob = json.dumps({"layout": DERIVED_LAYOUT_VERSION, "kind": _check_kind(kind),
                       "params": params}, sort_keys=True)
    return f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def _derived_path(name: str, version: str, key: str) -> str:
    if not _KEY.fullmatch(key):
        raise ValueError(f"invalid derived key {key!r}: expected <kind>-<12 hex digits>")
    return f"{_version_path(name, version)}/{DERIVED}/{key}"


def create_derived(store_url: str, name: str, version: str, kind: str, params: dict[str, Any],
                   fields: Sequence[DerivedField], *, extra: dict[str, np.ndarray] | None = None,
                   attrs: dict[str, Any] | None = None) -> tuple[str, bool]:
    """Create a derived group row-aligned with the dataset; a no-op when it already exists.

    ``extra`` holds small whole arrays written now (e.g. cluster centres); ``attrs`` more
    json-able attributes. Returns the key and whether the group was created now. Only the
    orchestrating process calls this, before any shard writer starts; a group that exists but
    does not verify is rebuilt.
    """
    key = derived_key(kind, params)
    root = _root(store_url)
    ds = root[_version_path(name, version)]
    path = _derived_path(name, version, key)
    existing = _group_or_none(root, path)
    if existing is not None and existing.attrs.get("created"):
        if existing.attrs["params"] != json.loads(json.dumps(params)):
            raise StoreError(f"derived group {key} exists with other parameters")
    if not fields:
        raise ValueError("a derived group needs at least one field")
    for f in fields:
        _check_kind(f.name, "field name")
    for k in extra or {}:
        _check_kind(k, "extra array name")
    n, rows = ds["index/id"].shape[0], int(ds.attrs["shard_size"])
    n_shards = len(shard_bounds(n, rows))

    def build(g: zarr.Group) -> None:
        for f in fields:
            codec = _MASK_CODEC if f.compress else None
            g.create_array(f.name, shape=(n, *f.shape), dtype=f.dtype, chunks=(1, *f.shape),
                           shards=(rows, *f.shape), fill_value=f.fill, compressors=codec)
        for k, value in (extra or {}).items():
            value = np.asarray(value)
            g.create_array(f"extra/{k}", shape=value.shape, dtype=value.dtype,
                           chunks=value.shape or None)[...] = value
        g.create_array("shard_done", shape=(n_shards,), dtype="uint8", chunks=(1,),
                       fill_value=0)
        g.attrs.update({
            **(attrs or {}),
            "layout": DERIVED_LAYOUT_VERSION,
            "kind": kind,
            "key": key,
            "dataset": {"name": name, "version": version},
            "params": params,
            "fields": [f.to_dict() for f in fields],
            "primary": fields[0].name,
            "shard_size": rows,
            "n_rows": n,
            "complete": False,
            "created": True,  # last: without it the group does not verify and is rebuilt
        })

    # Built under a temporary name and renamed into place (local stores), like a version.
    return key, _create_group(store_url, path, build, _derived_problems)


def write_derived_shard(store_url: str, name: str, version: str, key: str, shard: int,
                        values: dict[str, np.ndarray]) -> None:
    """Write every field of one shard, then mark it done. The caller owns the whole shard."""
    g = _GroupForWrite(store_url, _derived_path(name, version, key))
    fields = {f["name"]: f for f in g.attrs["fields"]}
    if set(values) != set(fields):
        raise StoreError(f"shard {shard} of {key} needs fields {sorted(fields)}, "
                         f"got {sorted(values)}")
    start, stop = shard_bounds(int(g.attrs["n_rows"]), int(g.attrs["shard_size"]))[shard]
    arrays = {}
    for field_name, f in fields.items():
        value = np.asarray(values[field_name])
        expected = (stop - start, *f["shape"])
        if value.shape != expected:
            raise StoreError(f"{key}/{field_name} shard {shard}: shape {value.shape}, "
                             f"expected {expected}")
        arrays[field_name] = value.astype(f["dtype"], copy=False)
    # Whole-shard writes: each call covers exactly one shard, so no read-modify-write races.
    for field_name, value in arrays.items():
        _write_rows(g.array(field_name), start, value)
    _write_rows(g.array("shard_done"), shard, np.ones(1, np.uint8))  # last: the shard is done


def finalize_derived(store_url: str, name: str, version: str, key: str,
                     attrs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Record the group's summary (and more attrs); ``complete`` once every shard is done."""
    g = _root(store_url)[_derived_path(name, version, key)]
    done = g["shard_done"][:]
    summary = {"shards": int(done.size), "shards_done": int(done.sum())}
    summary["complete"] = summary["shards_done"] == summary["shards"]
    g.attrs.update({**(attrs or {}), "summary": summary, "complete": summary["complete"]})
    return summary


def derived_attrs(store_url: str, name: str, version: str, key: str) -> dict[str, Any]:
    """A derived group's attributes: kind, params, fields, summary, and what its stage added."""
    root = _root(store_url, mode="r")
    path = _derived_path(name, version, key)
    if path not in root or not root[path].attrs.get("created"):
        raise StoreError(f"no derived group {key!r} in {name}/{version}")
    return dict(root[path].attrs)


def list_derived(store_url: str, name: str, version: str | None = None,
                 kind: str | None = None) -> dict[str, dict[str, Any]]:
    """Attributes of every derived group of a dataset version (of one kind if given)."""
    version = resolve_version(store_url, name, version)
    root = _root(store_url, mode="r")
    path = f"{_version_path(name, version)}/{DERIVED}"
    if path not in root:
        return {}
    return {key: dict(g.attrs) for key, g in sorted(root[path].groups())
            if g.attrs.get("created") and (kind is None or g.attrs.get("kind") == kind)}


class Derived:
    """Read API of one derived group: rows by image id, whole shards, whole fields, extras."""

    def __init__(self, group: zarr.Group, ids: np.ndarray, status: np.ndarray,
                 cache_bytes: int):
        attrs = group.attrs
        self.group = group
        self.key: str = attrs["key"]
        self.kind: str = attrs["kind"]
        self.params: dict[str, Any] = dict(attrs["params"])
        self.attrs: dict[str, Any] = dict(attrs)
        self.fields: list[str] = [f["name"] for f in attrs["fields"]]
        self.primary: str = attrs["primary"]
        self.shard_size: int = int(attrs["shard_size"])
        self.n_rows: int = int(attrs["n_rows"])
        self.complete: bool = bool(attrs.get("complete"))
        _require_unique_ids(ids, f"derived group {self.key}")
        ok = status == INGESTED
        self.ids: list[str] = ids[ok].tolist()
        self._row_of = {i: int(r) for i, r in zip(self.ids, np.flatnonzero(ok), strict=True)}
        self._reader = _RowReader(group, self.shard_size, cache_bytes,
                                  f"derived group {self.key}", allowed=self.fields)

    def __repr__(self) -> str:
        return f"Derived({self.key!r}, fields={self.fields}, complete={self.complete})"

    @property
    def n_shards(self) -> int:
        return len(shard_bounds(self.n_rows, self.shard_size))

    def row(self, image_id: str) -> int:
        try:
            return self._row_of[str(image_id)]
        except KeyError:
            raise KeyError(f"{image_id!r} is not an ingested image of this dataset") from None

    def shard(self, shard: int, field_name: str | None = None) -> np.ndarray:
        """All rows of one shard of a field (cached; do not modify the result)."""
        return self._reader.shard(field_name or self.primary, shard)

    def get(self, image_id: str, field_name: str | None = None) -> np.ndarray:
        """One image's row of a field (the group's primary field by default): one ranged
        read of that row's bytes."""
        return self._reader.row(field_name or self.primary, self.row(image_id)).copy()

    def read(self, field_name: str) -> np.ndarray:
        """A whole field, row-aligned with the dataset (for small per-image tables)."""
        return self.group[field_name][:]

    def extra(self, name: str) -> np.ndarray:
        return self.group[f"extra/{name}"][...]


def open_derived(store_url: str, name: str, key: str, version: str | None = None, *,
                 cache_bytes: int = 256 << 20, storage_options: dict | None = None) -> Derived:
    """Open a derived group of a dataset version (the latest complete one unless named)."""
    version = resolve_version(store_url, name, version, storage_options=storage_options)
    root = _root(store_url, mode="r", storage_options=storage_options)
    path = _derived_path(name, version, key)
    if path not in root or not root[path].attrs.get("created"):
        known = ", ".join(list_derived(store_url, name, version)) or "none"
        raise StoreError(f"no derived group {key!r} in {name}/{version} (known: {known})")
    index = read_index(store_url, name, version)
    return Derived(root[path], index["id"].to_numpy(), index["status"].to_numpy(), cache_bytes)
