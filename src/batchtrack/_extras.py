"""The one-line hint of a missing optional dependency, with the install command that works.

``pip install 'batchtrack[images]'`` only works for an install from a package index; from
a clone or a Git URL it fails (or installs another batchtrack). The command given here
follows how this batchtrack was installed, from its own metadata (``direct_url.json``,
:pep:`610`): an editable install of a folder gets ``pip install -e '/path[images]'``, a
folder ``pip install '/path[images]'``, a VCS or archive URL ``pip install
'batchtrack[images] @ git+https://…@<commit>'``, and anything else (an index, no metadata)
``pip install 'batchtrack[images]'``.

Only the standard library here: every optional module imports this before its dependency.
"""

from __future__ import annotations

import json
import shlex
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

__all__ = ["install_command", "missing"]


class _Distribution(Protocol):
    def read_text(self, filename: str) -> str | None: ...


def _installed() -> _Distribution | None:
    from importlib import metadata

    try:
        return metadata.distribution("batchtrack")
    except metadata.PackageNotFoundError:  # run from a source tree (PYTHONPATH=src)
        return None


def _direct_url(dist: _Distribution | None) -> dict[str, Any] | None:
    if dist is None:
        return None
    try:
        text = dist.read_text("direct_url.json")
        data = json.loads(text) if text else None
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("url"), str):
        return None
    return data


def install_command(extra: str, dist: _Distribution | None = None) -> str:
    """The command that adds ``extra`` to this install of batchtrack.

    Args:
        extra: The extra's name, such as ``"images"``.
        dist: The distribution to read (for tests); None reads the installed batchtrack.

    Returns:
        ``pip install …`` with its argument quoted for a POSIX shell.
    """
    info = _direct_url(_installed() if dist is None else dist)
    requirement = f"batchtrack[{extra}]"
    if info is None:
        return f"pip install {shlex.quote(requirement)}"
    url: str = info["url"]
    vcs = info.get("vcs_info")
    dir_info = info.get("dir_info")
    if isinstance(vcs, dict):
        kind = vcs.get("vcs") if isinstance(vcs.get("vcs"), str) else "git"
        commit = vcs.get("commit_id") or vcs.get("requested_revision")
        target = f"{kind}+{url}" + (f"@{commit}" if isinstance(commit, str) else "")
    elif isinstance(dir_info, dict) and urlsplit(url).scheme == "file":
        path = url2pathname(unquote(urlsplit(url).path))
        editable = "-e " if dir_info.get("editable") is True else ""
        return f"pip install {editable}{shlex.quote(f'{path}[{extra}]')}"
    else:  # an archive: a wheel or sdist by URL or file
        target = url
    subdirectory = info.get("subdirectory")
    if isinstance(subdirectory, str) and subdirectory:
        target += f"#subdirectory={subdirectory}"
    return f"pip install {shlex.quote(f'{requirement} @ {target}')}"


def missing(what: str, needs: str, extra: str) -> str:
    """``"<what> needs <needs>: pip install …"``: the message of the ImportError raised when
    an optional dependency is missing."""
    return f"{what} needs {needs}: {install_command(extra)}"
