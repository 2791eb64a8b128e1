"""Per-peer trust: how much of its clip radius a peer's model may use.

Clipping alone bounds what one model moves a merge (``τ / n``), but a liar that sends the
same kind of lie every time (a sign flip, a scaled or noisy model) pulls in the same
direction merge after merge, and under label skew honest peers sit far enough apart that
``τ`` is a sizeable step: hundreds of such pulls move a whole network. An honest peer's model
is seldom farther than ``τ`` from ours (that is what ``τ`` is sized for); a liar's lie is
clipped every time. So each peer has a trust ``t ∈ (0, 1]`` that scales its radius
(``t·τ``): quartered (``DECAY``) whenever its model lies beyond the full ``τ``, raised by
``RECOVERY`` (up to 1) whenever it does not. A peer clipped every time keeps a geometrically
vanishing influence; an honest peer clipped now and then is back to full weight after a few
models. A peer judged once and then silent keeps its trust; the table remembers the last
``REMEMBERED`` peers (an attacker would have to make us hear that many others to be
forgotten).
"""

from __future__ import annotations

from collections import OrderedDict

DECAY = 0.25
"""Factor on a peer's trust each time its model lies beyond the clip radius."""
RECOVERY = 0.1
"""Added to a peer's trust (up to 1) each time its model lies within the clip radius."""
REMEMBERED = 1024
"""Peers whose trust is remembered (least recently judged forgotten first)."""


class PeerTrust:
    """Each peer's trust in ``(0, 1]`` (1 for a peer never judged)."""

    def __init__(self) -> None:
        self._trust: OrderedDict[str, float] = OrderedDict()

    def __getitem__(self, peer: str) -> float:
        return self._trust.get(peer, 1.0)

    def vouched(self, peer: str) -> bool:
        """True for a peer judged at least once and at full trust (not clipped lately)."""
        return self._trust.get(peer) == 1.0

    def judge(self, peer: str, within: bool) -> float:
        """Record whether ``peer``'s latest model lay ``within`` the clip radius; returns its
        new trust."""
        old = self._trust.pop(peer, 1.0)
        new = min(1.0, old + RECOVERY) if within else old * DECAY
        self._trust[peer] = new
        while len(self._trust) > REMEMBERED:
            self._trust.popitem(last=False)
        return new
