"""MkDocs hooks (``hooks:`` in mkdocs.yml): the site's name carries the package's version, so every page's header
and title report it.

The version is ``flashnorm.__version__``, computed by ``flashnorm/_version.py`` loaded alone (no torch import).
"""

from __future__ import annotations

import importlib.util
import pathlib


def package_version(root: pathlib.Path) -> str:
    """``flashnorm.__version__`` of the source tree at ``root``, in this environment."""
    spec = importlib.util.spec_from_file_location("_flashnorm_version", root / "flashnorm" / "_version.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.__version__


def on_config(config):
    """``site_name`` → ``"FlashNorm 0.1.0"``."""
    config.site_name = f"{config.site_name} {package_version(pathlib.Path(config.config_file_path).parent)}"
    return config
