"""Ablation studies: a YAML spec expanded into training points.

    study: synthetic-budget          # the MLflow parent run is found again by this name
    experiment: synthetic-ablation   # MLflow experiment
    base: {...}                      # TrainConfig keys shared by every point
    grid: {model: [umt, panet], budget: [0.0, 0.2, 1.0], fold: [0], shots: [1], seed: [0]}
    models: {umt: {...}}             # per-model keys, applied after `base`
    points: [{model: metasegnet, ways: 2, budget: 1.0}]   # extra points outside the grid

The spec is a pydantic model (`StudySpec`) and every point is validated as a `TrainConfig`
before anything runs; an error names the file (or the `--set`/`--grid`), the key as written
there (`base.lr`, `models.umt.pseudo_steps`, `grid.budget`, `points[1].ways`) and its value.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    field_validator,
)

from tasks.fewshot.config import (
    MODELS,
    ConfigError,
    Name,
    Origin,
    TrainConfig,
    apply_overrides,
    as_list,
    close_match_hint,
    describe_errors,
    expected_note,
    read_yaml,
    split_override,
    validate,
)

GridKey = Literal["model", "budget", "fold", "shots", "ways", "seed", "budget_seed"]
GRID_KEYS: tuple[str, ...] = get_args(GridKey)


class StudySpec(BaseModel):
    """The keys of a study file."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)

    study: Name = Field(description="The study's name: its MLflow parent run is found again by "
                                    "it, so a rerun continues the study (`fss ablate --study "
                                    "NAME` runs a variant under another).")
    experiment: Name = Field(description="MLflow experiment of the parent run and of every "
                                         "point (replaces the points' `experiment`).")
    base: dict[str, Any] = Field(
        default_factory=dict, description="Training-config keys shared by every point.",
        json_schema_extra=expected_note("a mapping of training-config keys"))
    grid: dict[str, Annotated[list[Any], BeforeValidator(as_list),
                              Field(min_length=1)]] = Field(
        default_factory=dict, description="Axes swept as a product, `KEY: [values]` (a single "
                                          "value is an axis of one); keys: the grid keys "
                                          "below.",
        json_schema_extra=expected_note("a mapping of grid keys to lists of values"))
    models: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Per-model training-config keys, applied after "
                                          "`base` to the points of that model.",
        json_schema_extra=expected_note("a mapping of model names to training-config keys"))
    points: list[dict[str, Any]] = Field(
        default_factory=list, description="Extra points outside the grid: each a mapping of "
                                          "training-config keys over `base` (and its model's).",
        json_schema_extra=expected_note("a list of mappings of training-config keys"))
    gpu: StrictBool = Field(False, description="Each point holds one GPU (Dask resource "
                                               "`GPU=1`).")

    @field_validator("grid")
    @classmethod
    def _sweepable(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key in grid:
            if key not in GRID_KEYS:
                hint = close_match_hint(key, GRID_KEYS)
                raise ValueError(f"{key!r} is not sweepable{hint}; grid keys: "
                                 f"{', '.join(GRID_KEYS)}")
        return grid

    @field_validator("models")
    @classmethod
    def _known_models(cls, models: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name in models:
            if name not in MODELS:
                hint = close_match_hint(name, MODELS)
                raise ValueError(f"{name!r} is not a model{hint}; models: {', '.join(MODELS)}")
        return models



@dataclass
class Study:
    name: str
    experiment: str
    points: list[TrainConfig]
    gpu: bool = False  # each point holds one GPU (Dask resources GPU=1)
    spec: StudySpec | None = None
    overrides: list[str] = field(default_factory=list)


@dataclass
class _Point:
    """One point's keys and, for each key, where it was written."""

    keys: dict[str, Any]
    origins: dict[str, Origin]


def _expand(spec: Mapping[str, Any], overrides: list[str] | None, where: str,
            grid_origins: Mapping[str, Origin] | None = None) -> list[_Point]:
    grid = spec.get("grid") or {}
    unknown = sorted(set(grid) - set(GRID_KEYS))
    if unknown:
        raise ConfigError(f"{where}: grid keys {unknown} are not sweepable; use one of "
                          f"{GRID_KEYS}")
    axes = [[(k, v) for v in (vals if isinstance(vals, list) else [vals])]
            for k, vals in grid.items()]
    combos: list[tuple[dict[str, Any], str | None]] = (
        [(dict(c), None) for c in itertools.product(*axes)] if axes else [])
    combos += [(dict(p), f"points[{i}]") for i, p in enumerate(spec.get("points") or [])]
    base = dict(spec.get("base") or {})
    models = spec.get("models") or {}
    out, seen = [], set()
    for keys, point in combos:
        model = keys.get("model", base.get("model", "metasegnet"))
        model_keys = dict(models.get(model, {})) if isinstance(model, str) else {}
        origins = {k: Origin(where, f"base.{k}") for k in base}
        origins |= {k: Origin(where, f"models.{model}.{k}") for k in model_keys}
        origins |= {k: (grid_origins or {}).get(k, Origin(where, f"grid.{k}")) if point is None
                    else Origin(where, f"{point}.{k}") for k in keys}
        merged = apply_overrides(base | model_keys | keys, overrides or [], origins)
        key = yaml.safe_dump(merged, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(_Point(merged, origins))
    if not out:
        raise ConfigError(f"{where}: the study has no points: give a grid or points")
    return out


def expand(spec: Mapping[str, Any], overrides: list[str] | None = None) -> list[dict[str, Any]]:
    """Every point's config keys: the grid's product plus explicit points, deduplicated.

    A point is `base`, then its model's keys, then its grid values or point keys, then
    `overrides` (key=value), which therefore reach every point whatever set the key before.
    """
    return [p.keys for p in _expand(spec, overrides, "study")]


def _grid_items(items: list[str]) -> dict[str, Any]:
    """`--grid KEY=[values]` items as {KEY: [values]}."""
    out = {}
    for item in items:
        key, values = split_override(item, "--grid")
        if key not in GRID_KEYS:
            raise ConfigError(f"--grid {item.strip()}: {key!r} is not sweepable"
                              f"{close_match_hint(key, GRID_KEYS)}; grid keys: "
                              f"{', '.join(GRID_KEYS)}")
        out[key] = values if isinstance(values, list) else [values]
    return out


def set_grid(spec: Mapping[str, Any], items: list[str]) -> dict[str, Any]:
    """A copy of `spec` whose grid axes are replaced by `key=[values]` items (e.g. seed=[0,1,2]).

    The study keeps its name, so its MLflow parent run gathers the new points beside the old.
    """
    return dict(spec) | {"grid": dict(spec.get("grid") or {}) | _grid_items(items)}


def validate_spec(spec: Mapping[str, Any] | StudySpec, where: str = "study") -> StudySpec:
    """The study's own keys (not yet its points), validated."""
    if isinstance(spec, StudySpec):
        return spec
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where}: a study is a YAML mapping (study, experiment, base, grid, "
                          f"models, points), got {spec!r}")
    try:
        return StudySpec.model_validate(dict(spec))
    except ValidationError as exc:
        raise ConfigError("; ".join(describe_errors(exc, spec, where=where, model=StudySpec))
                          ) from None


def study_from_dict(spec: Mapping[str, Any] | StudySpec, overrides: list[str] | None = None,
                    where: str = "study", grid_items: list[str] | None = None) -> Study:
    """The study of `spec` with every point validated; `overrides` (key=value) reach every
    point, `grid_items` (KEY=[values]) replace grid axes. A ConfigError names every failing key
    of every point (once), before anything runs."""
    grid = _grid_items(grid_items or [])
    checked = validate_spec(spec, where)
    if grid:
        checked = checked.model_copy(update={"grid": checked.grid | grid})
    grid_origins = {k: Origin(f"--grid {i.strip()}", k)
                    for i in grid_items or [] for k in [i.partition("=")[0].strip()]}
    experiment = {"experiment": checked.experiment}
    points, errors = [], []
    for point in _expand(checked.model_dump(), overrides, where, grid_origins):
        origins = point.origins | {"experiment": Origin(where, "experiment")}
        result = validate(point.keys | experiment, origins, where)
        if isinstance(result, list):
            errors += [e for e in result if e not in errors]
        else:
            points.append(result)
    if errors:
        raise ConfigError("; ".join(errors))
    return Study(name=checked.study, experiment=checked.experiment, points=points,
                 gpu=checked.gpu, spec=checked, overrides=list(overrides or []))


def load_study(path: str | Path, overrides: list[str] | None = None,
               grid_items: list[str] | None = None, name: str | None = None) -> Study:
    """Read a study YAML; `overrides` (key=value) apply to every point, e.g. steps=50;
    `grid_items` (KEY=[values]) replace grid axes; `name` runs it as another study."""
    spec = read_yaml(path, "study") or {}
    if name and isinstance(spec, dict):
        spec = spec | {"study": name}
    return study_from_dict(spec, overrides, where=str(path), grid_items=grid_items)
