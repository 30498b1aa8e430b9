"""JSON files that are JSON, written whole: NaN and infinities become null (`json.dumps` writes
`NaN`, which JSON has not got and strict readers such as JavaScript's `JSON.parse` refuse), and
every file is replaced atomically (`write_atomic`), so a crash mid-write keeps the previous one.
This is the project's one atomic writer; checkpoints go through it too."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def json_safe(value: Any) -> Any:
    """`value` with NaN and infinities as None, so that it is valid JSON (null)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """`json.dumps` of `json_safe(value)`; a non-finite number left anywhere (a NumPy float32,
    say) raises instead of writing invalid JSON."""
    return json.dumps(json_safe(value), allow_nan=False, **kwargs)


def write_atomic(path: str | Path, write: Callable[[Path], object]) -> None:
    """Make `path` with `write(tmp)`: it fills a temporary file beside `path` (same folder, so
    same file system), which then replaces `path` in one rename. A crash or a full disk mid-write
    leaves the previous `path` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_text(path: str | Path, text: str) -> None:
    """`text` to `path`, atomically (`write_atomic`)."""
    write_atomic(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | Path, value: Any, *, indent: int = 2) -> None:
    """`value` as JSON (`dumps`: NaN as null) to `path`, atomically (`write_atomic`)."""
    write_text(path, dumps(value, indent=indent))
