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
html_theme = "furo"
html_title = f"batchtrack {release}"
html_static_path = ["_static"]
# Wide tables scroll inside the text column instead of overflowing it, and their cells
# wrap long text (see _static/batchtrack.css).
html_css_files = ["batchtrack.css"]
# Every page's examples run as a reader would paste them: in a fresh namespace (Sphinx
# gives each page its own) holding no names but the ones the page imports, and in an
# empty temporary folder, so files they write never land in the repository and a snippet
# that needs a folder it did not create fails here first. Nothing is imported by name
# below, so nothing leaks into the page's namespace but these two private values.
doctest_global_setup = """
__doc_folder = __import__("tempfile").TemporaryDirectory(prefix="batchtrack-doctest-")
__doc_cwd = __import__("os").getcwd()
__import__("os").chdir(__doc_folder.name)
"""
doctest_global_cleanup = """
__import__("os").chdir(__doc_cwd)
__doc_folder.cleanup()
"""

import doctest as _doctest  # noqa: E402

doctest_default_flags = _doctest.ELLIPSIS | _doctest.NORMALIZE_WHITESPACE
