"""The package as installed: its wheel ships ``py.typed`` and the Apache-2.0 ``LICENSE`` that ``pyproject.toml``
declares, one version (``pyproject.toml`` → metadata → ``flashnorm.__version__``), a changelog entry for it, and
a public API that mypy types (tests/typecheck/public_api.py, also run here)."""

from __future__ import annotations

import email
import importlib.metadata
import pathlib
import re
import runpy
import shutil
import subprocess
import sys
import tomllib
import zipfile
from typing import get_args

import pytest

import flashnorm
from flashnorm import _version
from flashnorm.modes import ClippingModeName, DelegatedModeName, get_mode, valid_mode_names

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
TYPED_API = ROOT / "tests" / "typecheck" / "public_api.py"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel setuptools builds from a copy of the package's sources (the tree itself stays clean)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "flashnorm", src / "flashnorm", ignore=shutil.ignore_patterns("__pycache__"))
    code = "import sys; from setuptools import build_meta; print(build_meta.build_wheel(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", code, str(src / "dist")], cwd=src, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return zipfile.ZipFile(src / "dist" / done.stdout.split()[-1])


def _dist_info(wheel, name):
    return next(n for n in wheel.namelist() if re.fullmatch(rf"flashnorm-[^/]+\.dist-info/(licenses/)?{name}", n))


def test_license_is_the_apache_2_text_pyproject_declares():
    text = (ROOT / "LICENSE").read_text()
    assert PYPROJECT["license"] == {"text": "Apache-2.0"}
    assert text.split("\n")[1].strip() == "Apache License" and "Version 2.0, January 2004" in text
    for section in ("1. Definitions.", "4. Redistribution.", "9. Accepting Warranty or Additional Liability.",
                    "END OF TERMS AND CONDITIONS"):
        assert section in text
    assert len(text.splitlines()) == 202  # the full text, appendix included


def test_wheel_ships_py_typed_license_and_the_version(wheel):
    assert "flashnorm/py.typed" in wheel.namelist()
    assert wheel.read(_dist_info(wheel, "LICENSE")).decode() == (ROOT / "LICENSE").read_text()
    metadata = email.message_from_bytes(wheel.read(_dist_info(wheel, "METADATA")))
    assert metadata["Name"] == "flashnorm" and metadata["Version"] == PYPROJECT["version"]
    assert "Apache-2.0" in (metadata.get("License-Expression") or metadata.get("License") or "")
    assert not [n for n in wheel.namelist() if n.startswith("tests/")]


def test_version_is_pyproject_through_the_metadata():
    assert flashnorm.__version__ == importlib.metadata.version("flashnorm") == PYPROJECT["version"]


def test_a_source_tree_not_installed_reads_pyproject(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(_version, "version", not_installed)
    assert _version.read_version() == PYPROJECT["version"]


def test_changelog_has_the_version_and_no_commit_hash():
    text = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(rf"^## \[{re.escape(PYPROJECT['version'])}\]", text, re.M)
    assert "## [Unreleased]" in text
    assert not re.search(r"\b[0-9a-f]{7,40}\b", text), "a commit hash in the changelog"


def test_mode_name_literals_are_the_mode_table():
    """The Literal names that make_private's overloads dispatch on list exactly the table's modes and aliases."""
    assert sorted(get_args(ClippingModeName)) == sorted(n for n in valid_mode_names() if not get_mode(n).delegated)
    assert sorted(get_args(DelegatedModeName)) == sorted(n for n in valid_mode_names() if get_mode(n).delegated)


def test_typed_api_script_runs():
    runpy.run_path(str(TYPED_API), run_name="__main__")


def test_mypy_types_the_public_api():
    """mypy with the project's configuration (pyproject.toml [tool.mypy]): the script's ``assert_type`` lines hold,
    none against ``Any``. The first run in a fresh tree takes a minute (torch's types); later ones use the cache."""
    pytest.importorskip("mypy", reason="the dev extra brings mypy")
    done = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "no issues found in 1 source file" in done.stdout
