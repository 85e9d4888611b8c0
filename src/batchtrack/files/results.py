"""Where a processor's results are: ``<prefix><item id><extension>`` in a file storage."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TypeGuard

import attrs

from .base import FileStorage
from .local import LocalFiles

__all__ = ["RESULT_EXTENSIONS", "ResultFiles", "result_files"]

RESULT_EXTENSIONS = (".jpg", ".png", ".webp")
"""The extensions :meth:`ResultFiles.remove` deletes without listing first."""


def _names_a_file(item_id: object) -> TypeGuard[str]:
    """Whether an item id can name a result file and nothing else."""
    return (
        isinstance(item_id, str)
        and bool(item_id)
        and not item_id.startswith(".")
        and not any(c in item_id for c in "/\\\0")
    )


@attrs.frozen
class ResultFiles:
    """The results of a processor that writes one file per item, named by the item's id.

    :class:`~batchtrack.imaging.ImagePipeline` writes them; the HTTP API serves them
    (one download, or a batch's ZIP) and the tracker's removal hook deletes them with
    their batch. A processor of your own that writes ``<item id>.<ext>`` under a prefix
    of a storage can say so with a ``results`` attribute holding one of these.

    Attributes:
        storage: Where the files are.
        prefix: What their keys start with (``""`` or ending in ``/``).
    """

    storage: FileStorage
    prefix: str = ""

    def key(self, item_id: str, extension: str) -> str:
        """The key of an item's result with this extension (``".jpg"``)."""
        return f"{self.prefix}{item_id}{extension}"

    def find(self, item_id: str) -> str | None:
        """The key of an item's result, or None when there is none (yet).

        Raises:
            FileStorageError: The storage cannot be reached.
        """
        if not _names_a_file(item_id):
            return None
        if self.storage.local_path(f"{self.prefix}x") is not None:
            # On a disk a few stats cost less than reading the folder.
            for extension in RESULT_EXTENSIONS:
                if self.storage.size(key := self.key(item_id, extension)) is not None:
                    return key
        found = sorted(info.key for info in self.storage.list(f"{self.prefix}{item_id}."))
        # "<id>.<ext>" only: "<id>.jpg/x" or "<id>.a.b" are no result of this item.
        found = [k for k in found if "/" not in k[len(self.prefix) :]]
        return found[0] if found else None

    def remove(self, batch_id: str, item_ids: Iterable[str]) -> int:
        """Delete the results of these items; return how many files went.

        Made to be a tracker's removal hook: ``tracker.add_removal_hook(results.remove)``
        deletes a batch's results when it is deleted or expires.
        """
        keys = [
            self.key(item_id, extension)
            for item_id in item_ids
            if _names_a_file(item_id)
            for extension in RESULT_EXTENSIONS
        ]
        return self.storage.delete_many(keys)

    def sweep_partial(self, older_than: float = 3600.0) -> int:
        """Delete what writes that never finished left behind; how many files went."""
        return self.storage.sweep_partial(self.prefix, older_than)


def result_files(where: object) -> ResultFiles | None:
    """The results ``where`` names: a ResultFiles, a FileStorage, a folder, or None."""
    if where is None or isinstance(where, ResultFiles):
        return where
    if isinstance(where, FileStorage):
        return ResultFiles(where)
    if isinstance(where, (str, os.PathLike)):
        return ResultFiles(LocalFiles(Path(where)))
    raise TypeError(f"results are in a folder, a FileStorage or ResultFiles, not {where!r}")
