"""constraints.txt: the install `make install` and the image use is the one the tests ran on."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _pins() -> list[tuple[str, str, list[str]]]:
    """(name, version, the comment lines right above it) for each `name==version` line."""
    pins, comment = [], []
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.strip()
        if line.startswith("#"):
            comment.append(line)
        elif line:
            m = re.fullmatch(r"([A-Za-z0-9_.-]+)==([0-9][^\s#]*)", line)
            assert m, f"constraints.txt: not a `name==version` pin: {line!r}"
            pins.append((m.group(1), m.group(2), comment))
        else:
            comment = []
    return pins


def test_every_pin_is_justified_installed_and_allowed_by_pyproject() -> None:
    pins = _pins()
    names = {canonicalize_name(n) for n, _, _ in pins}
    # The pins the known traps need (docs/architecture.md) are there.
    assert {"sqlalchemy", "fastapi", "prefect", "mlflow", "torch"} <= names
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    ranges = {canonicalize_name(r.name): r.specifier for r in map(Requirement, deps)}
    for name, pinned, comment in pins:
        assert comment, f"{name}=={pinned} has no comment saying why"
        spec = ranges.get(canonicalize_name(name))
        if spec is not None:  # a direct dependency: the pin lies within pyproject's range
            assert spec.contains(pinned, prereleases=True), f"{name}=={pinned} vs {spec}"
        try:
            installed = Version(version(name))
        except PackageNotFoundError:
            raise AssertionError(f"{name} is pinned but not installed") from None
        # 2.13.0+cpu satisfies ==2.13.0, as pip sees it.
        assert installed.public == Version(pinned).public, (
            f"{name} {installed} installed, constraints.txt says {pinned}: "
            "run make install (pip install -c constraints.txt -e '.[dev]')")
    assert ranges["sqlalchemy"].contains("2.0.58") and not ranges["sqlalchemy"].contains("2.1.9")


def test_make_install_and_the_image_use_the_constraints() -> None:
    assert "-c constraints.txt -e '.[dev]'" in (ROOT / "Makefile").read_text()
    assert "-c constraints.txt" in (ROOT / "infra" / "docker" / "Dockerfile").read_text()
