"""How fast `--help` answers: argparse vs typer vs cyclopts for a CLI the size of `fss`, and
`fss --help` itself.

    .venv/bin/python benchmarks/cli.py                  # 5 repeats, interleaved
    .venv/bin/python benchmarks/cli.py --baseline /work/main   # also an older checkout's fss

Each framework gets the same generated CLI: 14 commands with 7 options each (an int with a
default, a string, a flag, ...), about the 90 options `fss` has. Every variant runs as a fresh
interpreter (`python script --help` and `python script cmd7 --help`), the variants interleaved
`--repeats` times; the table shows the median wall time. `fss --help` and `fss pseudo --help`
run this checkout's code (PYTHONPATH) through the venv's `fss` entry point, and with
`--baseline DIR` also the code of another checkout (e.g. the commit before the CLI package).
A second table is `python -X importtime`
of the framework's import alone (cumulative, median). The machine may be shared: compare the
rows of one run, and read the load average printed at the start and the end.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMANDS = 14
OPTIONS = 7  # per command

ARGPARSE = '''
import argparse, difflib
p = argparse.ArgumentParser(prog="bench", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
sub = p.add_subparsers(dest="command", required=True)
for c in range({commands}):
    s = sub.add_parser(f"cmd{{c}}", help=f"command {{c}} does things",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for o in range({options}):
        if o % 3 == 0:
            s.add_argument(f"--opt{{o}}", type=int, default=o, help="an int")
        elif o % 3 == 1:
            s.add_argument(f"--name{{o}}", default="x", help="a string")
        else:
            s.add_argument(f"--flag{{o}}", action="store_true", help="a flag")
    s.set_defaults(func=lambda a: 0)
a = p.parse_args()
'''

TYPER = '''
import typer
app = typer.Typer(suggest_commands=True)
def make(c):
    def cmd(opt0: int = typer.Option(0, help="an int"),
            name1: str = typer.Option("x", help="a string"),
            flag2: bool = typer.Option(False, help="a flag"),
            opt3: int = typer.Option(3, help="an int"),
            name4: str = typer.Option("x", help="a string"),
            flag5: bool = typer.Option(False, help="a flag"),
            opt6: int = typer.Option(6, help="an int")):
        """command does things"""
    app.command(f"cmd{{c}}")(cmd)
for c in range({commands}):
    make(c)
app()
'''

CYCLOPTS = '''
from typing import Annotated
from cyclopts import App, Parameter
app = App()
def make(c):
    def cmd(*, opt0: Annotated[int, Parameter(help="an int")] = 0,
            name1: Annotated[str, Parameter(help="a string")] = "x",
            flag2: Annotated[bool, Parameter(help="a flag")] = False,
            opt3: Annotated[int, Parameter(help="an int")] = 3,
            name4: Annotated[str, Parameter(help="a string")] = "x",
            flag5: Annotated[bool, Parameter(help="a flag")] = False,
            opt6: Annotated[int, Parameter(help="an int")] = 6):
        """command does things"""
    app.command(cmd, name=f"cmd{{c}}")
for c in range({commands}):
    make(c)
app()
'''

FRAMEWORKS = {"argparse": ARGPARSE, "typer": TYPER, "cyclopts": CYCLOPTS}
IMPORTS = {"argparse": "argparse", "typer": "typer", "cyclopts": "cyclopts"}


def _env(root: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def wall(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr[-2000:]}")
    return seconds


def import_us(module: str) -> int:
    """Cumulative microseconds of `import module` in a fresh interpreter (-X importtime)."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"],
                          capture_output=True, text=True)
    for line in done.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\s*)(\S+)$", line)
        if m and m.group(3) == module and not m.group(2):
            return int(m.group(1))
    raise RuntimeError(f"no importtime line for {module}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--fss", default=str(Path(sys.executable).with_name("fss")),
                    help="the fss entry point to time (empty: skip)")
    ap.add_argument("--baseline", type=Path, help="another checkout whose fss to time as well")
    args = ap.parse_args()
    root = Path(__file__).resolve().parents[1]
    env = _env(root)
    print(f"load average at start: {os.getloadavg()[0]:.2f}; python {sys.version.split()[0]}")
    with tempfile.TemporaryDirectory() as tmp:
        variants: dict[str, list[str]] = {}
        envs: dict[str, dict[str, str]] = {}
        for name, source in FRAMEWORKS.items():
            script = Path(tmp) / f"{name}_cli.py"
            script.write_text(source.format(commands=COMMANDS, options=OPTIONS))
            variants[f"{name}: --help"] = [sys.executable, str(script), "--help"]
            variants[f"{name}: cmd7 --help"] = [sys.executable, str(script), "cmd7", "--help"]
        if args.fss:
            variants["fss --help"] = [args.fss, "--help"]
            variants["fss pseudo --help"] = [args.fss, "pseudo", "--help"]
            if args.baseline:
                for key in ("fss --help", "fss pseudo --help"):
                    variants[f"{key} (baseline)"] = variants[key]
                    envs[f"{key} (baseline)"] = _env(args.baseline.resolve())
        variants["python -c pass"] = [sys.executable, "-c", "pass"]
        times: dict[str, list[float]] = {k: [] for k in variants}
        imports: dict[str, list[int]] = {k: [] for k in IMPORTS}
        for _ in range(args.repeats):
            for key, cmd in variants.items():
                times[key].append(wall(cmd, envs.get(key, env)))
            for key, module in IMPORTS.items():
                imports[key].append(import_us(module))
    print(f"\n`--help` wall time, median of {args.repeats} (fresh interpreter each)"
          + (f"; baseline: {args.baseline}" if args.baseline else ""))
    print(f"| {'variant':<28} | {'median s':>8} | {'min s':>6} | {'max s':>6} |")
    print(f"| {'-' * 28} | {'-' * 7}: | {'-' * 5}: | {'-' * 5}: |")
    for key, ts in times.items():
        print(f"| {key:<28} | {statistics.median(ts):8.3f} | {min(ts):6.3f} | {max(ts):6.3f} |")
    print(f"\nimport time of the framework alone (python -X importtime, cumulative, median of "
          f"{args.repeats})")
    print(f"| {'framework':<10} | {'ms':>6} |")
    print(f"| {'-' * 10} | {'-' * 5}: |")
    for key, us in imports.items():
        print(f"| {key:<10} | {statistics.median(us) / 1000:6.1f} |")
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
