"""The documentation site: it builds with ``--strict``, every public name has an entry in the API reference, it
reports the package's version, and every code block marked runnable runs.

Public names: ``flashnorm.__all__`` and, for every subpackage, its ``__all__``. A name there that is a submodule
(``flashnorm.utils.__all__`` lists modules) makes that module public, and a subpackage without ``__all__``
(``flashnorm.integrations``) makes all its modules public. A public module's names are its ``__all__``, else the
classes and functions it defines whose names do not start with ``_``.

A code block is runnable when the line before its fence is ``<!-- runnable -->`` (invisible on the site and on
GitHub). Mark the blocks that run as written, on a CPU, in seconds.
"""

from __future__ import annotations

import importlib
import inspect
import pathlib
import pkgutil
import re
import subprocess
import sys
import types

import pytest

import flashnorm

ROOT = pathlib.Path(__file__).resolve().parents[1]
#: The pages whose code blocks may be marked runnable.
PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
MARKER = "<!-- runnable -->"
#: A marker line, then a fenced python block: (code).
RUNNABLE = re.compile(r"^" + re.escape(MARKER) + r"\n```python\n(.*?)^```", re.M | re.S)
ANCHOR = re.compile(r'id="(flashnorm(?:\.[A-Za-z_][A-Za-z0-9_]*)+)"')


# -- public names -------------------------------------------------------------------------------------
def _defined_names(module: types.ModuleType) -> list:
    """A module's ``__all__``, else the classes and functions it defines (names without a leading ``_``)."""
    if hasattr(module, "__all__"):
        return [n for n in module.__all__ if not n.startswith("__")]
    return [n for n, obj in vars(module).items() if not n.startswith("_") and (inspect.isclass(obj) or
            inspect.isfunction(obj)) and obj.__module__ == module.__name__]


def _public_of(module: types.ModuleType, public: dict) -> None:
    """Adds ``{qualified name: object}`` for ``module``'s public names, recursing into public submodules."""
    names = _defined_names(module)
    if not hasattr(module, "__all__") and hasattr(module, "__path__"):  # a package of modules
        names = [m.name for m in pkgutil.iter_modules(module.__path__) if not m.name.startswith("_")]
    for name in names:
        try:
            obj = getattr(module, name)
        except AttributeError:  # a submodule that the package does not import
            obj = importlib.import_module(f"{module.__name__}.{name}")
        if isinstance(obj, types.ModuleType):
            _public_of(obj, public)
        else:
            public[f"{module.__name__}.{name}"] = obj


def public_names() -> dict:
    """``{qualified name: object}`` of every public name of the package."""
    public: dict = {}
    _public_of(flashnorm, public)
    for sub in pkgutil.iter_modules(flashnorm.__path__):
        if sub.ispkg and not sub.name.startswith("_"):
            _public_of(importlib.import_module(f"flashnorm.{sub.name}"), public)
    return public


def _resolve(anchor: str):
    """The object an API anchor ``a.b.C`` documents, or ``None``."""
    parts = anchor.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr, None)
        return obj
    return None


# -- the site -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def site(tmp_path_factory) -> pathlib.Path:
    """The site built as CI builds it (``mkdocs build --strict``)."""
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def test_public_names_are_found():
    public = public_names()
    for name in ("flashnorm.PrivacyEngine", "flashnorm.grad_sample.GradSampleModuleFastGradientClippingFuse",
                 "flashnorm.utils.fsdp_utils.FSDP2Wrapper", "flashnorm.utils.export.unwrap_model",
                 "flashnorm.integrations.lightning.DPStrategy", "flashnorm.auditing.CanaryAudit"):
        assert name in public, sorted(public)


def test_every_public_name_has_an_api_entry(site):
    """Each public object is the target of an anchor of the API reference: mkdocstrings rendered it (a directive
    names it or its module, its docstring is not empty, no filter hides it), under its public name."""
    documented = {}
    for page in (site / "api").rglob("index.html"):
        for anchor in ANCHOR.findall(page.read_text()):
            documented.setdefault(anchor.rsplit(".", 1)[-1], []).append(anchor)
    missing = [name for name, obj in public_names().items()
               if not any(_resolve(a) is obj for a in documented.get(name.rsplit(".", 1)[-1], []))]
    assert not missing, f"public names without an API entry (add a ::: directive under docs/api/): {missing}"


def test_docs_report_the_package_version(site):
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", flashnorm.__version__), flashnorm.__version__
    for page in (site / "index.html", site / "api" / "index.html"):
        assert f"FlashNorm {flashnorm.__version__}" in page.read_text(), page


#: A Sphinx role, which mkdocstrings (Google style, markdown) would print as text.
SPHINX_ROLE = re.compile(r":(?:class|meth|func|mod|attr|data|exc|obj|ref):`")
#: Files whose owners convert their roles in their own change; strict, so the mark goes once they have.
def _source_files() -> list:
    package = ROOT / "flashnorm"
    return [pytest.param(path, id=str(path.relative_to(package))) for path in sorted(package.rglob("*.py"))]


@pytest.mark.parametrize("path", _source_files())
def test_docstrings_hold_no_sphinx_role(path):
    lines = [f"{n}: {line.strip()}" for n, line in enumerate(path.read_text().splitlines(), 1)
             if SPHINX_ROLE.search(line)]
    assert not lines, "write `name` instead of `name` (markdown):\n" + "\n".join(lines)


# -- runnable code blocks -------------------------------------------------------------------------------
def runnable_blocks() -> list:
    """``pytest.param(code, first line)`` of every marked block of ``PAGES``."""
    blocks = []
    for page in PAGES:
        text = page.read_text()
        assert text.count(MARKER) == len(RUNNABLE.findall(text)), f"{page.name}: a marker not before ```python"
        for match in RUNNABLE.finditer(text):
            line = text.count("\n", 0, match.start(1)) + 1
            blocks.append(pytest.param(match.group(1), page, line, id=f"{page.name}:{line}"))
    return blocks


def test_runnable_blocks_are_marked():
    assert len(runnable_blocks()) >= 4


@pytest.mark.parametrize(("code", "page", "line"), runnable_blocks())
def test_runnable_block_runs(code, page, line):
    """The block runs as written, alone, with the page's line numbers in any traceback."""
    source = "\n" * (line - 1) + code
    exec(compile(source, str(page), "exec"), {"__name__": "__docs__"})  # noqa: S102 - our own docs
