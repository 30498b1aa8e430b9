"""Bring your own dataset: a YAML layout file and the reader that follows it.

A layout file says where a dataset's images and masks are and what its label values mean
(in the spirit of mmsegmentation's custom datasets and Ultralytics' ``data.yaml``)::

    root: /data/streets                  # relative paths resolve against this file's folder
    images: "{split}/images/{stem}.jpg"  # patterns with {split} and {stem}
    masks: "{split}/labels/{stem}.png"
    splits: [train, val, test]
    classes: [sky, building, road, car]  # label value i is classes[i]
    background: null                     # the background class's name, or null
    ignore: [11]                         # label values that mean "not annotated"

and optionally ``palette: {name: [r, g, b]}`` (colour-coded RGB masks; ``ignore`` then lists
colours), ``remap: {value: name | ignore}`` (label values that are not ``classes`` indices,
e.g. mmsegmentation's ``reduce_zero_label``: ``{0: ignore, 1: sky, 2: building, ...}``) and
``unlabelled: true`` (images without a mask file are ingested without labels instead of being
quarantined) and ``orientation: exif | stored`` (below).

Orientation: a photo's EXIF orientation tag says how viewers turn its stored pixels to show
it, and a mask (a PNG, no EXIF) is drawn on one of the two. ``orientation: exif`` (the default:
annotation tools in browsers and labelme show photos turned) applies the tag to the image
(Pillow's ``ImageOps.exif_transpose``) and takes the mask as drawn on the turned image.
When the tag exchanges width and height and the mask has the *stored* image's size instead,
the mask was drawn on the stored pixels: the item is quarantined with that reason and the
hint ``orientation: stored``, never silently turned (a tag that keeps the size, a 180° turn
say, cannot be checked that way, so a dataset whose tool worked on stored pixels must say
so). ``orientation: stored`` ignores the tag (what ``cv2.imread`` does, and what VOC and COCO
need).

Store class ids (the store's convention is class 0 = background, 255 = ignore):

* ``background: null``: label value i (``classes[i]``) becomes store id i + 1; store id 0 is an
  empty slot named ``(none)`` that holds no pixel, so in an episode "background" is exactly
  "every class that is not an episode class", as for any dataset.
* ``background: <name>``: that class becomes store id 0 and the others keep their order as
  ids 1, 2, ...
* ``ignore`` values, ``remap`` to ``ignore``, and the value 255 become 255; any other value is
  an unknown label and quarantines its mask with the values named.

The file is validated by a pydantic model (unknown keys refused); every error names the file,
the key and the value.
"""

from __future__ import annotations

import os
import re
import string
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from models.conventions import IGNORE_INDEX
from tasks.data.readers import (
    MAX_CLASSES,
    ORIENTATIONS,
    SWAPS_SIDES,
    BadItem,
    DatasetError,
    FileFacts,
    Item,
    Reader,
    _decode,
    _inside,
    _rel,
    _to_rgb,
    exif_orientation,
    scan_files,
)

NO_BACKGROUND = "(none)"  # the name of store class 0 when every class of the source is real
IGNORE_NAME = "ignore"  # a remap target that means "not annotated"
MAX_LABEL_VALUE = 65535  # 16-bit grayscale masks
# Modes whose pixels are label values (palette indices, 8/16/32-bit grayscale, 1-bit).
VALUE_MODES = ("P", "L", "1", "I", "I;16")
COLOUR_MODES = ("RGB", "RGBA", "P")


class LayoutError(DatasetError):
    """The layout file is missing, is not YAML, or breaks a rule: names the file and the key."""


class Layout(BaseModel):
    """The keys of a layout file (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    root: str = "."
    images: str
    masks: str
    splits: list[str] = ["train", "val"]
    classes: list[str]
    background: str | None  # required: null must be said, never assumed
    ignore: list[Any] = []
    palette: dict[str, list[int]] | None = None
    remap: dict[int, str] | None = None
    unlabelled: bool = False
    # What the masks were drawn on: the image as EXIF orientation shows it, or as stored.
    orientation: Literal["exif", "stored"] = "exif"

    @field_validator("images", "masks")
    @classmethod
    def _pattern(cls, value: str) -> str:
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(value) if f is not None]
        except ValueError as exc:
            raise ValueError(f"not a pattern ({exc})") from None
        unknown = sorted(set(fields) - {"split", "stem"})
        if unknown:
            raise ValueError(f"unknown placeholder {{{unknown[0]}}}: use {{split}} and {{stem}}")
        if fields.count("stem") != 1:
            raise ValueError("needs {stem} exactly once")
        if os.path.isabs(value) or ".." in Path(value).parts:
            raise ValueError("must be relative to root and stay inside it (no leading /, no ..)")
        return value

    @field_validator("splits")
    @classmethod
    def _splits(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("name at least one split")
        bad = [s for s in value if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", s)]
        if bad:
            raise ValueError(f"split {bad[0]!r}: use letters, digits, '.', '_' and '-'")
        if len(set(value)) != len(value):
            raise ValueError("a split is named twice")
        return value

    @field_validator("classes")
    @classmethod
    def _classes(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("name at least one class")
        names = [v.strip() for v in value]
        if "" in names:
            raise ValueError(f"class {names.index('')} has an empty name")
        if len(set(names)) != len(names):
            twice = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"class {twice!r} is named twice")
        if NO_BACKGROUND in names:
            raise ValueError(f"{NO_BACKGROUND!r} is reserved for the empty background slot")
        return names

    @field_validator("palette")
    @classmethod
    def _palette(cls, value: dict[str, list[int]] | None) -> dict[str, list[int]] | None:
        if value is not None:
            for name, colour in value.items():
                _colour(colour, f"palette.{name}")
            colours = [tuple(c) for c in value.values()]
            if len(set(colours)) != len(colours):
                twice = next(c for c in colours if colours.count(c) > 1)
                raise ValueError(f"colour {list(twice)} is given to two classes")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Layout:
        n = len(self.classes)
        stores = n + (self.background is None)
        if stores > MAX_CLASSES:
            raise ValueError(f"classes: {n} classes need {stores} store ids; at most "
                             f"{MAX_CLASSES} fit a uint8 mask next to 255 = ignore")
        if self.background is not None and self.background not in self.classes:
            raise ValueError(f"background: {self.background!r} is not one of the classes "
                             "(name a class, or null when every class is real)")
        if len(self.splits) > 1 and "{split}" not in self.images:
            raise ValueError(f"images: {self.images!r} has no {{split}}, so the splits "
                             f"{self.splits} would all list the same images")
        if self.palette is not None:
            self._check_palette()
        else:
            self._check_values()
        return self

    def _check_palette(self) -> None:
        missing = [c for c in self.classes if c not in self.palette]
        extra = [c for c in self.palette if c not in self.classes]
        if missing or extra:
            what = (f"class {missing[0]!r} has no colour" if missing
                    else f"{extra[0]!r} is not one of the classes")
            raise ValueError(f"palette: {what} (give every class one colour)")
        if self.remap:
            raise ValueError("remap: maps label values; with a palette, colours map to classes "
                             "by name (drop remap)")
        colours = {tuple(c): name for name, c in self.palette.items()}
        for k, colour in enumerate(self.ignore):
            colour = tuple(_colour(colour, f"ignore[{k}]"))
            if colour in colours:
                raise ValueError(f"ignore[{k}]: colour {list(colour)} is the colour of class "
                                 f"{colours[colour]!r}")

    def _check_values(self) -> None:
        n = len(self.classes)
        for k, value in enumerate(self.ignore):
            if not isinstance(value, int) or isinstance(value, bool) or not (
                    0 <= value <= MAX_LABEL_VALUE):
                raise ValueError(f"ignore[{k}]: {value!r} is not a label value (0.."
                                 f"{MAX_LABEL_VALUE}; colours only with a palette)")
            if value < n:
                raise ValueError(f"ignore[{k}]: {value} is the label value of class "
                                 f"{self.classes[value]!r} (classes[{value}])")
        for value, target in (self.remap or {}).items():
            if not 0 <= value <= MAX_LABEL_VALUE:
                raise ValueError(f"remap: key {value} is not a label value (0.."
                                 f"{MAX_LABEL_VALUE})")
            if target != IGNORE_NAME and target not in self.classes:
                raise ValueError(f"remap.{value}: {target!r} is neither a class nor "
                                 f"{IGNORE_NAME!r}")
            if value in self.ignore:
                raise ValueError(f"remap.{value}: {value} is also in ignore (say it once)")
        if self.remap and IGNORE_NAME in self.classes:
            raise ValueError(f"classes: a class named {IGNORE_NAME!r} cannot be told apart "
                             "from remap's ignore")

    # -- what the layout means -----------------------------------------------------------

    def store_classes(self) -> list[str]:
        """Store class names: id 0 the background (or the empty slot), then the others."""
        if self.background is None:
            return [NO_BACKGROUND, *self.classes]
        return [self.background, *(c for c in self.classes if c != self.background)]

    def store_ids(self) -> dict[str, int]:
        return {name: k for k, name in enumerate(self.store_classes()) if name != NO_BACKGROUND}

    def source_ids(self) -> list[int]:
        """The label value (index in ``classes``) of each store class; -1 for the empty slot."""
        return [self.classes.index(c) if c in self.classes else -1
                for c in self.store_classes()]

    def value_map(self) -> dict[int, int]:
        """Label value -> store id, for value-coded masks (255 is always ignore)."""
        ids = self.store_ids()
        out = {v: ids[name] for v, name in enumerate(self.classes)}
        out.update({int(v): IGNORE_INDEX for v in self.ignore})
        out[IGNORE_INDEX] = IGNORE_INDEX
        for value, target in (self.remap or {}).items():
            out[int(value)] = IGNORE_INDEX if target == IGNORE_NAME else ids[target]
        return out

    def colour_map(self) -> dict[int, int]:
        """Packed 0xRRGGBB colour -> store id, for colour-coded masks."""
        assert self.palette is not None
        ids = self.store_ids()
        out = {_pack(c): ids[name] for name, c in self.palette.items()}
        out.update({_pack(c): IGNORE_INDEX for c in self.ignore})
        return out

    def meaning(self) -> dict[str, Any]:
        """What decides the stored labels (hashed into the fingerprint; the root is not)."""
        return self.model_dump(exclude={"root", "splits"})


def _colour(value: Any, where: str) -> list[int]:
    if (not isinstance(value, list | tuple) or len(value) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255
                       for v in value)):
        raise ValueError(f"{where}: {value!r} is not a colour [r, g, b] of 0..255")
    return list(value)


def _pack(colour: Any) -> int:
    r, g, b = (int(v) for v in colour)
    return (r << 16) | (g << 8) | b


def _describe_errors(path: Path, exc: ValidationError) -> str:
    """One line naming the file, each failing key and its value."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            parts.append(f"{loc}: required key is missing")
        elif err["type"] == "extra_forbidden":
            parts.append(f"{loc}: unknown key (value {err['input']!r})")
        elif err["loc"] and not re.match(rf"{re.escape(str(err['loc'][0]))}[.:\[]", msg):
            parts.append(f"{loc}: {msg} (got {err['input']!r})")
        else:  # the message names its key and value itself
            parts.append(msg)
    more = f" (and {len(parts) - 3} more)" if len(parts) > 3 else ""
    return f"{path}: " + "; ".join(parts[:3]) + more


def load_layout(path: str | Path) -> tuple[Layout, Path]:
    """Read and validate a layout file: ``(layout, dataset root)``; `LayoutError` otherwise."""
    path = Path(path).expanduser().absolute()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LayoutError(f"layout file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LayoutError(f"cannot read layout file {path}: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise LayoutError(f"{path}: not valid YAML{at}: {problem}") from None
    if not isinstance(data, dict):
        raise LayoutError(f"{path}: a layout file is a YAML mapping (root, images, masks, "
                          f"classes, ...), got {type(data).__name__}")
    try:
        layout = Layout.model_validate(data)
    except ValidationError as exc:
        raise LayoutError(_describe_errors(path, exc)) from None
    root = Path(os.path.normpath(path.parent / Path(layout.root).expanduser()))
    if not root.is_dir():
        raise LayoutError(f"{path}: root: {layout.root!r} resolves to {root}, which is not a "
                          "directory")
    return layout, root


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    head, _, tail = pattern.partition("{stem}")
    return re.compile(re.escape(head) + r"(?P<stem>.+)" + re.escape(tail))


class LayoutReader(Reader):
    """A dataset described by a layout file (module docstring): one split of it.

    Listing walks the folder before the first path component holding ``{stem}`` and keeps the
    files whose path matches the images pattern; ``{stem}`` may span folders (Cityscapes'
    ``leftImg8bit/{split}/{stem}_leftImg8bit.png`` gives stems ``aachen/aachen_000000_000019``).
    The stem is the item id. Masks that match no image are not read.
    """

    kind = "layout"

    def __init__(self, layout_file: str | Path, split: str = "train"):
        self.layout_file = Path(layout_file).expanduser().absolute()
        self.layout, self.root = load_layout(self.layout_file)
        if split not in self.layout.splits:
            raise LayoutError(f"{self.layout_file}: splits: {split!r} is not one of the "
                              f"layout's splits {self.layout.splits}")
        self.split = split
        self.classes = self.layout.store_classes()
        self.source_ids = self.layout.source_ids()
        self._values = self.layout.value_map() if self.layout.palette is None else None
        self._colours = self.layout.colour_map() if self.layout.palette is not None else None

    def _pattern(self, key: str) -> str:
        return getattr(self.layout, key).replace("{split}", self.split)

    def _stems(self) -> list[str]:
        pattern = self._pattern("images")
        parts = pattern.split("/")
        first = next(k for k, part in enumerate(parts) if "{stem}" in part)
        base = self.root.joinpath(*parts[:first])
        if not base.is_dir():
            raise DatasetError(f"{self.layout_file}: images: {self.layout.images!r} for split "
                               f"{self.split!r} needs the folder {base}, which does not exist")
        regex = _pattern_regex("/".join(parts[first:]))
        stems = []
        for folder, dirs, files in os.walk(base):
            dirs.sort()
            rel = Path(os.path.relpath(folder, base))
            for name in files:
                match = regex.fullmatch((rel / name).as_posix().removeprefix("./"))
                if match:
                    stems.append(match.group("stem"))
        if not stems:
            raise DatasetError(f"{self.layout_file}: images: no file under {base} matches "
                               f"{pattern!r} (split {self.split!r})")
        return sorted(set(stems))

    def list_items(self) -> list[Item]:
        entries = []
        for stem in self._stems():
            image = self.root / self._pattern("images").replace("{stem}", stem)
            mask = self.root / self._pattern("masks").replace("{stem}", stem)
            entries.append((stem, str(image), str(mask)))
        facts = scan_files([image for _, image, _ in entries],
                           [mask for _, _, mask in entries if os.path.isfile(mask)])
        items = []
        turn = self.layout.orientation == "exif"
        for stem, image, mask in entries:
            f = facts[image]
            if turn and f.orientation in SWAPS_SIDES:  # the size the image is ingested at
                f = FileFacts(f.digest, f.width, f.height, f.orientation)
            if mask in facts:
                items.append(Item(stem, self.split, image, mask, f.height, f.width))
            elif not _inside(mask, self.root):  # unreachable with validated patterns
                items.append(Item(stem, self.split, image, mask, quarantine=(
                    f"mask {mask} is outside the dataset root {self.root}")))
            elif self.layout.unlabelled:
                items.append(Item(stem, self.split, image, None, f.height, f.width,
                                  labelled=False))
            else:
                items.append(Item(stem, self.split, image, mask, f.height, f.width, quarantine=(
                    f"no mask file {mask} (set unlabelled: true in {self.layout_file.name} to "
                    "ingest images without masks as unlabelled)")))
        self._listed = (items, facts)
        return list(items)

    def load(self, item: Item) -> tuple[np.ndarray, np.ndarray]:
        if item.quarantine:
            raise BadItem(item.image_path, item.quarantine)
        image_im = _decode(item.image_path, "image")
        stored = image_im.size
        turn = exif_orientation(image_im) if self.layout.orientation == "exif" else 1
        if turn != 1:
            try:
                image_im = ImageOps.exif_transpose(image_im)
            except Exception as exc:  # noqa: BLE001 - a broken EXIF block: quarantine
                raise BadItem(item.image_path, f"EXIF orientation {turn} cannot be applied "
                                               f"({type(exc).__name__}: {exc})") from exc
        width, height = image_im.size
        if not item.labelled:
            return _to_rgb(image_im), np.full((height, width), IGNORE_INDEX, np.uint8)
        mask_path = str(item.label)
        mask_im = _decode(mask_path, "mask", lossless=True)
        if mask_im.size != image_im.size:
            (mw, mh), (sw, sh) = mask_im.size, stored
            if turn in SWAPS_SIDES and mask_im.size == stored:
                raise BadItem(mask_path, (
                    f"mask {mw}x{mh} fits the image as stored, but the image's EXIF "
                    f"orientation {turn} ({ORIENTATIONS[turn]}) shows it as {width}x{height}: "
                    f"the mask was drawn on the stored pixels (if every mask was, set "
                    f"orientation: stored in {self.layout_file.name})"))
            turned = (f" (as its EXIF orientation {turn} shows it; stored {sw}x{sh})"
                      if turn != 1 else "")
            raise BadItem(mask_path, f"mask {mw}x{mh} != image {width}x{height}{turned}")
        if self._colours is not None:
            return _to_rgb(image_im), self._by_colour(mask_im, mask_path)
        return _to_rgb(image_im), self._by_value(mask_im, mask_path)

    def _by_value(self, mask_im: Image.Image, path: str) -> np.ndarray:
        if mask_im.mode not in VALUE_MODES:
            raise BadItem(path, f"mask mode {mask_im.mode} holds no label values (palette or "
                                f"grayscale); colour-coded masks need a palette in "
                                f"{self.layout_file.name}")
        raw = np.asarray(mask_im)
        values, inverse = np.unique(raw, return_inverse=True)
        return self._translate(values.astype(np.int64).tolist(), inverse, raw.shape, path,
                               self._values, "label values", str)

    def _by_colour(self, mask_im: Image.Image, path: str) -> np.ndarray:
        if mask_im.mode not in COLOUR_MODES:
            raise BadItem(path, f"mask mode {mask_im.mode} holds no colours, but "
                                f"{self.layout_file.name} gives a palette")
        rgb = np.asarray(mask_im.convert("RGB"), dtype=np.uint32)
        packed = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        values, inverse = np.unique(packed, return_inverse=True)
        return self._translate(values.tolist(), inverse, packed.shape, path, self._colours,
                               "colours", lambda v: str([v >> 16, (v >> 8) & 255, v & 255]))

    def _translate(self, values: list[int], inverse: np.ndarray, shape: tuple[int, ...],
                   path: str, table: dict[int, int], what: str, show: Any) -> np.ndarray:
        unknown = [v for v in values if v not in table]
        if unknown:
            listed = ", ".join(show(v) for v in unknown[:8]) + (" ..." if len(unknown) > 8 else "")
            raise BadItem(path, f"unknown {what} {listed} (not in classes, ignore or remap of "
                                f"{self.layout_file.name})")
        ids = np.asarray([table[v] for v in values], np.uint8)
        return ids[inverse.reshape(shape)]

    def fingerprint(self) -> str:
        items, facts = self._latest_listing()
        listing = [
            [item.id, _rel(item.image_path, self.root), facts[item.image_path].digest,
             _rel(str(item.label), self.root) if item.labelled else "unlabelled",
             facts[str(item.label)].digest if str(item.label) in facts else item.quarantine]
            for item in items
        ]
        return self._hash(listing, {"digest": "blake2b-128", "layout": self.layout.meaning()})

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "layout_file": str(self.layout_file),
                "layout": self.layout.model_dump()}
