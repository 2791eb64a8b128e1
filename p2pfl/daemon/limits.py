"""Safety limits of a transport: frame sizes, timeouts and per-peer inbound rates."""

from __future__ import annotations

from dataclasses import dataclass

from p2pfl.daemon.framing import MAX_FRAME_BYTES


@dataclass(frozen=True)
class Limits:
    """Safety limits of one transport; per-peer limits apply to inbound streams."""

    max_frame_bytes: int = 64 * 2**20
    """Default largest accepted payload; `Transport.set_handler` can override it per protocol."""
    max_inbound_streams_per_peer: int = 4
    """Inbound messages of one peer being read or handled at the same time."""
    messages_per_s: float = 10.0
    """Sustained inbound message rate allowed per peer (token bucket refill rate)."""
    burst: int = 20
    """Inbound messages a peer may send back to back (token bucket size)."""
    io_timeout_s: float = 120.0
    """Time allowed to read one inbound frame, or to write and confirm one outbound frame."""
    dial_timeout_s: float = 10.0
    """Time allowed to establish a connection (TCP, Noise handshake, yamux)."""

    def __post_init__(self) -> None:
        if not 0 <= self.max_frame_bytes <= MAX_FRAME_BYTES:
            raise ValueError(f"max_frame_bytes must be in [0, {MAX_FRAME_BYTES}]")
        if self.max_inbound_streams_per_peer < 1 or self.burst < 1:
            raise ValueError("max_inbound_streams_per_peer and burst must be >= 1")
        if min(self.messages_per_s, self.io_timeout_s, self.dial_timeout_s) <= 0:
            raise ValueError("messages_per_s, io_timeout_s and dial_timeout_s must be > 0")


class TokenBucket:
    """Classic token bucket on the trio clock."""

    __slots__ = ("rate", "size", "tokens", "stamp")

    def __init__(self, rate: float, size: int, now: float) -> None:
        self.rate, self.size, self.tokens, self.stamp = rate, size, float(size), now

    def refill(self, now: float) -> None:
        self.tokens = min(self.size, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self, now: float) -> bool:
        self.refill(now)
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True
