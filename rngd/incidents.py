"""Rate-limited logging of guest and VMM misbehaviour.

A hostile guest can produce a malformed request per microsecond; one log line each would let it
fill the host's disk. Each connection gets a small burst of lines per interval, and a count of
what was held back when the interval ends.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class IncidentLog:
    def __init__(
        self,
        logger: logging.Logger,
        prefix: str,
        *,
        burst: int = 10,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._clock = clock
        self._prefix = prefix
        self._burst = burst
        self._interval = interval
        self._window_start = -interval
        self._logged = 0
        self._suppressed = 0

    def __call__(self, message: str, *args: object) -> None:
        now = self._clock()
        if now - self._window_start >= self._interval:
            self.flush()
            self._window_start, self._logged = now, 0
        if self._logged < self._burst:
            self._logged += 1
            self._logger.warning(self._prefix + message, *args)
        else:
            self._suppressed += 1

    def flush(self) -> None:
        """Log the count of what was held back (also when the connection ends, so that a
        guest that stops misbehaving does not leave it untold)."""
        if self._suppressed:
            self._logger.warning(
                "%s%d more incidents not logged in the last %.0f s",
                self._prefix,
                self._suppressed,
                self._interval,
            )
            self._suppressed = 0
