"""The node's log: one record, one line (py-libp2p's warnings, often with a traceback or a
multi-line message, condensed for the node's stderr and ``node.log``), and a ``node.log``
that a full disk or a read-only home cannot turn into tracebacks."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

MAX_CHARS = 500


class OneLineFormatter(logging.Formatter):
    """Like ``logging.Formatter``, but newlines become `` | ``, an exception is named by its
    type and message (no traceback) and the line is cut at ``MAX_CHARS``."""

    def format(self, record: logging.LogRecord) -> str:
        record.message = " | ".join(_lines(record.getMessage()))
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        text = self.formatMessage(record)
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            text += f" ({type(exc).__name__}: {' | '.join(_lines(str(exc)))})"
        return text if len(text) <= MAX_CHARS else text[: MAX_CHARS - 1] + "…"


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def condense_library_logs(handlers: list[logging.Handler], fmt: str) -> list[logging.Handler]:
    """Route py-libp2p's warnings and errors (its logger does not propagate) to copies of
    ``handlers``' streams, one line per record; return the handlers added."""
    library = logging.getLogger("libp2p")
    added: list[logging.Handler] = []
    for handler in handlers:
        if isinstance(handler, logging.StreamHandler):
            copy = logging.StreamHandler(handler.stream)
            copy.handleError = handler.handleError  # type: ignore[method-assign] (LogFile's)
            copy.setLevel(logging.WARNING)
            copy.setFormatter(OneLineFormatter(fmt))
            library.addHandler(copy)
            added.append(copy)
    return added


class LogFile(logging.FileHandler):
    """``node.log``. A line that cannot be written (disk full, read-only home) is not an
    error per line with a traceback, as for logging's handlers: the first failure is said
    once on stderr (where every line still goes), and once writing works again the count of
    lines that failed is logged in the file (up to a buffer's worth of them is written late,
    the rest is missing)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.lost = 0

    def emit(self, record: logging.LogRecord) -> None:
        lost = self.lost
        super().emit(record)
        if lost and self.lost == lost:  # written again
            self.lost = 0
            notice = (
                f"{lost} line(s) of this log could not be written when logged (some may be "
                "missing here; stderr had them all)"
            )
            super().emit(_record(notice))

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        exc = sys.exc_info()[1]
        if not isinstance(exc, OSError):
            super().handleError(record)
            return
        if not self.lost:
            notice = (
                f"cannot write {self.baseFilename} ({exc.strerror or exc}); its lines go to "
                "stderr only until it can be written again"
            )
            sys.stderr.write(self.format(_record(notice)) + "\n")
        self.lost += 1


def _record(message: str) -> logging.LogRecord:
    return logging.LogRecord("p2pfl.daemon", logging.WARNING, __file__, 0, message, None, None)
