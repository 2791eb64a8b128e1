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

Trust judges a model by how far it lies; a *stale* model (an old one replayed, as the
``replay`` attack does) lies close, since it drags its receivers back toward itself, and
so keeps full trust while it pulls a whole network back to the past. An honest peer's
models move between the ones it sends us about as much as ours moved meanwhile (it trains
and merges as we do); a stale one does not move. ``PeerProgress`` scales a peer's radius
by its progress: how far its model moved since an earlier one it sent us (for its first,
since where we started), relative to how far our own model moved over the same interval
(at most 1): a replayed model has no pull, an honest peer that moves as we do keeps all of
it, a slower one (which is staler) keeps its share. Two things make an honest
coordinator's ``Average`` move less than a member, and both made members refuse honest
averages when sessions came every few steps (``rel=0.0002`` on the fresh stream: 415
refusals in 1,000 steps, all within τ from coordinators at full trust, median share 0.23):
the member's own move included its jumps onto the averages it adopted, and an average of
``n`` models moves about ``1/√n`` as far as one of them where SGD noise dominates (the
noise averages out). So once a member adopted a peer's average, that peer is measured from
the average and the member's model right after adopting it (``adopted``), and a member
checking an ``Average`` allows it ``n`` times its progress (``record``'s ``allowance``;
``n`` the session's cap, else the member's degree + 1): an average of ``n`` models with
the member's among them moves at least ``1/n`` as far as the member did, its own share,
even if every other member stood still; only an average that left the member's model out
(a replay, with or without a small change) moves less. Under label skew an allowance of
``√n`` (noise alone) was not enough: the member's model heads toward its own data between
sessions (client drift, undone at every average) while the average moves only by what
the group learnt, the members' drifts cancelling in it; honest averages moved 0.18-0.28
as far as their members (Dirichlet 0.1, 3,000 steps, n = 5), and 7 of 16 refused averages
of that honest run were refused for it alone, each starting a cascade (a member that
refuses stays apart from the group and lowers its coordinator's trust; the next average
lay beyond τ: 8 more). Neither helps a replay: a model sent again earns 0 whatever it is
divided by, and a first contact is still measured from ``origin`` without allowance.
Tried and dropped: letting a peer twice
slower than us keep its whole radius (3 replayers of 16 then cost 55 points instead of 3);
not counting our moves toward the peer's earlier model (honest Dirichlet 0.5, 3,000 steps:
0.927 instead of 0.971); measuring from the peer's model that last earned a full share
(Dirichlet 0.1: 0.960 instead of 0.965).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch

from p2pfl.learning.merge import distances_to

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

    def vouched_values(self, values: Mapping[str, float]) -> list[float]:
        """The entries of ``values`` (by peer) whose peer is ``vouched`` for, in order; one
        pass without a call per peer (``NodeCore.clip_bound`` filters its distance history
        on every merge)."""
        trust = self._trust
        return [value for peer, value in values.items() if trust.get(peer) == 1.0]

    def judge(self, peer: str, within: bool) -> float:
        """Record whether ``peer``'s latest model lay ``within`` the clip radius; returns its
        new trust."""
        old = self._trust.pop(peer, 1.0)
        new = min(1.0, old + RECOVERY) if within else old * DECAY
        self._trust[peer] = new
        while len(self._trust) > REMEMBERED:
            self._trust.popitem(last=False)
        return new


def snapshot(model: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``model`` in half precision (half the memory of a copy) and the norm of what that
    rounding changed: a distance to the snapshot is within that of the distance to the model
    itself. A model half precision cannot hold (entries beyond its range) is copied whole."""
    compact = model.half()
    error = float(torch.linalg.vector_norm(model - compact))
    return (compact, error) if math.isfinite(error) else (model.clone(), 0.0)


Baseline = tuple[torch.Tensor, torch.Tensor, float, float]
"""A peer's entry in ``PeerProgress``: the last model it sent, ours then (a ``snapshot``), the
share it earned, and the snapshot's rounding error."""


class PeerProgress:
    """Each peer's progress between the models it sends us, relative to ours (see the
    module docstring). Keeps, for the last ``remembered`` peers, the last model each sent (the
    tensor itself), our own model at that time (one half-precision ``snapshot`` per merge:
    our move since is taken as the distance to it less its rounding error, never more than
    we moved) and the share it earned; a peer not heard from yet is measured from
    ``origin``, where our own model started (kept exact)."""

    def __init__(self, remembered: int, origin: torch.Tensor) -> None:
        self.remembered = remembered
        self.origin = origin.detach().clone()
        self._last: OrderedDict[str, Baseline] = OrderedDict()

    def shares(
        self, peers: Sequence[str], models: Sequence[torch.Tensor], own: torch.Tensor
    ) -> list[float]:
        """``min(1, ||model - model'|| / ||own - own'||)`` for each of ``peers`` and its model
        in ``models``, where ``model'`` is the last model that peer sent and ``own'`` ours at
        that time: its first model is measured from ``origin`` (a model replayed from the
        start of training earns nothing once we moved on; an honest newcomer has moved about
        as far as we have, or started elsewhere). The models are kept as they are (a model a
        peer sent is never modified); all peers' distances are taken in one tensor operation,
        and the result equals asking for each peer in turn. A caller that measures more
        distances at once (``NodeCore._clip``) runs its three parts itself: ``baselines``,
        the distances to ``references``, ``record``."""
        if not peers:
            return []
        lasts = self.baselines(peers)
        theirs, ours = zip(*(self.references(last) for last in lasts), strict=True)
        return self.record(
            peers, models, own, lasts, distances_to(models, theirs), distances_to([own], ours)
        )

    def knows(self, peer: str) -> bool:
        """Whether ``peer`` sent us a model before (its next is measured from that one)."""
        return peer in self._last

    def baselines(self, peers: Sequence[str]) -> list[Baseline | None]:
        """What each of ``peers`` is measured against (None: from ``origin``), taken from the
        table in order (which entries the bound on remembered peers drops within one merge
        included); ``record`` then fills the table in."""
        table, lasts = self._last, []
        for peer in peers:
            lasts.append(table.pop(peer, None))
            table[peer] = None  # type: ignore[assignment]  # filled in by ``record``
            while len(table) > self.remembered:
                table.popitem(last=False)
        return lasts

    def references(self, last: Baseline | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The peer's earlier model and ours then, for a peer's ``baselines`` entry."""
        return (self.origin, self.origin) if last is None else (last[0], last[1])

    def adopted(self, peer: str, model: torch.Tensor, own: torch.Tensor) -> None:
        """We adopted ``model``, which ``peer`` sent (a coordinator's average) and now hold
        ``own``: the peer's progress is measured from there on both sides."""
        last = self._last.get(peer)
        if last is not None:
            compact, error = snapshot(own.detach())
            self._last[peer] = (model.detach(), compact, last[2], error)

    def record(
        self,
        peers: Sequence[str],
        models: Sequence[torch.Tensor],
        own: torch.Tensor,
        lasts: Sequence[Baseline | None],
        theirs: Sequence[float],
        ours: Sequence[float],
        allowance: float = 1.0,
    ) -> list[float]:
        """The shares from each peer's distance to its reference (``theirs``) and ours to
        our reference (``ours``, one for all peers or one each; less the reference's
        rounding error, for a reference kept as a ``snapshot``), stored in the table; a peer
        measured from its earlier model (not its first) gets ``allowance`` times its
        progress (an average of ``n`` models with ours among them: ``n``, see the module
        docstring)."""
        kept, error = snapshot(own.detach())
        table, shares = self._last, []
        for row, (peer, last) in enumerate(zip(peers, lasts, strict=True)):
            moved = ours[row if len(ours) > 1 else 0]
            if last is not None:
                moved = max(0.0, moved - last[3])  # at least this far from our model then
            # Our model has not moved since the pair was taken (two messages at once): the
            # verdict of that time stands.
            scale = 1.0 if last is None else allowance
            share = (
                min(1.0, scale * theirs[row] / moved)
                if moved > 0.0
                else 1.0
                if last is None
                else last[2]
            )
            if peer in table:
                table[peer] = (
                    (models[row].detach(), kept, share, error)
                    if moved > 0.0 or last is None
                    else last
                )
            shares.append(share)
        return shares
