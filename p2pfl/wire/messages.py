"""The messages nodes exchange. Plain data; encoding lives in ``p2pfl.wire.codec``.

Fields that default to None (``agreement``) are optional: left out of the frame when None.

Sessions (dynamic averaging) use Pull / ModelReply / Busy / Average; scheduled protocols
(periodic, gossip) use Push, and a gossip exchange ends with Confirm. ``params`` is always a
flat float32 vector in the order of the sender's and receiver's shared ``ParamSchema``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Pull:
    """Ask a peer for its current model for balancing session ``session``."""

    session: int


@dataclass
class ModelReply:
    """A peer's model for a session, with its sample count, neighbour ids (for widening) and
    the local steps it took since its last sync; ``agreement``: its drift correction's lesson
    agreement (``p2pfl.protocol.correction.LessonAgreement``), only when that is on."""

    session: int
    params: torch.Tensor
    samples: int
    neighbors: list[str] = field(default_factory=list)
    steps: int = 0
    agreement: float | None = None


@dataclass
class Busy:
    """The peer declines the session (it is already part of another one)."""

    session: int


@dataclass
class Average:
    """The session's result: every member sets its model and reference to ``params``;
    ``steps`` is the group's mean number of local steps since its last sync (one shared scale
    for the drift correction, so the members' updates sum to zero); ``agreement``, only when
    the correction's lesson agreement is on, the group's mean of it (one shared gain factor,
    for the same reason)."""

    session: int
    params: torch.Tensor
    steps: int = 0
    agreement: float | None = None


@dataclass
class Push:
    """An unsolicited model (periodic round ``round`` or a gossip hop; round -1 for gossip),
    with the sender's lesson agreement when that is on (see ``ModelReply``)."""

    round: int
    params: torch.Tensor
    samples: int
    agreement: float | None = None


@dataclass
class Confirm:
    """The initiator of gossip exchange ``session`` merged the receiver's reply: the receiver
    may learn its drift-correction update of that exchange (``GossipCore``)."""

    session: int


Message = Pull | ModelReply | Busy | Average | Push | Confirm
