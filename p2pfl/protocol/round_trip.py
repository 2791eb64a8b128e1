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

That node-wide wait is the bound on a request nobody answers. A request to several peers (a
session's pulls, a round's pushes) is judged per peer (``PeerWaits``): once some answered,
the missing answers are stragglers when they are ``STRAGGLER_FACTOR`` times later than the
slowest answer in hand and past the peer's own wait (if it ever answered), and the request is
resolved without them; a peer that missed answers is asked (or waited for) less often, and
its wait and its Karn doubling are its own. A peer that connects and never answers (crashed
behind an open connection, or withholding on purpose) held every session that asked it for
the whole node-wide wait (0.5 s, 50 steps of the simulator), and each expiry doubled the
next wait though the other peers had answered: 3 such peers of 16 brought the honest nodes
of ``dynamic`` to what training alone reaches (Dirichlet 0.5, 200 steps: 0.485 against
0.857, alone 0.482).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field

MAX_WAIT_S = 60.0
"""No wait grows beyond this, however slow or silent the peers."""
GAIN = 0.125
"""Weight of a new sample in the smoothed round trip (RFC 6298's α)."""
DEVIATION_GAIN = 0.25
"""Weight of a new sample in the deviation (RFC 6298's β)."""
STRAGGLER_FACTOR = 4.0
"""A missing answer is a straggler once it is this many times later than the slowest answer
in hand (a simulated link answers within a tick or two; a real one's round trips vary by
less than this within one request)."""
MAX_SKIPPED = 5
"""A peer that missed its last ``k`` answers in a row is asked once every ``2^k`` times, at
most ``2^MAX_SKIPPED``: it is still asked now and then, and one answer restores it."""
PEER_HISTORY = 256
"""Peers (and requests) whose round trips and misses are remembered (the most recent ones)."""
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
        if 0 < self.wait < MAX_WAIT_S:
            self._backoff *= 2


@dataclass
class _Peer:
    trip: RoundTrip | None = None
    """Its own round trip, once it answered (no floor: the node-wide wait bounds it)."""
    missed: int = 0
    """Answers it missed in a row."""
    skip: int = 0
    """Requests it still sits out."""


@dataclass
class PeerWaits:
    """Per peer: its own round trip and the answers it missed; which peers to ask and when
    the missing answers of a request are stragglers (see the module)."""

    _peers: OrderedDict[str, _Peer] = field(default_factory=OrderedDict)
    _asked: OrderedDict[tuple[str, Hashable], float] = field(default_factory=OrderedDict)

    def _peer(self, peer: str) -> _Peer:
        record = self._peers.pop(peer, None) or _Peer()
        self._peers[peer] = record
        while len(self._peers) > PEER_HISTORY:
            self._peers.popitem(last=False)
        return record

    def expected(self, peers: Iterable[str]) -> list[str]:
        """The ``peers`` to ask (or wait for) this time: those sitting out after missed
        answers are left out (and one request nearer their turn)."""
        kept = []
        for peer in peers:
            record = self._peers.get(peer)
            if record is not None and record.skip > 0:
                record.skip -= 1
            else:
                kept.append(peer)
        return kept

    def asked(self, peer: str, request: Hashable, now: float) -> None:
        """``request`` went to ``peer`` at ``now``."""
        self._asked[(peer, request)] = now
        while len(self._asked) > PEER_HISTORY:
            self._asked.popitem(last=False)

    def answered(self, peer: str, request: Hashable, now: float) -> float | None:
        """``peer`` answered ``request`` (in time or late): it is restored; its round trip
        (None if the request is unknown: then nothing is restored either)."""
        at = self._asked.pop((peer, request), None)
        if at is None:
            return None
        self.heard(peer, now - at)
        return now - at

    def heard(self, peer: str, seconds: float | None = None) -> None:
        """``peer`` answered (``seconds`` after the request, if known): restored."""
        record = self._peer(peer)
        record.missed = record.skip = 0
        if seconds is not None:
            record.trip = record.trip or RoundTrip(0.0)
            record.trip.sample(seconds)

    def missed(self, peers: Iterable[str]) -> None:
        """Each of ``peers`` let a request go unanswered: it sits out its next ``2^k - 1``
        requests and its own wait doubles."""
        for peer in peers:
            record = self._peer(peer)
            record.missed += 1
            record.skip = 2 ** min(record.missed, MAX_SKIPPED) - 1
            if record.trip is not None:
                record.trip.expired()

    def cut_off(self, slowest: float, pending: Iterable[str], *, unknown: bool = True) -> float:
        """How long after a request its ``pending`` peers are stragglers, the slowest answer
        in hand having taken ``slowest`` seconds. Infinite while one of them missed no
        request since it last answered: it is waited for as long as the node-wide wait
        allows (once it lets a request go unanswered it is judged as the others). A peer
        never heard from is a straggler if ``unknown`` (answers come at once: its lateness
        is the network's), else waited for too (a push comes on its sender's own schedule:
        a slower honest node pushes its rounds later)."""
        waits = [STRAGGLER_FACTOR * slowest]
        for peer in pending:
            record = self._peers.get(peer)
            if record is None:
                if not unknown:
                    return math.inf
            elif record.missed == 0:
                return math.inf
            elif record.trip is not None:
                waits.append(record.trip.wait)
        return max(waits)
