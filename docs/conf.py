"""Sphinx configuration for the nlsq_stream documentation.

Build it (warnings are errors, as CI builds it from ``tests/test_docs.py``)::

    pip install -e ".[docs]"
    python -m sphinx -W --keep-going -b html docs docs/_build/html
    python -m sphinx -W -b doctest docs docs/_build/doctest   # runs every example

No extension here needs the network: there is no intersphinx.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # build from a checkout even when the package is not installed
sys.path.insert(0, str(ROOT / "docs"))  # doc_example: the model the pages' hidden set-up shares

import nlsq_stream  # noqa: E402

project = "nlsq_stream"
author = "the nlsq_stream authors"
copyright = "2026, the nlsq_stream authors"
release = nlsq_stream.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.doctest",
]

exclude_patterns = ["_build", "_measured", "Thumbs.db", ".DS_Store"]
root_doc = "index"
html_theme = "alabaster"
html_theme_options = {
    "description": "Nonlinear least squares in JAX that you can watch while it runs.",
    "fixed_sidebar": True,
    "page_width": "1240px",  # room for 100-character code lines
    "sidebar_width": "220px",
    "body_max_width": "none",
}
html_static_path: list[str] = []
pygments_style = "sphinx"

# autodoc: members in source order, signatures with type hints as written.
autodoc_member_order = "bysource"
# nlsq_stream.notebook needs the notebook extra; without it the reference still builds.
autodoc_mock_imports = [
    m for m in ("anywidget", "traitlets") if importlib.util.find_spec(m) is None
]
autodoc_typehints = "signature"
autodoc_preserve_defaults = True

# Every cross-reference to nlsq_stream's public names must resolve (a typo fails the -W build).
# Without intersphinx, references outside the package (numpy, collections.abc, ...) cannot resolve,
# and type hints may name private classes or the modules inside the stages (``solver.fit``,
# ``stream.hub``, ...; see architecture.rst): those are ignored.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(?!nlsq_stream\.).*"),
    (r"py:.*", r"nlsq_stream\._.*"),
    (r"py:.*", r"nlsq_stream\.(solver|stream|faces|benchmarks|cli)\..*"),
    (r"py:.*", r"nlsq_stream\.sinks\.(console|jsonl|log|display|kernel|widget)\..*"),
]

# sphinx.ext.doctest runs every example: ``.. doctest::`` and ``.. testcode::`` blocks on the
# pages, and the ``>>>`` examples of every docstring that autodoc renders (doctest blocks outside
# a directive belong to the ``default`` group). Each page's group shares one namespace.
doctest_test_doctest_blocks = "default"
doctest_global_setup = """
import jax
jax.config.update("jax_enable_x64", True)   # float64, like scipy; before any array is made
import jax.numpy as jnp
import numpy as np
from nlsq_stream import *
from nlsq_stream.async_logger import *
from nlsq_stream.events import *
from nlsq_stream.sinks import *
"""
trim_doctest_flags = True
