"""Typed configs (issue 15): every config and study file loads, bad values fail before anything
is created with one line naming where, the key, the value and what was expected, digests are
those of the dataclass configs, and the reference in docs/ is current."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tasks.fewshot.config import (
    ConfigError,
    TrainConfig,
    config_digest,
    from_dict,
    load_config,
    markdown,
)
from tasks.study.ablation import GRID_KEYS, load_study, study_from_dict

ROOT = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted(ROOT.glob("configs/*.yaml")) + sorted(ROOT.glob("docs/byod/*.yaml"))
SYNTHETIC = ROOT / "configs" / "synthetic.yaml"
STUDY = ROOT / "configs" / "ablation-synthetic.yaml"


def _kind(path: Path) -> str:
    content = yaml.safe_load(path.read_text())
    if "study" in content:
        return "study"
    if {"images", "masks"} <= set(content):
        return "layout"  # a layout file of `fss ingest --layout` (tests/test_layout.py)
    return "train"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_config_file_loads_and_validates(path: Path) -> None:
    kind = _kind(path)
    if kind == "layout":
        pytest.skip("a layout file, not a config")
    if kind == "train":
        cfg = load_config(path)
        assert isinstance(cfg, TrainConfig)
        assert from_dict(cfg.to_dict()) == cfg  # what a run folder's config.yaml reloads
        return
    study = load_study(path)
    assert study.points and all(isinstance(p, TrainConfig) for p in study.points)
    assert {p.experiment for p in study.points} == {study.experiment}
    grid = yaml.safe_load(path.read_text()).get("grid") or {}
    # Every grid point (and extra point) became a validated config.
    n_grid = 1
    for values in grid.values():
        n_grid *= len(values) if isinstance(values, list) else 1
    extra = len(yaml.safe_load(path.read_text()).get("points") or [])
    assert len(study.points) == (n_grid if grid else 0) + extra


def test_config_files_are_of_a_known_kind() -> None:
    kinds = {str(p.relative_to(ROOT)): _kind(p) for p in CONFIG_FILES}
    assert kinds["configs/synthetic.yaml"] == "train"
    assert kinds["configs/ablation-synthetic.yaml"] == "study"
    assert kinds["docs/byod/streets.yaml"] == "layout"
    assert set(kinds.values()) == {"train", "study", "layout"}


def test_digests_are_those_of_the_dataclass_configs() -> None:
    """Run folders and MLflow run names are keyed on the digest: the reference digests were
    computed by the dataclass TrainConfig (tests/config_digest_cases.py says how)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from config_digest_cases import digests

    reference = json.loads((ROOT / "tests" / "config_digests.json").read_text())
    now = digests()
    assert [e["recipe"] for e in now] == [e["recipe"] for e in reference]
    changed = [(e["recipe"], e["digest"], r["digest"]) for e, r in zip(now, reference, strict=True)
               if e["digest"] != r["digest"]]
    assert not changed
    assert len(reference) > 150  # every study point, pseudo phases and demo points included


def test_integers_stay_integers_and_numbers_read_from_text() -> None:
    cfg = load_config(SYNTHETIC, ["ce_weight=1", "budget=1", "lr=1e-3", "test_shots=5",
                                  "dataset=2012"])
    assert (cfg.ce_weight, cfg.budget, cfg.lr, cfg.test_shots, cfg.dataset) == (
        1, 1, 0.001, [5], "2012")
    assert type(cfg.ce_weight) is int and type(cfg.budget) is int  # the digest as it was
    assert config_digest(cfg, "v") != config_digest(cfg.replace(ce_weight=1.0), "v")


@pytest.mark.parametrize(("override", "message"), [
    ("lr=fast", "--set lr=fast: lr: expected a number > 0, got 'fast'"),
    ("fold=1.5", "--set fold=1.5: fold: expected an integer >= 0, got 1.5"),
    ("test_shots=five",
     "--set test_shots=five: test_shots: expected a list, each an integer >= 1, got 'five'"),
    ("steps=abc", "--set steps=abc: steps: expected an integer >= 1, got 'abc'"),
    ("steps=0", "--set steps=0: steps: expected an integer >= 1, got 0"),
    ("budget=1.5", "--set budget=1.5: budget: expected a number >= 0 and <= 1, got 1.5"),
    ("stepz=3", "--set stepz=3: stepz: unknown key (did you mean 'steps'?)"),
    ("optimizer=adam",
     "--set optimizer=adam: optimizer: expected one of 'adamw', 'sgd', got 'adam'"),
    ("lr=.inf", "--set lr=.inf: lr: expected a finite number, got inf"),
    ("cache_features=1", "--set cache_features=1: cache_features: expected true or false, got 1"),
    ("device=gpu",
     "--set device=gpu: device: expected 'auto', 'cpu', 'mps', 'cuda' or 'cuda:N', got 'gpu'"),
    ("fold=4", "--set fold=4: fold must be below n_folds (folds are 0..n_folds-1), got fold 4 "
               "with n_folds 4"),
    ("test_split=train",
     "--set test_split=train: test_split cannot be 'train': the labelled images come from it"),
    ("steps", "--set expects key=value, got 'steps'"),
    ("novel_classes=[car", "--set novel_classes=[car: the value is not YAML (expected ',' or "
                           "']', but got '<stream end>'); quote it or write a list as [a, b]"),
])
def test_bad_overrides_are_one_line_naming_key_value_and_expectation(
        override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(SYNTHETIC, [override])
    assert str(err.value) == message


def test_errors_in_a_file_name_the_file_and_the_key_as_written(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  model: umt\n  ways: 2\n  lr: -1\n  batchsize: 4\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (f"{path}: train.lr: expected a number > 0, got -1; "
                              f"{path}: train.batchsize: unknown key (did you mean "
                              "'batch_size'?)")
    # A rule between keys names every place its keys came from.
    path.write_text("train:\n  model: umt\n  ways: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["ways=3"])
    assert str(err.value) == (f"{path}, --set ways=3: model 'umt' needs ways 1 (the UMT "
                              "Transformer is a 1-way model), got ways 3")


def test_study_errors_name_the_section_of_the_file(tmp_path: Path) -> None:
    spec = yaml.safe_load(STUDY.read_text())
    spec["models"]["umt"]["pseudo_steps"] = -5
    spec["base"]["lr"] = "fast"
    spec["points"][0]["ways"] = 0
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError) as err:
        load_study(path)
    line = str(err.value)
    assert "\n" not in line
    # Each fault once, however many points share it.
    assert line.count(f"{path}: base.lr: expected a number > 0, got 'fast'") == 1
    assert line.count(f"{path}: models.umt.pseudo_steps: expected an integer >= 0, "
                      "got -5") == 1
    assert f"{path}: points[0].ways: expected an integer >= 1, got 0" in line

    # Grid values are validated, through --grid too, before anything runs.
    with pytest.raises(ConfigError, match=re.escape(
            "--grid budget=[0.2, 2]: budget: expected a number >= 0 and <= 1, got 2")):
        load_study(STUDY, grid_items=["budget=[0.2, 2]"])
    with pytest.raises(ConfigError, match=re.escape("'lr' is not sweepable")):
        load_study(STUDY, grid_items=["lr=[1]"])
    with pytest.raises(ConfigError, match=re.escape(
            "--set steps=abc: steps: expected an integer >= 1, got 'abc'")):
        load_study(STUDY, ["steps=abc"])

    # The study's own keys: unknown keys, model names and grid keys with a hint.
    bad = {"study": "s", "experiment": "e", "grid": {"seeds": [0]}, "modles": {},
           "models": {"umtt": {}}}
    with pytest.raises(ConfigError) as err:
        study_from_dict(bad, where="s.yaml")
    line = str(err.value)
    assert "s.yaml: grid: 'seeds' is not sweepable (did you mean 'seed'?)" in line
    assert "s.yaml: models: 'umtt' is not a model (did you mean 'umt'?)" in line
    assert "s.yaml: modles: unknown key (did you mean 'models'?)" in line
    with pytest.raises(ConfigError, match="s.yaml: study: required key is missing"):
        study_from_dict({"experiment": "e", "grid": {"seed": [0]}}, where="s.yaml")


def test_study_points_keep_seeds_and_names() -> None:
    study = load_study(STUDY, ["steps=5"], grid_items=["seed=[4]"], name="variant")
    assert study.name == "variant" and study.spec.study == "variant"
    assert {p.seed for p in study.points if p.model == "umt"} == {4}
    assert {p.steps for p in study.points} == {5} and study.overrides == ["steps=5"]
    assert set(GRID_KEYS) == {"model", "budget", "fold", "shots", "ways", "seed", "budget_seed"}


def test_replace_validates_and_keeps_the_budget_draw() -> None:
    cfg = TrainConfig(seed=3)
    assert cfg.replace(seed=5).budget_seed == 3  # as dataclasses.replace did
    with pytest.raises(ConfigError, match="lr: expected a number > 0"):
        cfg.replace(lr=0)


def _fss(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    exe = Path(sys.executable).with_name("fss")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=180,
                          cwd=cwd, env=env)


def test_refused_commands_exit_2_and_create_nothing(tmp_path: Path) -> None:
    """`fss train` and `fss ablate` refuse a bad value before a Prefect server, a cluster, a run
    folder or the MLflow database (sqlite:///<cwd>/mlflow.db) exists."""
    train = _fss("train", "--config", str(SYNTHETIC), "--set", "lr=fast", cwd=tmp_path)
    assert train.returncode == 2, train.stderr
    assert train.stderr.strip() == "fss: error: --set lr=fast: lr: expected a number > 0, " \
                                   "got 'fast'"
    ablate = _fss("ablate", "--config", str(STUDY), "--grid", "budget=[0.2, 1.5]", cwd=tmp_path)
    assert ablate.returncode == 2, ablate.stderr
    assert ablate.stderr.strip() == ("fss: error: --grid budget=[0.2, 1.5]: budget: expected "
                                     "a number >= 0 and <= 1, got 1.5")
    assert list(tmp_path.iterdir()) == []
    # A checkpoint's own config, overridden.
    checkpoint = tmp_path / "c.pt"
    torch.save({"model": {}, "config": {"model": "panet"}}, checkpoint)
    evaluate = _fss("evaluate", "--checkpoint", str(checkpoint), "--set", "test_shots=[0]",
                    cwd=tmp_path)
    assert evaluate.returncode == 2, evaluate.stderr
    assert evaluate.stderr.strip() == ("fss: error: --set test_shots=[0]: test_shots: expected "
                                       "a list, each an integer >= 1, got [0]")


def test_train_flow_takes_a_typed_config() -> None:
    """Prefect validates the flows' typed parameters and shows their schema."""
    from prefect.utilities.callables import parameter_schema

    from flows.ablate import ablation_flow
    from flows.train import train_flow

    schema = parameter_schema(train_flow.fn).model_dump()
    config = schema["definitions"]["TrainConfig"]["properties"]
    assert config["lr"]["description"].startswith("Peak learning rate")
    assert config["model"]["enum"] == ["metasegnet", "panet", "umt"]
    assert "StudySpec" in parameter_schema(ablation_flow.fn).model_dump()["definitions"]
    validated = train_flow.validate_parameters({"config": {"model": "panet", "steps": 5}})
    assert validated["config"] == TrainConfig(model="panet", steps=5)


def test_the_reference_is_current() -> None:
    """docs/configuration.md is generated: python -m tasks.fewshot.config --markdown."""
    assert (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8") == markdown()
