"""One log record, one line: py-libp2p's warnings (often with a traceback or a multi-line
message) condensed for the node's stderr and ``node.log``."""

from __future__ import annotations

import logging

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
            copy.setLevel(logging.WARNING)
            copy.setFormatter(OneLineFormatter(fmt))
            library.addHandler(copy)
            added.append(copy)
    return added
