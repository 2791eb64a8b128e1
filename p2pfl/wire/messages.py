"""The messages nodes exchange. Plain data; encoding lives in ``p2pfl.wire.codec``.

Sessions (dynamic averaging) use Pull / ModelReply / Busy / Average; scheduled protocols
(periodic, gossip) use Push. ``params`` is always a flat float32 vector in the order of the
sender's and receiver's shared ``ParamSchema``.
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
    the local steps it took since its last sync."""

    session: int
    params: torch.Tensor
    samples: int
    neighbors: list[str] = field(default_factory=list)
    steps: int = 0


@dataclass
class Busy:
    """The peer declines the session (it is already part of another one)."""

    session: int


@dataclass
class Average:
    """The session's result: every member sets its model and reference to ``params``;
    ``steps`` is the group's mean number of local steps since its last sync (one shared scale
    for the drift correction, so the members' updates sum to zero)."""

    session: int
    params: torch.Tensor
    steps: int = 0


@dataclass
class Push:
    """An unsolicited model (periodic round ``round`` or a gossip hop; round -1 for gossip)."""

    round: int
    params: torch.Tensor
    samples: int


Message = Pull | ModelReply | Busy | Average | Push
