"""The node's last log lines, kept in memory for the dashboard."""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

LINES = 200


class LogTail(logging.Handler):
    """A logging handler that keeps the last ``lines`` records (time, level, logger, text)."""

    def __init__(self, lines: int = LINES, level: int = logging.INFO) -> None:
        super().__init__(level)
        self.records: deque[dict[str, Any]] = deque(maxlen=lines)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string in some library must not break logging
            message = str(record.msg)
        self.records.append(
            {
                "t": record.created,
                "level": record.levelname,
                "logger": record.name,
                "message": message,
            }
        )

    def lines(self) -> list[dict[str, Any]]:
        return list(self.records)
