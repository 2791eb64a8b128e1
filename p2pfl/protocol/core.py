"""The node core shared by every protocol: identity, neighbours, step counter, counters and
the event entry points a driver calls. Policies subclass it (see ``make_core``)."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Protocol

import torch

from p2pfl.learning.merge import merge
from p2pfl.protocol.actions import Action, ReplaceModel
from p2pfl.protocol.config import ProtocolConfig
from p2pfl.wire.messages import Message

log = logging.getLogger("p2pfl.protocol")


class ModelAccess(Protocol):
    """The core's read access to its node's model (writes go through actions)."""

    def read(self) -> torch.Tensor:
        """Current flat parameters; may be a live view, so clone what you keep."""
        ...

    @property
    def samples(self) -> int:
        """Number of local training samples."""
        ...


@dataclass
class CoreStats:
    """Counters every core keeps."""

    syncs: int = 0
    sessions: int = 0
    violations: int = 0
    refused_busy: int = 0
    gave_way: int = 0
    timeouts: int = 0
    ignored: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


RowReader = Callable[[torch.Tensor], torch.Tensor]
"""``read(rows)``: the current parameters ``[k, params]`` of the stacked cores at ``rows``."""


class NodeCore:
    """Base core: ``none`` protocol (trains alone, ignores every message).

    A simulator with many cores of one class can take their local steps vectorised: it keeps
    ``step_counters`` and ``step_fields`` of all of them stacked, asks ``which_act`` which
    cores would do more on their next local step than count it, adds one to the counters of
    the others and calls ``on_local_step`` only on those that act (see
    ``p2pfl.simulator.batched_protocol``)."""

    step_counters: ClassVar[tuple[str, ...]] = ("step",)
    """Integer attributes ``on_local_step`` adds one to on every step, whether or not the
    node then acts."""
    step_fields: ClassVar[tuple[str, ...]] = ()
    """Further attributes ``which_act`` reads (numbers, flags, or tensors stored as plain
    attributes that the core replaces but never modifies in place)."""

    def __init__(
        self,
        node_id: str,
        config: ProtocolConfig,
        model: ModelAccess,
        neighbors: Iterable[str],
        seed: int = 0,
        step_size: float = 0.1,
    ) -> None:
        self.node_id = node_id
        self.config = config
        self.model = model
        self.neighbors: set[str] = set(neighbors) - {node_id}
        self.down: set[str] = set()
        self.rng = random.Random(seed)
        self.step_size = step_size
        self.step = 0
        self.stats = CoreStats()

    @property
    def live_neighbors(self) -> list[str]:
        """Neighbours not known to be down, in a stable order."""
        return sorted(self.neighbors - self.down)

    def on_local_step(self, now: float) -> list[Action]:
        """The learner finished one local step."""
        self.step += 1
        return self._after_step(now)

    @classmethod
    def which_act(
        cls,
        config: ProtocolConfig,
        state: Mapping[str, torch.Tensor],
        rows: torch.Tensor,
        read: RowReader,
    ) -> torch.Tensor:
        """The vectorised form of this class's ``on_local_step``: of the cores at ``rows`` of
        the stacked ``state`` (every counter and field, one row per core, as before the
        step), which would do more on this local step than add one to their counters. A
        ``[len(rows)]`` bool mask, equal to calling each core (tests check it)."""
        return torch.zeros(len(rows), dtype=torch.bool)

    def on_message(self, now: float, sender: str, message: Message) -> list[Action]:
        """A validated message arrived from ``sender``."""
        self.stats.ignored += 1
        log.debug("%s: ignoring %s from %s", self.node_id, type(message).__name__, sender)
        return []

    def on_timer(self, now: float, key: Hashable) -> list[Action]:
        """A timer set with ``SetTimer`` fired."""
        return []

    def on_peer_down(self, now: float, peer: str) -> list[Action]:
        """A neighbour became unreachable."""
        self.down.add(peer)
        return []

    def on_peer_up(self, now: float, peer: str) -> list[Action]:
        """A neighbour is reachable (again); unknown peers become neighbours."""
        self.down.discard(peer)
        if peer != self.node_id:
            self.neighbors.add(peer)
        return []

    def on_heard(self, now: float, peer: str) -> list[Action]:
        """A message from ``peer`` arrived (before ``on_message``): proof that it is alive, so
        a peer known to be down is up again."""
        return self.on_peer_up(now, peer) if peer in self.down else []

    def on_send_failed(self, now: float, peer: str) -> list[Action]:
        """A message to ``peer`` could not be delivered (no route, connection lost, not
        admitted): treat it as down until it is heard from or reconnects. Told every time,
        even if it is down already: a session that just asked it must not wait for it."""
        return self.on_peer_down(now, peer)

    def state_dict(self) -> dict[str, Any]:
        """What matters across a restart, as plain values (sessions in flight are not kept:
        peers time them out)."""
        return {"step": self.step, "stats": self.stats.as_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
        self.step = int(state["step"])
        self.stats = CoreStats(**{k: int(v) for k, v in state["stats"].items()})

    def restore(self, state: dict[str, Any]) -> list[Action]:
        """Load ``state`` (``load_state_dict``) and return the actions that re-apply what the
        core keeps in the learner (e.g. ``SetCorrection``): drivers never read core fields."""
        self.load_state_dict(state)
        return self._learner_state()

    def _learner_state(self) -> list[Action]:
        """Actions that put the core's learner-side state (nothing here) back in place."""
        return []

    def _after_step(self, now: float) -> list[Action]:
        return []

    def _merge(self, vectors: list[torch.Tensor], samples: list[int]) -> torch.Tensor:
        return merge(vectors, samples, self.config.merge)

    def _replace_keeping_progress(
        self, merged: torch.Tensor, sent: torch.Tensor, current: torch.Tensor | None = None
    ) -> ReplaceModel:
        """Adopt ``merged`` but keep the local steps taken since ``sent`` was handed out:
        ``w = merged + (w_now - sent)``. No local work is lost while a sync is in flight.
        ``current`` stands for ``w_now`` when an earlier replacement is not applied yet."""
        now = self.model.read() if current is None else current
        return ReplaceModel(merged + (now - sent))


def make_core(
    node_id: str,
    config: ProtocolConfig,
    model: ModelAccess,
    neighbors: Iterable[str],
    seed: int = 0,
    step_size: float = 0.1,
) -> NodeCore:
    """Build the core for ``config.kind``."""
    from p2pfl.protocol.dynamic import DynamicCore
    from p2pfl.protocol.scheduled import GossipCore, PeriodicCore

    cls: type[NodeCore] = {
        "none": NodeCore,
        "periodic": PeriodicCore,
        "gossip": GossipCore,
        "dynamic": DynamicCore,
    }[config.kind]
    return cls(node_id, config, model, neighbors, seed=seed, step_size=step_size)
