"""Shared by the background workers fed from bounded queues (drift, prediction log)."""

from __future__ import annotations

import queue
import time
from typing import Any


def wait_drained(work: queue.Queue[Any], timeout: float) -> bool:
    """Wait until every item put on `work` has been processed (tests); False on timeout."""
    deadline = time.monotonic() + timeout
    while work.unfinished_tasks:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True
