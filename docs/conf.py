"""Sphinx configuration for batchtrack's documentation."""

from __future__ import annotations

import batchtrack

project = "batchtrack"
author = "The batchtrack developers"
copyright = "2026, The batchtrack developers"
release = batchtrack.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.doctest",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
nitpicky = False
exclude_patterns = ["_build", "examples"]
html_theme = "alabaster"
html_static_path: list[str] = []
doctest_global_setup = """
from batchtrack import *
from batchtrack.testing import FakeClock
"""

import doctest as _doctest  # noqa: E402

doctest_default_flags = _doctest.ELLIPSIS | _doctest.NORMALIZE_WHITESPACE
