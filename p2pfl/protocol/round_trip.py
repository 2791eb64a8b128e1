"""How long a core waits for its peers: a retransmission-timeout estimator in the manner of
TCP's (RFC 6298), shared by every protocol.

A fixed wait cannot fit both a simulated link and a stranger's home router: on a loaded
loopback a py-libp2p round trip (new stream, frame, acknowledgement) took 0.2-0.4 s and a
first contact several seconds, so sessions with a 0.5 s wait all timed out and daemons
never merged. Each answer to a request this core made is a sample of the round trip; the
wait is ``smoothed + max(4 × deviation, smoothed / 4)``, never below the protocol's
configured ``timeout`` (so a simulation whose links answer within it behaves exactly as
with a fixed wait). A wait
that expired doubles the next one (Karn's back-off) until a fresh sample arrives, bounded by
``MAX_WAIT_S``.
"""

from __future__ import annotations

import math

MAX_WAIT_S = 60.0
"""No wait grows beyond this, however slow or silent the peers."""
GAIN = 0.125
"""Weight of a new sample in the smoothed round trip (RFC 6298's α)."""
DEVIATION_GAIN = 0.25
"""Weight of a new sample in the deviation (RFC 6298's β)."""
MIN_MARGIN = 0.25
"""The wait exceeds the smoothed round trip by at least this fraction of it, so steady
links (deviation near 0) are not cut off at the exact round trip (RFC 6298's clock
granularity term, made relative)."""


class RoundTrip:
    """Estimates the round trip to this core's peers and says how long to wait for one."""

    def __init__(self, floor: float) -> None:
        self.floor = floor
        self.smoothed: float | None = None
        self.deviation = 0.0
        self._backoff = 1

    @property
    def wait(self) -> float:
        """How long to wait for an answer to a request sent now."""
        if self.smoothed is None:
            estimate = 0.0
        else:
            margin = max(4 * self.deviation, MIN_MARGIN * self.smoothed)
            estimate = self.smoothed + margin
        return min(MAX_WAIT_S, max(self.floor, estimate) * self._backoff)

    def sample(self, seconds: float) -> None:
        """An answer came ``seconds`` after its request."""
        if not math.isfinite(seconds) or seconds < 0:
            return
        if self.smoothed is None:
            self.smoothed, self.deviation = seconds, seconds / 2
        else:
            self.deviation += DEVIATION_GAIN * (abs(self.smoothed - seconds) - self.deviation)
            self.smoothed += GAIN * (seconds - self.smoothed)
        self._backoff = 1

    def expired(self) -> None:
        """A wait ran out without every answer: wait longer next time."""
        if self.wait < MAX_WAIT_S:
            self._backoff *= 2
