"""Result plug-ins the daemon tests load by `module:factory`, as a user's plug-in would be."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

from edged.logs import log_event

log = logging.getLogger("tests.plugins")


def block_loop_once() -> Callable[[Any], None]:
    """Blocks the daemon's event loop once, at the result with ref EDGED_TEST_BLOCK_AT, for
    EDGED_TEST_BLOCK_S seconds: a stuck loop, as a buggy consumer would cause."""
    at, seconds = os.environ["EDGED_TEST_BLOCK_AT"], float(os.environ["EDGED_TEST_BLOCK_S"])

    def sink(result: Any) -> None:
        if result.ref == at:
            log_event(log, "warning", "blocking", seconds=seconds)
            time.sleep(seconds)
            log_event(log, "warning", "unblocked")

    return sink


def slow_consumer() -> Callable[[Any], None]:
    """Takes EDGED_TEST_SLEEP_S per result: a pipeline slower than its input."""
    seconds = float(os.environ["EDGED_TEST_SLEEP_S"])

    def sink(_result: Any) -> None:
        time.sleep(seconds)

    return sink
