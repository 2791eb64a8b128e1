"""What the node knows about each peer it has dealt with: traffic, connection and refusals.

The transport records the bytes of every confirmed send and every complete inbound frame and
the frames it refuses (limits); the daemon and the communities record the messages they
refuse (unreadable, not admitted, ...) with the reason. The dashboard shows the ledger; the
number of peers kept is bounded (the least recently seen peer that is not connected goes).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

MAX_PEERS = 1024
"""Peers remembered at most; beyond it the one not connected and seen longest ago is dropped."""


@dataclass
class PeerRecord:
    """Traffic and refusals of one peer, since the node started."""

    bytes_sent: int = 0
    bytes_received: int = 0
    connected: bool = False
    refused: int = 0
    """Messages of this peer this node refused."""
    last_refusal: str | None = None
    """Why the last one was refused."""
    last_refusal_at: float | None = None
    last_seen: float = field(default_factory=time.time)


class PeerLedger:
    """Per-peer records of one node (plain dicts and ints: safe to read from another thread)."""

    def __init__(self, max_peers: int = MAX_PEERS) -> None:
        self._peers: dict[str, PeerRecord] = {}
        self._max = max_peers

    def _record(self, peer: str) -> PeerRecord:
        record = self._peers.get(peer)
        if record is None:
            if len(self._peers) >= self._max:
                self._forget_one()
            record = self._peers[peer] = PeerRecord()
        record.last_seen = time.time()
        return record

    def _forget_one(self) -> None:
        idle = [(r.last_seen, p) for p, r in self._peers.items() if not r.connected]
        if idle:
            del self._peers[min(idle)[1]]

    def sent(self, peer: str, nbytes: int) -> None:
        self._record(peer).bytes_sent += nbytes

    def received(self, peer: str, nbytes: int) -> None:
        self._record(peer).bytes_received += nbytes

    def connection(self, peer: str, connected: bool) -> None:
        self._record(peer).connected = connected

    def refused(self, peer: str, reason: str) -> None:
        """Count one refused message of ``peer`` and remember why."""
        record = self._record(peer)
        record.refused += 1
        record.last_refusal = reason
        record.last_refusal_at = time.time()

    def get(self, peer: str) -> PeerRecord | None:
        return self._peers.get(peer)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Every record as a plain dict, by peer id."""
        return {peer: asdict(record) for peer, record in list(self._peers.items())}
