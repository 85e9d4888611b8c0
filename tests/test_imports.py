"""The core's import footprint and public face."""

from __future__ import annotations

import subprocess
import sys

import batchtrack

OPTIONAL = (
    "PIL",
    "redis",
    "psycopg",
    "psycopg_pool",
    "uvicorn",
    "starlette",
    "flask",
    "django",
    "multipart",
    "httpx",
    "hypothesis",
    "pytest",
    "tqdm",
    "rich",
    "celery",
    "kombu",
    "dask",
    "distributed",
    "obstore",
    "prometheus_client",
)


def test_import_batchtrack_loads_no_optional_dependency() -> None:
    """A fresh interpreter importing batchtrack has none of the optional packages loaded."""
    code = f"import sys, batchtrack\nprint(' '.join(m for m in {OPTIONAL!r} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == ""


def test_every_public_name_is_exported() -> None:
    """__all__ lists names that exist, and includes the contract's core names."""
    for name in batchtrack.__all__:
        assert hasattr(batchtrack, name), name
    for name in (
        "BatchTracker",
        "MemoryStore",
        "BatchSnapshot",
        "ItemSnapshot",
        "Progress",
        "ProgressEvent",
        "Status",
        "BatchtrackError",
        "ValidationError",
        "BatchNotFound",
        "ItemNotFound",
        "InvalidTransition",
    ):
        assert name in batchtrack.__all__, name
