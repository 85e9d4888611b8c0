"""The context-manager protocol for everything in batchtrack that has a ``close()``."""

from __future__ import annotations

from typing_extensions import Self


class Closing:
    """``with thing:`` calls ``thing.close()`` on the way out, whatever happened."""

    __slots__ = ()

    def close(self) -> None:
        """Release what this object holds; calling it twice is fine."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
