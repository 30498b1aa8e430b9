"""Experiment configs: YAML files under `configs/`, overridden with `--set key=value`.

A config is a pydantic model: unknown keys are refused (with the nearest known key as a hint),
every key has a type and a range, and the keys that constrain each other are checked together.
A bad config fails before anything is created, with one line naming where the value came from
(the file or the `--set`), the key, the value and what was expected. The reference of every
key, docs/configuration.md, is generated from this module:

    python -m tasks.fewshot.config --markdown > docs/configuration.md
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import sys
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from tasks import defaults

ModelName = Literal["metasegnet", "panet", "umt"]
Optimizer = Literal["adamw", "sgd"]
MODELS: tuple[str, ...] = get_args(ModelName)
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)

RULE_ERROR = "config_rule"  # pydantic error type of a rule between keys (see RULES)


class ConfigError(ValueError):
    """A config or study a user wrote is wrong. One line: where the value came from (a file or a
    `--set`), the key, the value and what was expected. A ValueError, so `fss` prints it as one
    line and exits 2."""


def _number_from_text(value: Any) -> Any:
    # YAML 1.1 reads 1e-3 (no dot) as a string; a number field takes it as the number it spells.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value  # fails below as "expected a number"
    return value


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {value!r}")
    return value


DEVICES = "'auto', 'cpu', 'mps', 'cuda' or 'cuda:N'"


def _device(name: str) -> str:
    if name in ("auto", "cpu", "mps", "cuda") or (name.startswith("cuda:") and name[5:].isdigit()):
        return name
    raise ValueError(f"expected {DEVICES}, got {name!r}")


def as_list(value: Any) -> Any:
    """A single value where a list goes is a list of one (`test_shots: 5` is `[5]`)."""
    return value if value is None or isinstance(value, list | tuple) else [value]


# Integers and floats both: an int stays an int, so a config keeps the digest (run folder and
# MLflow run name) it had when it was a dataclass (`ce_weight: 1` and `ce_weight: 1.0` differ).
Number = Annotated[StrictInt | StrictFloat, BeforeValidator(_number_from_text),
                   AfterValidator(_finite)]
Count = Annotated[StrictInt, Field(ge=1)]
Fraction = Annotated[Number, Field(ge=0, le=1)]
Name = Annotated[str, Field(min_length=1)]


def expected_note(text: str) -> dict[str, Any]:
    """What the reference and the error messages say a key takes, where the type alone does not
    say it well."""
    return {"expected": text}


class TrainConfig(BaseModel):
    """One training run (a point of an ablation): model, data, episodes, optimisation."""

    # coerce_numbers_to_str: a YAML name that reads as a number (`dataset: 2012`) is that name.
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)

    model: ModelName = Field("metasegnet", description="The few-shot model.")
    store: Name = Field(defaults.STORE, description="The Zarr store: a path or fsspec URL.")
    dataset: Name = Field("synth", description="The dataset's name in the store.")
    fold: Annotated[StrictInt, Field(ge=0)] = Field(
        0, description="The fold whose classes are tested (0..n_folds-1); the others are the "
                       "base classes. Ignored when `novel_classes` names the classes.")
    n_folds: Annotated[StrictInt, Field(ge=2)] = Field(
        4, description="How many folds the foreground classes are split into.")
    fold_variant: Literal["auto", "interleaved", "consecutive"] = Field(
        "auto", description="How classes are assigned to folds: `auto` is PASCAL-5i for 20 "
                            "classes and interleaved COCO-20i for 80 (4 folds), consecutive "
                            "blocks otherwise.")
    novel_classes: Annotated[list[StrictStr | StrictInt] | None, BeforeValidator(as_list)] = (
        Field(None, description="Names or ids of the classes to test on; replaces the fold "
                                "(the rest are base classes)."))
    test_split: Name = Field("val", description="The split the novel classes are tested on "
                                                "(not `train`: the labelled images come from "
                                                "it).")
    ways: Count = Field(1, description="Classes per episode.")
    shots: Count = Field(1, description="Support images per class in a training episode.")
    budget: Fraction = Field(1.0, description="Fraction of training images whose masks may be "
                                              "used.")
    budget_seed: Annotated[StrictInt, Field(ge=0)] | None = Field(
        None, description="Which images are labelled: one draw of nested subsets (5 % ⊂ 10 % "
                          "⊂ ...) per budget seed; null follows `seed`, so every seed of a "
                          "study also resamples the labelled subset.")
    val_fraction: Annotated[Number, Field(ge=0, lt=1)] = Field(
        0.2, description="Share of a point's labelled images held out from training to select "
                         "its checkpoint (never the test split); too few to form episodes, "
                         "and the last checkpoint is kept.")
    min_pixels: Annotated[StrictInt, Field(ge=0)] = Field(
        2 * 32 * 32, description="Region floor at original resolution: an image is eligible "
                                 "for a class when it holds at least this many of its pixels.")
    pseudo: Name | None = Field(None, description="Pseudo meta-tasks (`fss pseudo`): the "
                                                  "pseudo-mask group's key, or `latest` for the "
                                                  "only one.")
    budget_mode: Literal["finetune", "mixed"] = Field(
        "finetune", description="With pseudo tasks and labels: `finetune` runs `pseudo_steps` "
                                "pseudo steps before the `steps` labelled ones (at budget 0 "
                                "they are all there is); `mixed` interleaves them.")
    pseudo_steps: Annotated[StrictInt, Field(ge=0)] = Field(
        0, description="finetune: pseudo steps before the `steps` labelled ones.")
    mixed_pseudo_fraction: Fraction = Field(
        0.5, description="mixed: share of the `steps` that are pseudo episodes.")
    pseudo_top_k: Count = Field(10, description="Pseudo supports come from the k most similar "
                                                "images of the cluster.")
    steps: Count = Field(1000, description="Training steps (labelled ones, in finetune mode).")
    batch_size: Count = Field(8, description="Episodes per step.")
    optimizer: Optimizer = Field("adamw", description="`adamw`, or `sgd` with `momentum` "
                                                      "(PANet's reference).")
    lr: Annotated[Number, Field(gt=0)] = Field(
        1e-3, description="Peak learning rate (warm-up, then cosine decay).")
    momentum: Annotated[Number, Field(ge=0)] = Field(0.9, description="sgd only.")
    weight_decay: Annotated[Number, Field(ge=0)] = Field(
        1e-4, description="Decoupled (AdamW) or L2 (SGD) weight decay.")
    seed: Annotated[StrictInt, Field(ge=0)] = Field(
        0, description="Seed of the initial weights and the training episodes.")
    backbone: Literal["small_resnet", "resnet50"] = Field(
        "small_resnet", description="The (dilated) backbone: a small ResNet for CPU training "
                                    "from scratch, or ResNet-50.")
    backbone_checkpoint: Name | None = Field(
        None, description="Weights loaded into the backbone (e.g. `fss pretrain`'s "
                          "backbone.pth, an ImageNet or MoCo ResNet-50); null: random init.")
    model_args: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments of the model class (e.g. "
                                          "`dim`, `freeze_backbone`); `--set model_args.dim=64`.")
    ce_weight: Annotated[Number, Field(ge=0)] = Field(
        0.0, description="UMT: Dice (the paper's loss) + ce_weight x cross-entropy.")
    cache_features: StrictBool = Field(
        False, description="UMT, frozen backbone: compute backbone features once.")
    checkpoint_every: Count = Field(200, description="Steps between checkpoints (a resumed "
                                                     "run restarts from the last).")
    val_every: Count = Field(200, description="Steps between validations that select the "
                                              "checkpoint.")
    val_episodes: Count = Field(100, description="Episodes per validation.")
    test_episodes: Count = Field(1000, description="Test episodes per setting.")
    test_shots: Annotated[list[Count], BeforeValidator(as_list),
                          Field(min_length=1)] = Field(
        default_factory=lambda: [1, 5], description="Shots of the test settings.")
    test_ways: Annotated[list[Count] | None, BeforeValidator(as_list)] = Field(
        None, description="Ways of the test settings; null: the training ways.")
    test_seed: Annotated[StrictInt, Field(ge=0)] = Field(
        321, description="Seed of the test episodes (the same for every point of a study).")
    scoring: Literal["pfenet", "hsnet"] = Field(
        "pfenet", description="`pfenet`: original-size labels; `hsnet`: resized labels.")
    device: Annotated[str, AfterValidator(_device)] = Field(
        "auto", description="Torch device; `auto` is CUDA when available, else the CPU.",
        json_schema_extra=expected_note(DEVICES))
    threads: Annotated[StrictInt, Field(ge=0)] = Field(
        0, description="Torch threads on CPU; 0 = torch's default.")
    loader_workers: Annotated[StrictInt, Field(ge=0)] | None = Field(
        None, description="Processes that read the next steps' episodes while a step trains "
                          "(threads inside a Dask worker); 0 reads each batch when its step "
                          "starts; null: by device (0 on CPU, 4 on CUDA; "
                          "`tasks/fewshot/loader.py:workers_for`). The same batches either way, "
                          "so not part of the run name's digest.")
    system_metrics: StrictBool = Field(
        False, description="MLflow system metrics (system/cpu_utilization_percentage, memory, "
                           "disk, network, GPU with nvidia-ml-py) sampled while the point "
                           "trains and evaluates, every MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"
                           " seconds (10); not part of the run name's digest.")
    experiment: Name = Field("fss", description="MLflow experiment.")
    out_dir: Name = Field("runs", description="Folder of the run folders.")

    @model_validator(mode="after")
    def _check_rules(self) -> TrainConfig:
        if self.budget_seed is None:
            self.budget_seed = self.seed
        for rule in RULES:
            if not rule.holds(self):
                raise PydanticCustomError(RULE_ERROR, rule.message.format(**dict(self)),
                                          {"keys": rule.keys})
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def replace(self, **changes: Any) -> TrainConfig:
        """A validated copy with `changes` (as `dataclasses.replace` was)."""
        return from_dict(self.to_dict() | changes)


@dataclass(frozen=True)
class Rule:
    """A constraint between keys: checked after every key has its type, listed in the
    reference."""

    keys: tuple[str, ...]
    holds: Callable[[TrainConfig], bool]
    message: str  # the error, formatted with the config's keys
    doc: str  # the rule, in the reference


RULES: tuple[Rule, ...] = (
    Rule(("fold", "n_folds"), lambda c: c.fold < c.n_folds,
         "fold must be below n_folds (folds are 0..n_folds-1), got fold {fold} with n_folds "
         "{n_folds}", "`fold` < `n_folds` (folds are 0..n_folds-1)."),
    Rule(("test_split",), lambda c: c.test_split != "train",
         "test_split cannot be 'train': the labelled images come from it",
         "`test_split` is not `train`: the labelled images come from it."),
    Rule(("model", "ways"), lambda c: c.model != "umt" or c.ways == 1,
         "model 'umt' needs ways 1 (the UMT Transformer is a 1-way model), got ways {ways}",
         "`model: umt` needs `ways: 1` (the UMT Transformer is a 1-way model)."),
    Rule(("pseudo", "ways"), lambda c: not c.pseudo or c.ways == 1,
         "pseudo needs ways 1 (pseudo meta-tasks are 1-way episodes), got ways {ways}",
         "`pseudo` needs `ways: 1` (pseudo meta-tasks are 1-way episodes)."),
    Rule(("pseudo", "budget_mode", "pseudo_steps"),
         lambda c: not (c.pseudo and c.budget_mode == "finetune") or c.pseudo_steps >= 1,
         "budget_mode 'finetune' with pseudo tasks needs pseudo_steps >= 1, got {pseudo_steps}",
         "`pseudo` with `budget_mode: finetune` needs `pseudo_steps` >= 1."),
)


# --- where a value came from, and what was expected -------------------------------------------

@dataclass(frozen=True)
class Origin:
    """Where a key's value was written: `where` is a file or `--set k=v`, `key` its path there
    (`train.lr`, `models.umt.lr`)."""

    where: str
    key: str


def _constraints(metadata: Iterable[Any]) -> list[Any]:
    """The annotated-types constraints in `metadata`, also those inside a `Field(...)`."""
    out = []
    for m in metadata:
        out += _constraints(m.metadata) if isinstance(m, FieldInfo) else [m]
    return out


def _bounds(metadata: Iterable[Any]) -> str:
    words = []
    for m in _constraints(metadata):
        for attr, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            if getattr(m, attr, None) is not None:
                words.append(f"{op} {getattr(m, attr)}")
    return (" " + " and ".join(words)) if words else ""


def type_text(annotation: Any, metadata: Iterable[Any] = ()) -> str:
    """What a value of `annotation` is, in words: "a number > 0", "one of 'adamw', 'sgd'"."""
    origin = get_origin(annotation)
    if origin is Annotated:
        base, *meta = get_args(annotation)
        return type_text(base, [*meta, *metadata])
    bounds = _bounds(metadata)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(annotation))
    if origin in (Union, types.UnionType):
        args = get_args(annotation)
        bare = {get_args(a)[0] if get_origin(a) is Annotated else a for a in args}
        if bare == {int, float}:
            return "a number" + bounds
        if type(None) in args:
            rest = [type_text(a, metadata) for a in args if a is not type(None)]
            return " or ".join(rest) + ", or null"
        return " or ".join(type_text(a) for a in args)
    if annotation is int:
        return "an integer" + bounds
    if annotation is float:
        return "a number" + bounds
    if annotation is bool:
        return "true or false"
    if annotation is str:
        return "a non-empty string" if any(getattr(m, "min_length", 0)
                                           for m in _constraints(metadata)) else (
            "a string")
    if origin is list:
        (item,) = get_args(annotation)
        return f"a list, each {type_text(item)}"
    if origin is dict:
        return "a mapping"
    return getattr(annotation, "__name__", str(annotation))


def expected_text(model: type[BaseModel], key: str) -> str:
    """What `key` of `model` takes, in words: the reference's type column, the errors'
    "expected"."""
    info = model.model_fields[key]
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    if "expected" in extra:
        return str(extra["expected"])
    return type_text(info.annotation, info.metadata)


def close_match_hint(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def describe_errors(exc: ValidationError, data: Mapping[str, Any],
                    origins: Mapping[str, Origin] | None = None, where: str = "config",
                    model: type[BaseModel] = TrainConfig) -> list[str]:
    """One short part per failing key of `data`: `<where>: <key>: expected ..., got <value>`."""
    origins = origins or {}
    parts: list[str] = []
    for err in exc.errors():
        if err["type"] == RULE_ERROR:
            keys = err["ctx"]["keys"]
            places = dict.fromkeys(origins[k].where for k in keys if k in origins)
            parts.append(f"{', '.join(places) or where}: {err['msg']}")
            continue
        if not err["loc"]:
            parts.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
            continue
        key = str(err["loc"][0])
        origin = origins.get(key, Origin(where, key))
        head = f"{origin.where}: {origin.key}"
        if err["type"] == "extra_forbidden":
            parts.append(f"{head}: unknown key{close_match_hint(key, model.model_fields)}")
        elif err["type"] == "missing":
            parts.append(f"{head}: required key is missing")
        elif err["type"] == "value_error":  # our validators' messages say what they expected
            parts.append(f"{head}: {err['msg'].removeprefix('Value error, ')}")
        elif key in model.model_fields:
            parts.append(f"{head}: expected {expected_text(model, key)}, got {data.get(key)!r}")
        else:
            parts.append(f"{head}: {err['msg']}")
    return list(dict.fromkeys(parts))


def validate(data: Mapping[str, Any], origins: Mapping[str, Origin] | None = None,
             where: str = "config") -> TrainConfig | list[str]:
    """The config of `data`, or the parts of its error message (see `describe_errors`)."""
    if not isinstance(data, Mapping):
        return [f"{where}: a config is a mapping of keys to values, got {data!r}"]
    try:
        return TrainConfig.model_validate(dict(data))
    except ValidationError as exc:
        return describe_errors(exc, data, origins, where)


def from_dict(data: Mapping[str, Any], origins: Mapping[str, Origin] | None = None,
              where: str = "config") -> TrainConfig:
    """Validate `data`; a ConfigError names the failing keys, their values and origins."""
    result = validate(data, origins, where)
    if isinstance(result, list):
        raise ConfigError("; ".join(result))
    return result


def config_digest(cfg: TrainConfig, data_version: str) -> str:
    """8 hex digits of everything that defines a trained model: its config (less where it is
    written and tracked, and whether system metrics are) and the data version."""
    config = cfg.to_dict() | {"out_dir": None, "experiment": None}
    # What is tracked and how batches are read, not what is trained: digests stay as they were.
    del config["system_metrics"], config["loader_workers"]
    blob = json.dumps({"config": config, "data": data_version}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


# --- files and overrides ----------------------------------------------------------------------

def parse_value(text: str) -> Any:
    """`--set` values are YAML scalars: 0.2, true, null, [1, 5] and plain strings all work; the
    config's types then check them (and read 1e-3, a string to YAML, as a number)."""
    return yaml.safe_load(text)


def split_override(item: str, flag: str = "--set") -> tuple[str, Any]:
    """`key=value` -> (key, parsed value); the key may be dotted (`model_args.dim`)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        form = "KEY=[values]" if flag == "--grid" else "key=value"
        raise ConfigError(f"{flag} expects {form}, got {item!r}")
    try:
        return key.strip(), parse_value(value)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"{flag} {item.strip()}: the value is not YAML ({problem}); quote "
                          "it or write a list as [a, b]") from None


def apply_overrides(data: Mapping[str, Any], overrides: list[str],
                    origins: dict[str, Origin] | None = None) -> dict[str, Any]:
    """Apply `key=value` (dotted keys reach into mappings such as `model_args.dim=64`); records
    in `origins` that each top-level key now comes from its `--set`."""
    out = dict(data)
    for item in overrides:
        key, value = split_override(item)
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            child = node.get(p)
            if child is not None and not isinstance(child, Mapping):
                raise ConfigError(f"--set {item}: {p} is {child!r}, not a mapping of keys")
            node[p] = dict(child or {})
            node = node[p]
        node[leaf] = value
        if origins is not None:
            origins[key.split(".")[0]] = Origin(f"--set {item.strip()}", key.split(".")[0])
    return out


def read_yaml(path: str | Path, what: str) -> Any:
    """A YAML file's content; a missing file is a FileNotFoundError naming it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    return yaml.safe_load(path.read_text())


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a study's YAML (its `train:` section if it has one) and apply overrides."""
    data: dict[str, Any] = {}
    origins: dict[str, Origin] = {}
    where = "--set" if path is None else str(path)
    if path is not None:
        content = read_yaml(path, "config") or {}
        if not isinstance(content, dict):
            raise ConfigError(f"{path}: a config is a YAML mapping of keys to values")
        section = "train" in content
        data = content["train"] if section else content
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: train: expected a mapping of config keys, got {data!r}")
        data = dict(data)
        origins = {str(k): Origin(str(path), f"train.{k}" if section else str(k)) for k in data}
    return from_dict(apply_overrides(data, overrides or [], origins), origins, where)


# --- the reference (docs/configuration.md) ----------------------------------------------------

def _default_text(model: type[BaseModel], key: str) -> str:
    info = model.model_fields[key]
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True)
    return f"`{json.dumps(value)}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def fields_table(model: type[BaseModel]) -> str:
    """A markdown table of `model`'s keys: key, type, default, description."""
    rows = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    for key, info in model.model_fields.items():
        rows.append(f"| `{key}` | {_cell(expected_text(model, key))} | "
                    f"{_default_text(model, key)} | {_cell(info.description or '')} |")
    return "\n".join(rows)


def markdown() -> str:
    """docs/configuration.md: every key of a training config and of a study."""
    from tasks.study.ablation import GRID_KEYS, StudySpec

    rules = "\n".join(f"- {r.doc}" for r in RULES)
    return f"""# Configuration reference

Generated from `tasks/fewshot/config.py` and `tasks/study/ablation.py`; do not edit by hand:

    python -m tasks.fewshot.config --markdown > docs/configuration.md

A **training config** (`fss train --config FILE`, `fss evaluate --config FILE`) is a YAML mapping
of the keys below, either at the top level or under `train:`. `--set key=value` (repeatable)
overrides a key; the value is read as a YAML scalar (`0.2`, `true`, `null`, `[1, 5]`, a plain
string), and a dotted key reaches into `model_args` (`--set model_args.dim=64`). A number key
also takes `1e-3` (a string to YAML), and a list key a single value (`test_shots=5` is `[5]`).

Everything is checked before anything is created (no run folder, no MLflow database): an
unknown key (with the nearest known key as a hint), a value of the wrong type or out of range,
and the rules between keys below. The error is one line naming the file or the `--set`, the
key, the value and what was expected, and `fss` exits with code 2:

    fss: error: --set lr=fast: lr: expected a number > 0, got 'fast'

## Training config keys

{fields_table(TrainConfig)}

A point's run folder and MLflow run name end in a digest of its config (all keys but
`experiment`, `out_dir` and `system_metrics`) and of the data version, so a finished point is
read back, not retrained.

## Rules between keys

{rules}

## Studies

A **study** (`fss ablate --config FILE`) expands into training points: each point is `base`,
then its model's keys from `models`, then its grid values (or the keys of an extra point), then
the `--set` overrides of `fss ablate`, which reach every point. `fss ablate --grid KEY=[values]`
replaces a grid axis. Every point is validated as a training config before anything runs.

{fields_table(StudySpec)}

Grid keys (the sweepable axes): {', '.join(f'`{k}`' for k in GRID_KEYS)}.
"""


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tasks.fewshot.config",
                                     description="The configuration reference.")
    parser.add_argument("--markdown", action="store_true",
                        help="print docs/configuration.md (every key, type, default)")
    args = parser.parse_args(argv)
    if not args.markdown:
        parser.print_help()
        return 0
    from tasks.fewshot import config  # not __main__'s copy: the one the study schema uses

    sys.stdout.write(config.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
