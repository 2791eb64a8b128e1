"""The core's side of a node in one channel: the one place where a core's actions are carried
out, for the simulator, the daemon and the tests alike.

A channel is a group of peers syncing one part of their models under one protocol (the whole
model, or a community's shared part). ``CoreRuntime`` feeds the channel's core its events and
carries out what it returns: ``ReplaceModel`` and ``SetCorrection`` are applied here, to the
part's entries of the node's model (``NodeModel``); ``Send`` and ``SetTimer`` go to the
driver (``Driver``), which only moves bytes and keeps time. The rules every driver follows:

* a message from a peer is proof of life (``NodeCore.on_heard``, before ``on_message``);
* a send the driver cannot deliver (no route to the peer, a peer not admitted to the channel,
  a connection that failed) is reported with ``send_failed``; the core decides what it means
  (``NodeCore.on_send_failed``). A send to a peer that is not a neighbour (the hedge's
  widening) is therefore tried by every driver: it reaches the peer if the driver has a route
  to it (the simulator has one to every online node; the daemon to peers whose address it
  knows and that are admitted to the channel), and is reported as failed otherwise;
* a restored core re-applies its learner-side state through the actions ``restore`` returns;
* cores are built by ``open_core`` with ``core_seed`` (``rules.py``) and told the step size
  of the node's optimizer (``rules.step_size``) before every local step.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Any, Protocol

import torch

from p2pfl.community.sharing import SharedPart
from p2pfl.protocol.actions import Action, ReplaceModel, Send, SetCorrection, SetTimer
from p2pfl.protocol.config import ProtocolConfig
from p2pfl.protocol.core import NodeCore, make_core
from p2pfl.runtime.model import NodeModel
from p2pfl.runtime.rules import core_seed
from p2pfl.wire.messages import Message


class Driver(Protocol):
    """What a driver does for one channel of one node: move messages and keep time."""

    def send(self, now: float, to: str, message: Message) -> None:
        """Deliver ``message`` to peer ``to`` (best effort). A driver that knows at once that
        it cannot deliver it calls ``CoreRuntime.send_failed`` (here or later)."""
        ...

    def set_timer(self, at: float, key: Hashable) -> None:
        """Call ``CoreRuntime.timer(at, key)`` at time ``at`` (the driver's clock)."""
        ...


class CoreRuntime:
    """One core on ``part`` of ``model``, driven by ``driver``. Every event method returns
    nothing: model changes are applied, sends and timers handed to the driver."""

    def __init__(self, core: NodeCore, part: SharedPart, model: NodeModel, driver: Driver) -> None:
        self.core, self.part, self.model, self.driver = core, part, model, driver
        self.closed = False
        self._running = False
        self._failed: list[tuple[float, str]] = []

    # -- events ------------------------------------------------------------------------------
    def local_step(self, now: float) -> None:
        """The learner took one local step on this node (the core is told the step size of
        that step first: it follows the learning-rate schedule)."""
        self.core.step_size = self.model.step_size()
        self._run(self.core.on_local_step(now), now)

    def message(self, now: float, sender: str, message: Message) -> None:
        """A validated message of this channel arrived from ``sender``."""
        heard = self.core.on_heard(now, sender)
        if heard:  # usually nothing: a run of no actions does nothing
            self._run(heard, now)
        actions = self.core.on_message(now, sender, message)
        if actions:
            self._run(actions, now)

    def timer(self, now: float, key: Hashable) -> None:
        """A timer the driver was asked to set fired."""
        self._run(self.core.on_timer(now, key), now)

    def peer_up(self, now: float, peer: str) -> None:
        """``peer`` is reachable in this channel (connected, admitted, back online)."""
        self._run(self.core.on_peer_up(now, peer), now)

    def peer_down(self, now: float, peer: str) -> None:
        """``peer`` is no longer reachable in this channel."""
        self._run(self.core.on_peer_down(now, peer), now)

    def send_failed(self, now: float, peer: str) -> None:
        """A message to ``peer`` was not delivered. Reported while this runtime is carrying
        out actions (a driver that fails a send at once), it is handled right after them."""
        if self._running:
            self._failed.append((now, peer))
            return
        self._run(self.core.on_send_failed(now, peer), now)

    def restore(self, state: dict[str, Any], now: float = 0.0) -> None:
        """Load the core's saved ``state`` and re-apply what it keeps in the learner.

        Raises ValueError if a tensor of the state does not have the part's shape and dtype
        (nothing is applied then), or what ``load_state_dict`` raises for malformed state."""
        actions = self.core.restore(state)
        like = self.core.model.read()
        for name, value in self.core.state_dict().items():
            if isinstance(value, torch.Tensor) and (
                value.shape != like.shape or value.dtype != like.dtype
            ):
                raise ValueError(
                    f"its {name} is {value.dtype} {list(value.shape)}, the model part is "
                    f"{like.dtype} {list(like.shape)}"
                )
        self._run(actions, now)

    def close(self) -> None:
        """Stop the channel: its drift correction is cleared and later events, timers and
        failures are ignored (e.g. a community was left)."""
        self.closed = True
        self._failed.clear()
        self.model.clear_correction(self.part)

    # -- actions -----------------------------------------------------------------------------
    def _run(self, actions: Iterable[Action], now: float) -> None:
        if self.closed:
            return
        self._running = True
        try:
            for action in actions:
                if isinstance(action, Send):
                    self.driver.send(now, action.to, action.message)
                elif isinstance(action, SetTimer):
                    self.driver.set_timer(action.at, action.key)
                elif isinstance(action, ReplaceModel):
                    self.model.replace(self.part, action.params)
                elif isinstance(action, SetCorrection):
                    self.model.set_correction(self.part, action.vector)
                else:
                    raise TypeError(f"unknown action {action!r}")
        finally:
            self._running = False
        while self._failed and not self.closed:
            when, peer = self._failed.pop(0)
            self._run(self.core.on_send_failed(when, peer), when)


def open_core(
    model: NodeModel,
    node_id: str,
    protocol: ProtocolConfig,
    part: SharedPart,
    driver: Driver,
    *,
    seed: int,
    channel: str,
    neighbors: Iterable[str] = (),
    max_neighbors: int = 0,
) -> CoreRuntime:
    """The runtime of a new core for ``node_id`` in ``channel``: ``protocol`` on ``part`` of
    ``model``, told ``step_size`` of the learner's optimizer and seeded with
    ``core_seed(seed, node_id, channel)``; the current model is its starting point."""
    core = make_core(
        node_id,
        protocol,
        model.view(part),
        neighbors,
        seed=core_seed(seed, node_id, channel),
        step_size=model.step_size(),
        max_neighbors=max_neighbors,
    )
    core.mean_step_size = model.step_size
    return CoreRuntime(core, part, model, driver)
