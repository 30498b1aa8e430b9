"""Ablation studies: a YAML spec expanded into training points.

    study: synthetic-budget          # the MLflow parent run is found again by this name
    experiment: synthetic-ablation   # MLflow experiment
    base: {...}                      # TrainConfig keys shared by every point
    grid: {model: [umt, panet], budget: [0.0, 0.2, 1.0], fold: [0], shots: [1], seed: [0]}
    models: {umt: {...}}             # per-model keys, applied after `base`
    points: [{model: metasegnet, ways: 2, budget: 1.0}]   # extra points outside the grid
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tasks.fewshot.config import TrainConfig, apply_overrides, from_dict, parse_value

GRID_KEYS = ("model", "budget", "fold", "shots", "ways", "seed", "budget_seed")


@dataclass
class Study:
    name: str
    experiment: str
    points: list[TrainConfig]
    gpu: bool = False  # each point holds one GPU (Dask resources GPU=1)
    spec: dict[str, Any] = field(default_factory=dict)


def expand(spec: dict[str, Any], overrides: list[str] | None = None) -> list[dict[str, Any]]:
    """Every point's config keys: the grid's product plus explicit points, deduplicated.

    A point is `base`, then its model's keys, then its grid values or point keys, then
    `overrides` (key=value), which therefore reach every point whatever set the key before.
    """
    grid = spec.get("grid") or {}
    unknown = sorted(set(grid) - set(GRID_KEYS))
    if unknown:
        raise ValueError(f"grid keys {unknown} are not sweepable; use one of {GRID_KEYS}")
    axes = [[(k, v) for v in (vals if isinstance(vals, list) else [vals])]
            for k, vals in grid.items()]
    combos = [dict(c) for c in itertools.product(*axes)] if axes else []
    combos += [dict(p) for p in spec.get("points") or []]
    out, seen = [], set()
    for c in combos:
        model = c.get("model", (spec.get("base") or {}).get("model", "metasegnet"))
        merged = dict(spec.get("base") or {}) | dict((spec.get("models") or {}).get(model, {})) | c
        merged = apply_overrides(merged, overrides or [])
        key = yaml.safe_dump(merged, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(merged)
    if not out:
        raise ValueError("the study has no points: give a grid or points")
    return out


def set_grid(spec: dict[str, Any], items: list[str]) -> dict[str, Any]:
    """A copy of `spec` whose grid axes are replaced by `key=[values]` items (e.g. seed=[0,1,2]).

    The study keeps its name, so its MLflow parent run gathers the new points beside the old.
    """
    grid = dict(spec.get("grid") or {})
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in GRID_KEYS:
            raise ValueError(f"--grid expects KEY=[values] with KEY one of {GRID_KEYS}, "
                             f"got {item!r}")
        values = parse_value(value)
        grid[key] = values if isinstance(values, list) else [values]
    return dict(spec) | {"grid": grid}


def load_study(path: str | Path, overrides: list[str] | None = None) -> Study:
    """Read a study YAML; `overrides` (key=value) apply to every point, e.g. steps=50."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"study file {path} does not exist")
    spec = yaml.safe_load(path.read_text()) or {}
    return study_from_dict(spec, overrides)


def study_from_dict(spec: dict[str, Any], overrides: list[str] | None = None) -> Study:
    for key in ("study", "experiment"):
        if not spec.get(key):
            raise ValueError(f"a study needs a {key!r} entry")
    spec = dict(spec) | {"overrides": list(overrides or [])}
    experiment = spec["experiment"]
    points = [from_dict(p | {"experiment": experiment}) for p in expand(spec, overrides)]
    return Study(name=spec["study"], experiment=experiment, points=points,
                 gpu=bool(spec.get("gpu", False)), spec=spec)
