#!/usr/bin/env python
"""Print a pip constraints file pinning what ``pip install -e ".[dev]"`` installed in this environment.

    ./environment_setup.sh --venv /tmp/vila-latest --dev --latest   # newest versions within pyproject's ranges
    (run the test suite with /tmp/vila-latest; when it passes:)
    /tmp/vila-latest/bin/python scripts/write_constraints.py > constraints.txt

Only the project's own dependency tree is pinned (pyproject's dependencies and dev extra, then theirs), read from
the installed packages' metadata, so whatever else sits in the environment stays out. torch and the packages
torch itself requires are left out: environment_setup.sh picks the torch build per machine (CPU, CUDA, macOS),
and each build pins its own dependencies (torch 2.5.1 needs sympy==1.13.1, for instance). A package whose
pinned version does not support every Python the project does gets a marker, so that other Pythons take the
newest version pyproject allows instead of failing to install.
"""

from __future__ import annotations

import platform
import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
LEFT_TO_THE_TORCH_STEP = "torch"


def project_requirements(extras: tuple[str, ...] = ("dev",)) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    return [Requirement(r) for r in reqs]


def closure(roots: list[Requirement]) -> dict[str, metadata.Distribution]:
    """The installed distributions ``roots`` need, recursively (markers evaluated for this interpreter)."""
    env = default_environment()
    found: dict[str, metadata.Distribution] = {}
    seen: set[tuple[str, str]] = set()
    todo = [(r, "") for r in roots]
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({**env, "extra": extra}):
            continue
        name = canonicalize_name(req.name)
        if name not in found:
            try:
                found[name] = metadata.distribution(req.name)
            except metadata.PackageNotFoundError:
                sys.exit(f"{req.name} is required but not installed here; install the project first (see above)")
        for wanted in ("", *sorted(req.extras)):
            if (name, wanted) in seen:
                continue
            seen.add((name, wanted))
            todo += [(Requirement(sub), wanted) for sub in found[name].requires or []]
    return found


def python_marker(dist: metadata.Distribution) -> str:
    """A marker limiting the pin to the Pythons the pinned release supports, when that is not all of them."""
    requires = dist.metadata.get("Requires-Python")
    project_min = "3.10"
    if not requires or SpecifierSet(requires).contains(project_min):
        return ""
    return " and ".join(f'python_full_version {s.operator} "{s.version}"' for s in SpecifierSet(requires))


def main() -> None:
    needed = closure(project_requirements())
    torch_side = closure([Requirement(LEFT_TO_THE_TORCH_STEP)])
    needed.pop("vila", None)
    lines = []
    for name in sorted(needed):
        if name in torch_side:
            continue
        dist = needed[name]
        marker = python_marker(dist)
        lines.append(f"{name}=={dist.version}" + (f"; {marker}" if marker else ""))
    torch_version = metadata.version("torch")
    print(
        "# Versions the test suite passed with; environment_setup.sh installs with `pip install -c constraints.txt`\n"
        "# unless given --latest. torch and its own dependencies are chosen by environment_setup.sh's torch step.\n"
        f"# Written by scripts/write_constraints.py on Python {platform.python_version()}, torch {torch_version}.\n"
        + "\n".join(lines)
    )


if __name__ == "__main__":
    main()
