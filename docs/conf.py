"""Sphinx configuration for the bio-transformations documentation.

Build (from the repository root):

    .venv/bin/sphinx-build -W --keep-going -b html docs docs/_build/html
    .venv/bin/sphinx-build -W --keep-going -b doctest docs docs/_build/doctest
"""

from __future__ import annotations

import glob
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

DOCS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(DOCS_DIR)

# -- Make the repository importable ------------------------------------------
# The repository root holds the package ``bio_transformations``.  The folder
# ``kernels/`` at the top level is installed as ``bio_transformations.kernels``
# (a package-dir mapping in pyproject.toml).  With an editable install the
# mapping is already in place; without one, the fallback finder below maps
# ``bio_transformations.kernels[.*]`` onto ``<repo>/kernels`` so that the docs
# build from a plain checkout too.
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


class _KernelsMapFinder(importlib.abc.MetaPathFinder):
    """Fallback: resolve ``bio_transformations.kernels`` to ``<repo>/kernels``."""

    prefix = "bio_transformations.kernels"
    root = os.path.join(REPO_ROOT, "kernels")

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.prefix and not fullname.startswith(self.prefix + "."):
            return None
        rel = fullname[len(self.prefix) :].lstrip(".").replace(".", os.sep)
        base = os.path.join(self.root, rel) if rel else self.root
        init = os.path.join(base, "__init__.py")
        if os.path.isfile(init):
            return importlib.util.spec_from_file_location(
                fullname, init, submodule_search_locations=[base]
            )
        if os.path.isfile(base + ".py"):
            return importlib.util.spec_from_file_location(fullname, base + ".py")
        return None


# Appended, so it only answers when the normal machinery (including an
# editable install's own finder) cannot find the module.
if not any(isinstance(f, _KernelsMapFinder) for f in sys.meta_path):
    sys.meta_path.append(_KernelsMapFinder())

# -- Project information -----------------------------------------------------
project = "Bio Transformations"
author = "Bio Transformations contributors"
copyright = "2024-2026, Bio Transformations contributors"

try:
    import bio_transformations as _bt

    release = getattr(_bt, "__version__", "")
except Exception:  # pragma: no cover - the docs still build their prose pages
    release = ""
version = ".".join(release.split(".")[:2]) if release else ""

# -- General configuration ---------------------------------------------------
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.doctest",
    "sphinx.ext.viewcode",
    "sphinx.ext.mathjax",
]

templates_path: list[str] = []
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
root_doc = "index"
language = "en"

# autodoc
autodoc_default_options = {
    "members": True,
    "show-inheritance": True,
    "member-order": "bysource",
}
autodoc_typehints = "description"
autodoc_mock_imports: list[str] = []
autoclass_content = "both"

# napoleon (Google and NumPy style docstrings)
napoleon_google_docstring = True
napoleon_numpy_docstring = True
napoleon_use_rtype = False
# "Attributes:" sections become an ":ivar:" field list instead of attribute
# directives, so an attribute that is also a documented property is not described
# twice (which Sphinx reports as a duplicate object description).
napoleon_use_ivar = True

# doctest: every example runs on the CPU in a few seconds.
# The examples are tiny: one intra-op thread is much faster for them than several
# (and is unaffected by a busy machine).
doctest_global_setup = """
import torch
torch.set_num_threads(1)
torch.manual_seed(0)
"""
doctest_test_doctest_blocks = "default"
trim_doctest_flags = True

# -- HTML output ---------------------------------------------------------------
html_theme = "furo"
html_title = "Bio Transformations"
html_static_path: list[str] = []

# -- Generated pieces ------------------------------------------------------------
# benchmarks.rst includes one generated file that embeds every recorded
# results file (benchmarks/results/*.md), or says plainly that none exists yet.
# It lives under _build so that it never lands in the source tree.
GENERATED_DIR = os.path.join(DOCS_DIR, "_build", "generated")


def _write_benchmark_include() -> None:
    os.makedirs(GENERATED_DIR, exist_ok=True)
    pattern = os.path.join(REPO_ROOT, "benchmarks", "results", "**", "*.md")
    results = sorted(glob.glob(pattern, recursive=True))
    lines: list[str] = []
    if not results:
        lines += [
            ".. note::",
            "",
            "   No recorded results yet: ``benchmarks/results/`` holds no ``*.md`` file in",
            "   this checkout.  Run ``make bench`` on the machine you care about to produce",
            "   them; this page shows them on the next docs build.",
            "",
        ]
    for path in results:
        rel = os.path.relpath(path, REPO_ROOT)
        title = f"``{rel}``"
        lines += [title, "~" * len(title), ""]
        lines += [
            # A leading "/" is relative to the docs source folder.
            f".. literalinclude:: /{os.path.relpath(path, DOCS_DIR)}",
            "   :language: markdown",
            "",
        ]
        for image in sorted(glob.glob(os.path.join(os.path.dirname(path), "*.png"))):
            lines += [f".. image:: /{os.path.relpath(image, DOCS_DIR)}", "   :width: 90%", ""]
    text = "\n".join(lines) + "\n"
    target = os.path.join(GENERATED_DIR, "benchmark_results.rst.inc")
    # Rewrite only on change so that incremental builds stay incremental.
    old = None
    if os.path.exists(target):
        with open(target, encoding="utf-8") as fh:
            old = fh.read()
    if old != text:
        with open(target, "w", encoding="utf-8") as fh:
            fh.write(text)


_write_benchmark_include()


def setup(app):
    return {"parallel_read_safe": True, "parallel_write_safe": True}
