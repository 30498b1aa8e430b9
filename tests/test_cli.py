"""`fss` itself: help without heavy imports, defaults written once and shown, --version, typo
hints, and flows that never import the CLI."""

from __future__ import annotations

import ast
import inspect
import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from flows.cli import DISTRIBUTION, build_parser, main
from tasks import defaults

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "prefect", "mlflow", "dask", "distributed", "zarr")
COMMANDS = [["data", "synth"], ["ingest"], ["store", "inspect"], ["train"], ["evaluate"],
            ["ablate"], ["report"], ["pretrain"], ["features"], ["pseudo"], ["ui"], ["deploy"],
            ["server"], ["demo"]]


def _imported(done: subprocess.CompletedProcess) -> set[str]:
    """Top-level packages named by `python -X importtime` on stderr."""
    names = re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*([\w.]+)$", done.stderr, re.M)
    return {n.split(".")[0] for n in names}


def test_help_imports_no_heavy_package() -> None:
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "flows.cli", "--help"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pseudo" in done.stdout and "--version" in done.stdout
    imported = _imported(done)
    assert "argparse" in imported  # the parse works: importtime lines were read
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


def test_every_command_help_imports_no_heavy_package() -> None:
    script = (
        "import sys, json\nfrom flows.cli import main\n"
        f"for cmd in {COMMANDS!r}:\n"
        "    try:\n        main([*cmd, '--help'])\n    except SystemExit as e:\n"
        "        assert e.code == 0, cmd\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("usage: fss ") == len(COMMANDS)
    assert json.loads(done.stdout.splitlines()[-1]) == []


def _defaults(*argv: str) -> dict:
    return vars(build_parser().parse_args(list(argv)))


def test_cli_defaults_are_the_flows_and_tasks_defaults() -> None:
    """The CLI, the flows and the task functions agree because each default is written once."""
    from flows.deployments import pseudo_deployment
    from flows.pretrain import pretrain_flow
    from flows.pseudo import pseudo_flow
    from tasks.labelfree.clustering import PseudoConfig
    from tasks.labelfree.pretrain import pretrain

    cli = _defaults("pseudo", "--dataset", "d", "--features", "f")
    flow = inspect.signature(pseudo_flow.fn).parameters
    config = PseudoConfig()
    for option, field in [("k", "k"), ("seed", "seed"), ("sample_size", "sample_size"),
                          ("iters", "iters")]:
        assert cli[option] == flow[field].default == getattr(config, field), option
    assert cli["k"] == inspect.signature(pseudo_deployment.fn).parameters["k"].default
    assert (cli["sp_scale"], cli["sp_sigma"], cli["sp_min_size"]) == (
        config.sp_scale, config.sp_sigma, config.sp_min_size)
    assert tuple(cli["fit_splits"].split(",")) == config.fit_splits
    assert cli["report_dir"] == flow["report_dir"].default and cli["store"] == defaults.STORE

    cli = _defaults("pretrain", "--dataset", "d", "--out", "o")
    for params in (inspect.signature(pretrain).parameters,
                   inspect.signature(pretrain_flow.fn).parameters):
        assert [cli[k] for k in ("steps", "batch_size", "lr", "seed")] == [
            params[k].default for k in ("steps", "batch_size", "lr", "seed")]


def test_help_shows_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["pseudo", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # help wraps lines
    assert f"--k K clusters (30 PASCAL, 50 COCO) (default: {defaults.PSEUDO_K})" in text
    assert f"(default: {defaults.PSEUDO_SAMPLE_SIZE})" in text
    assert "(default: None)" not in text and "(default: False)" not in text


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"fss {metadata.version(DISTRIBUTION)}"), line
    if (ROOT / ".git").exists():
        assert re.search(r"\(git [0-9a-f]{12}(-dirty)?\)$", line), line


@pytest.mark.parametrize(("argv", "hint"), [
    (["trian"], "Did you mean 'train'?"),
    (["store", "inspcet"], "Did you mean 'inspect'?"),
    (["ingest", "--source", "voc", "--name", "x", "--resize", "sqare"], "Did you mean 'square'?"),
    (["pseudo", "--dataset", "x", "--features", "f", "--sead", "3"],
     "--sead (did you mean --seed?)"),
    (["--verison"], "--verison (did you mean --version?)"),
    (["ingest", "--source", "voc", "--nme", "x"], "required: --name; unrecognized arguments: "
                                                  "--nme (did you mean --name?)"),
])
def test_typos_get_a_suggestion(argv: list[str], hint: str,
                                capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err  # argparse's usage, then the error on one line
    errors = [line for line in err.splitlines() if re.match(r"fss( \w+)*: error: ", line)]
    assert len(errors) == 1 and hint in errors[0], err


def test_baseline_choices_are_the_models() -> None:
    """`fss evaluate --baseline` lists names without importing torch; they must stay the real
    baselines."""
    from flows.cli.study import BASELINES as CHOICES
    from models.baselines import BASELINES

    assert set(CHOICES) == set(BASELINES)


def test_flows_never_import_the_cli() -> None:
    """The CLI imports the flows, never the other way round (no flows.cli <-> flows cycle)."""
    for path in (ROOT / "flows").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not any(n.startswith("flows.cli") for n in names), (path.name, names)
