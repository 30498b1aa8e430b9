"""`fss`: the command line. Each command runs a flow (or a plain read) and says what it did.

Built on argparse, chosen by measurement (benchmarks/cli.py, a generated CLI of this size,
14 commands x 7 options, fresh interpreter, median of 5 on an idle machine): `--help` answers
in 0.04 s with argparse against 0.17-0.26 s with typer 0.29 and 0.18 s with cyclopts 5.5
(python itself starts in 0.026 s; both import rich). `fss --help` went from 4.35 s to 0.058 s.
argparse also keeps the commands' behaviour exactly (mutually exclusive groups, repeatable
options, usage errors on one line with exit 2, the parsers the tests build), where typer and
cyclopts print errors in multi-line boxes. What argparse lacks on Python 3.11 is added in a
few lines: defaults in the help (`DefaultsFormatter`) and "did you mean" for a mistyped
command, choice or option (`FssParser`, as Python 3.14's `suggest_on_error`).

The parser imports no heavy module: each command module (data, labelfree, study, services,
demo) imports torch, Prefect, Dask, Zarr or MLflow inside the command function it runs, and
the defaults come from `tasks.defaults` (standard library only), so `fss --help` and
`fss <command> --help` stay fast (tests/test_cli.py checks what they import). A command that
runs Prefect flows says so with `set_defaults(func=..., runs_flows=True)`: `main` then imports
Prefect before it hides user errors from Prefect's console handler.
"""

from __future__ import annotations

import argparse
import difflib
import os
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn

from flows.cli import data, demo, labelfree, services, study

DISTRIBUTION = "fewshot-budget"  # [project] name in pyproject.toml
PROJECT_DIR = Path(__file__).resolve().parents[2]


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help with each option's default, except where it says nothing (None, False, [])."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        if default is None or default is False or default == [] or default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


class FssParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors suggest the nearest command, choice or option."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        # As Python 3.14's suggest_on_error: a mistyped command or choice names the nearest one.
        if action.choices is not None and value not in action.choices:
            choices = [str(c) for c in action.choices]
            close = difflib.get_close_matches(str(value), choices, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise argparse.ArgumentError(
                action, f"invalid choice: {value!r} (choose from {', '.join(choices)}).{hint}")

    def nearest_option(self, arg: str) -> str | None:
        """This parser's option nearest to a mistyped one (`--sead 3`, `--sed=3`), if any."""
        if not arg.startswith("-"):
            return None
        known = {o.lstrip("-"): o for a in self._actions for o in a.option_strings}
        close = difflib.get_close_matches(arg.split("=")[0].lstrip("-"), known, n=1)
        return known[close[0]] if close else None

    def parse_known_args(self, args: Any = None, namespace: Any = None,
                         ) -> tuple[argparse.Namespace, list[str]]:
        self._args = list(sys.argv[1:] if args is None else args)
        namespace, extras = super().parse_known_args(args, namespace)
        # An unknown option reaches the top parser's error, which knows only its own options:
        # each (sub)parser notes the nearest of its options here, in the shared namespace. The
        # innermost parser answers first and knows the command's options: its hint is kept.
        hints = getattr(namespace, _HINTS, {})
        for arg in extras:
            if (near := self.nearest_option(arg)) is not None:
                hints.setdefault(arg, near)
        if hints:
            setattr(namespace, _HINTS, hints)
        return namespace, extras

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:
        namespace, extras = self.parse_known_args(args, namespace)
        hints = vars(namespace).pop(_HINTS, {})
        if extras:
            self.error("unrecognized arguments: " + " ".join(
                f"{a} (did you mean {hints[a]}?)" if a in hints else a for a in extras))
        return namespace

    def error(self, message: str) -> NoReturn:
        # A missing required argument stops the parse before unknown options are reported:
        # name the mistyped option too (`fss ingest --nme x` lacks --name because of it).
        if message.startswith("the following arguments are required"):
            own = {o for a in self._actions for o in a.option_strings}
            typos = [f"{a} (did you mean {near}?)" for a in getattr(self, "_args", [])
                     if a.split("=")[0] not in own and (near := self.nearest_option(a))]
            if typos:
                message += "; unrecognized arguments: " + " ".join(typos)
        super().error(message)


_HINTS = "_fss_option_hints"


class VersionAction(argparse.Action):
    """`--version`: computed when asked for, so no other call runs git."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        print(version_text())
        parser.exit()


def version_text() -> str:
    """`fss <package version>`, plus the git commit of a source checkout (`-dirty` if edited)."""
    import subprocess
    from importlib import metadata

    try:
        text = f"fss {metadata.version(DISTRIBUTION)}"
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        text = "fss (not installed)"
    if (PROJECT_DIR / ".git").exists():
        try:
            commit = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"],
                                    cwd=PROJECT_DIR, capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            return text
        if commit.returncode == 0 and commit.stdout.strip():
            text += f" (git {commit.stdout.strip()})"
    return text


def build_parser() -> argparse.ArgumentParser:
    p = FssParser(prog="fss", description="Label-efficient few-shot semantic segmentation: each "
                  "command runs a flow (or a plain read) and says what it did.",
                  epilog="`fss COMMAND --help` lists a command's options and their defaults.")
    p.add_argument("--version", action=VersionAction, help="package version and git commit")
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of an error (a user error is otherwise one line)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           parser_class=FssParser)
    # The order of `fss --help`: the pipeline's stages, then the services, then the demo.
    data.add_parsers(sub)
    study.add_parsers(sub)
    labelfree.add_parsers(sub)
    services.add_parsers(sub)
    demo.add_demo_parser(sub)
    return p


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    # SIGTERM (kill, Kubernetes, CI timeouts) unwinds like Ctrl-C, so `finally` blocks stop the
    # temporary Prefect server and Dask cluster instead of orphaning them.
    raise SystemExit(128 + signum)


# Keep the terminal for progress bars and results: Prefect prints warnings and errors only,
# while run logs (get_run_logger, INFO) still reach the API and the UI, the library's own
# (`tasks.*`) among them; outside a run those stay local. Set by `main` before anything imports
# dask or prefect (a variable the user set wins), and inherited by the Dask workers.
CLI_ENVIRONMENT = {
    "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING",
    "DASK_LOGGING__DISTRIBUTED": "warning",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "tasks",
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
}


def main(argv: list[str] | None = None) -> int:
    for name, value in CLI_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    args = build_parser().parse_args(argv)
    # Imported after parsing: `--help` and usage errors need none of these.
    import logging
    import traceback

    from flows.cli.errors import HideUserErrors, is_user_error, one_line

    if getattr(args, "runs_flows", False):
        # Prefect adds its console handler to the root logger when first imported: import it
        # before the filter below is added to the root's handlers (the parser imports nothing).
        import prefect.main  # noqa: F401

    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    hide = None if args.debug else HideUserErrors()
    for handler in logging.getLogger().handlers if hide else ():
        handler.addFilter(hide)
    try:
        return args.func(args)
    except Exception as exc:
        if not is_user_error(exc):
            raise
        if args.debug:
            traceback.print_exc()
        print(f"fss: error: {one_line(exc)}", file=sys.stderr)
        return 2
    finally:
        for handler in logging.getLogger().handlers if hide else ():
            handler.removeFilter(hide)
