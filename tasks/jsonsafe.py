"""JSON files that are JSON: NaN and infinities become null (`json.dumps` writes `NaN`, which
JSON has not got and strict readers such as JavaScript's `JSON.parse` refuse)."""

from __future__ import annotations

import json
import math
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
