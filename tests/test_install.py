"""Installing: pinned versions by default (constraints.txt), light optional extras, and deprecations that fail
the suite as soon as our code triggers one."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the checks below need not run on every Python


def load_writer():
    spec = importlib.util.spec_from_file_location("write_constraints", ROOT / "scripts" / "write_constraints.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def constraints() -> dict[str, Requirement]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            assert len(req.specifier) == 1 and next(iter(req.specifier)).operator == "==", line
            assert canonicalize_name(req.name) not in pins, f"{req.name} pinned twice"
            pins[canonicalize_name(req.name)] = req
    return pins


def test_constraints_pin_every_requirement_within_its_range():
    """Adding a dependency (or an extra's) without regenerating constraints.txt would leave it floating."""
    pins = constraints()
    assert "torch" not in pins  # environment_setup.sh picks the torch build per machine
    project = pyproject()
    wanted = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]
    for req in wanted:
        name = canonicalize_name(req.name)
        if name == "torch" or (req.marker is not None and not req.marker.evaluate()):
            continue
        assert name in pins, f"{req.name} is not in constraints.txt; regenerate it (scripts/write_constraints.py)"
        pin = pins[name]
        if pin.marker is None or pin.marker.evaluate():
            version = next(iter(pin.specifier)).version
            assert req.specifier.contains(version, prereleases=True), f"constraints.txt {pin} is outside {req}"


def fake_venv(tmp_path: Path) -> tuple[Path, Path]:
    """A venv whose python records its arguments and pretends torch 2.13.0 is installed and every pip call works."""
    log = tmp_path / "calls.log"
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    python = bin_dir / "python"
    python.write_text(
        "#!/usr/bin/env bash\n"
        f'echo "$*" >> "{log}"\n'
        'if [[ "$1" == "-" ]]; then cat >/dev/null; echo 2.13.0; fi\n'  # the torch-version probe reads stdin
        'if [[ "$1" == "-c" ]]; then echo "fake-python 3.11"; fi\n'
        "exit 0\n"
    )
    python.chmod(0o755)
    return tmp_path / "venv", log


@pytest.mark.parametrize("latest", [False, True])
def test_setup_script_installs_the_pinned_versions_unless_latest(tmp_path, latest):
    venv, log = fake_venv(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("VILA_TORCH_SPEC", "VIRTUAL_ENV", "CONDA_PREFIX")}
    cmd = [str(ROOT / "environment_setup.sh"), "--venv", str(venv), "--dev"] + (["--latest"] if latest else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    installs = [line for line in log.read_text().splitlines() if line.startswith("-m pip install")]
    assert installs == (["-m pip install -e .[dev]"] if latest else ["-m pip install -c constraints.txt -e .[dev]"])


def test_setup_script_documents_latest():
    out = subprocess.run([str(ROOT / "environment_setup.sh"), "--help"], capture_output=True, text=True).stdout
    assert "--latest" in out and "constraints.txt" in out


def test_deprecations_from_our_calls_fail_the_suite():
    """pyproject's filterwarnings: a transformers deprecation notice reached through a model call (attributed to
    torch's Module.__call__) and a DeprecationWarning raised in a vila module are errors, not log lines."""
    import torch
    from transformers.utils.deprecation import deprecate_kwarg

    class Model(torch.nn.Module):
        @deprecate_kwarg("past", "99.0.0", new_name="cache")
        def forward(self, cache=None):
            return cache

    with pytest.raises(FutureWarning, match="`past` is deprecated"):
        Model()(past=1)
    with pytest.raises(DeprecationWarning):
        warnings.warn_explicit("old API", DeprecationWarning, "vila/somewhere.py", 1, module="vila.somewhere")
    with warnings.catch_warnings(record=True):  # other libraries' own DeprecationWarnings stay warnings
        warnings.warn_explicit("old API", DeprecationWarning, "elsewhere.py", 1, module="elsewhere")


def test_json_extra_is_light():
    """`pip install 'vila[json]'` adds a few MB beyond the base install, and no GPU stack: xgrammar pulled
    about 1 GB of triton, even on machines without a GPU."""
    writer = load_writer()
    project = pyproject()
    base = writer.closure([Requirement(r) for r in project["dependencies"]])
    added = {
        name: dist
        for name, dist in writer.closure([Requirement(r) for r in project["optional-dependencies"]["json"]]).items()
        if name not in base
    }
    assert added, "the json extra installs nothing?"
    assert "triton" not in added and "torch" not in added
    size = sum(f.size or 0 for dist in added.values() for f in dist.files or [])
    assert size < 20e6, f"the json extra adds {size / 1e6:.0f} MB: {sorted(added)}"


def test_write_constraints_pins_only_the_project_tree():
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "write_constraints.py")], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    names = {canonicalize_name(Requirement(line).name) for line in out.stdout.splitlines() if not line.startswith("#")}
    assert {"transformers", "pytest", "llguidance"} <= names
    assert "torch" not in names and "vila" not in names and "sympy" not in names  # sympy: torch's own
