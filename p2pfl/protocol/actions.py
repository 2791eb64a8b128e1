"""What a protocol core asks its driver to do."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import torch

from p2pfl.wire.messages import Message


@dataclass
class Send:
    """Deliver ``message`` to peer ``to`` (best effort: it may be lost or late). A core never
    modifies a tensor after sending it (drivers may hand it to the receiver as it is)."""

    to: str
    message: Message


@dataclass
class ReplaceModel:
    """Overwrite the local model's parameters with ``params`` (optimizer state is kept)."""

    params: torch.Tensor


@dataclass
class SetCorrection:
    """Set the vector the learner adds to every gradient of this node (drift correction)."""

    vector: torch.Tensor


@dataclass
class SetTimer:
    """Call ``on_timer(key)`` at time ``at`` (seconds on the driver's clock)."""

    at: float
    key: Hashable


Action = Send | ReplaceModel | SetCorrection | SetTimer
