"""Logging of repeated events (refused messages, failing writes) without flooding the log:
the first event of a kind is logged at once, repeats within ``every`` seconds are counted and
reported with the next one logged ("... (37 more like this in the last 10 s)")."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable

MAX_KINDS = 4096
"""Kinds remembered (e.g. one per refusing site and peer); the oldest is forgotten first."""


class RateLimitedLog:
    """A logger front that logs each kind of event at most once every ``every`` seconds."""

    def __init__(
        self,
        logger: logging.Logger,
        every: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger, self.every, self.clock = logger, every, clock
        self._kinds: OrderedDict[Hashable, tuple[float, int]] = OrderedDict()

    def warning(self, kind: Hashable, message: str, *args: object) -> None:
        """Log ``message % args`` as a warning unless ``kind`` was logged in the last
        ``every`` seconds (then it is only counted)."""
        self.log(logging.WARNING, kind, message, *args)

    def log(self, level: int, kind: Hashable, message: str, *args: object) -> None:
        """Like ``warning`` at ``level``."""
        now = self.clock()
        last, skipped = self._kinds.pop(kind, (None, 0))
        if last is not None and now - last < self.every:
            self._kinds[kind] = (last, skipped + 1)
            return
        if skipped:
            message += f" ({skipped} more like this in the last {now - last:.0f} s)"
        self.logger.log(level, message, *args)
        self._kinds[kind] = (now, 0)
        while len(self._kinds) > MAX_KINDS:
            self._kinds.popitem(last=False)
