"""The node's numbers over time, in bounded memory however long it runs.

A sample is taken every ``interval`` seconds; when ``capacity`` samples are held, every second
one is dropped and the interval doubles, so a node running for days keeps its whole history
at a resolution that halves each time the history fills (capacity 600 at 2 s: the first
20 minutes at 2 s, the first 40 at 4 s, ...).
"""

from __future__ import annotations

import math
from typing import Any

FIELDS = (
    "t",
    "step",
    "loss",
    "test_accuracy",
    "local_accuracy",
    "bytes_sent",
    "bytes_received",
    "syncs",
    "community_syncs",
    "peers",
)
"""Columns of a sample: unix time, then numbers of ``NodeDaemon.status()`` (peers counted,
the syncs of every community summed)."""


class History:
    """Columns of samples of the node's status, thinned as they accumulate."""

    def __init__(self, interval: float = 2.0, capacity: int = 600) -> None:
        if capacity < 2 or interval <= 0:
            raise ValueError("History needs capacity >= 2 and interval > 0")
        self.interval = interval
        self.capacity = capacity
        self.columns: dict[str, list[float | None]] = {name: [] for name in FIELDS}

    def __len__(self) -> int:
        return len(self.columns["t"])

    def add(self, t: float, status: dict[str, Any]) -> None:
        """Append one sample taken at unix time ``t`` from a status dict."""
        communities = status.get("communities", ())
        values = {
            **status,
            "t": t,
            "peers": len(status.get("peers", ())),
            "community_syncs": sum(c["syncs"] for c in communities) if communities else None,
        }
        for name in FIELDS:
            self.columns[name].append(_number(values.get(name)))
        if len(self) >= self.capacity:
            for name, column in self.columns.items():
                self.columns[name] = column[::2]
            self.interval *= 2

    def as_dict(self) -> dict[str, Any]:
        return {"interval_s": self.interval, **{k: list(v) for k, v in self.columns.items()}}


def _number(value: Any) -> float | None:
    """A JSON-safe number (None for missing or not finite)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value if math.isfinite(value) else None
