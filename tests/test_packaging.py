"""Packaging: the locks pin everything and satisfy pyproject's ranges; CI runs the README's command."""
from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

import bora_lab

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _lock(name: str) -> dict[str, Version]:
    pins = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        assert re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[^\s;]+", line), f"{name}: not an exact pin: {line!r}"
        pkg, version = line.split("==")
        pins[re.sub(r"[-_.]+", "-", pkg).lower()] = Version(version)
    return pins


def _requirements(extras: tuple[str, ...]) -> list[Requirement]:
    reqs = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    for extra in extras:
        reqs += [Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"][extra]]
    return [r for r in reqs if r.name != "bora-lab"]  # self-references (test -> app)


@pytest.mark.parametrize("lock, extras", [("requirements.txt", ("app",)),
                                          ("requirements-test.txt", ("app", "test"))])
def test_lock_pins_every_range_of_pyproject(lock, extras):
    pins = _lock(lock)
    for req in _requirements(extras):
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in pins, f"{lock} lacks {req.name} (run bash scripts/lock.sh)"
        assert req.specifier.contains(pins[name], prereleases=True), f"{lock}: {name}=={pins[name]} outside {req}"


def test_app_lock_has_no_test_tools():
    assert not {"pytest", "playwright", "nbclient"} & set(_lock("requirements.txt"))


def test_ci_runs_the_readme_test_command():
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text()
    command = next(line for line in readme.splitlines() if line.startswith("pip install") and "pytest" in line)
    assert command.replace("pip install ", "pip install -q ") in ci


def test_version_has_one_source():
    assert PYPROJECT["project"]["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "bora_lab.__version__"}
    try:
        installed = metadata.version("bora-lab")
    except metadata.PackageNotFoundError:
        pytest.skip("bora-lab is not installed (pip install -e .): the installed version cannot be compared")
    assert installed == bora_lab.__version__


def test_console_script_points_at_the_cli():
    assert PYPROJECT["project"]["scripts"]["bora-lab"] == "bora_lab.cli:main"
    from bora_lab.cli import main

    assert callable(main)
