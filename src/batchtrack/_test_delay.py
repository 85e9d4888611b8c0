"""For tests only: a delay before each image of ``batchtrack serve`` and ``process``.

When the environment variable ``BATCHTRACK_TEST_ITEM_DELAY`` holds a number of seconds
(at most 10), every image waits that long before it is processed, so that a test can
reload or cancel a batch while it runs, or press Ctrl-C in the middle of one. It is read
when the command starts, and is no option of the command line: no one else should set it.
"""

from __future__ import annotations

import math
import os

__all__ = ["TEST_ITEM_DELAY", "item_delay"]

TEST_ITEM_DELAY = "BATCHTRACK_TEST_ITEM_DELAY"
"""The environment variable of the test-only delay per image."""


def item_delay() -> float:
    """The test-only delay per image from the environment; 0 when unset or not a number."""
    try:
        delay = float(os.environ.get(TEST_ITEM_DELAY, "0"))
    except ValueError:
        return 0.0
    return min(delay, 10.0) if math.isfinite(delay) and delay > 0 else 0.0
