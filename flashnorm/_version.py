"""The package version, with ``pyproject.toml`` as its single source.

Installed (also editable), it is the distribution's metadata, which the build took from ``pyproject.toml``; in a
source tree that is on ``sys.path`` without being installed, ``pyproject.toml`` beside the package is read (Python
3.11+). Torch-free, so that the documentation build can load this file alone.
"""

from __future__ import annotations

import pathlib
from importlib.metadata import PackageNotFoundError, version

#: What ``__version__`` says when neither the metadata nor ``pyproject.toml`` can be read.
UNKNOWN = "0+unknown"


def read_version() -> str:
    """The installed distribution's version, else ``project.version`` of the source tree's ``pyproject.toml``."""
    try:
        return version("flashnorm")
    except PackageNotFoundError:
        pass
    pyproject = pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml"
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        return UNKNOWN
    try:
        project = tomllib.loads(pyproject.read_text())["project"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return UNKNOWN
    return project.get("version", UNKNOWN) if project.get("name") == "flashnorm" else UNKNOWN


__version__ = read_version()
