"""Protocols that talk on a fixed schedule: periodic neighbourhood averaging (``continuous``
is ``periodic`` with b=1) and gossip learning."""

from __future__ import annotations

from collections.abc import Hashable

import torch

from p2pfl.protocol.actions import Action, ReplaceModel, Send, SetTimer
from p2pfl.protocol.core import NodeCore, log
from p2pfl.wire.messages import Message, Push


class PeriodicCore(NodeCore):
    """Every ``b`` steps a node sends its model to all neighbours (round ``step // b``) and,
    once it holds every live neighbour's model of that round (or the round times out, or the
    next round starts), replaces its model by the mean of its closed neighbourhood."""

    open_round: int | None = None
    sent: torch.Tensor | None = None

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.inbox: dict[int, dict[str, tuple[torch.Tensor, int]]] = {}

    def _after_step(self, now: float) -> list[Action]:
        if self.step % self.config.b:
            return []
        # A round still open is closed first; what we send next is the model it produced.
        actions = self._finish_round() if self.open_round is not None else []
        current = actions[-1].params if actions else self.model.read()
        rnd = self.step // self.config.b
        self.open_round, self.sent = rnd, current.clone()
        for peer in self.live_neighbors:
            actions.append(Send(peer, Push(rnd, self.sent, self.model.samples)))
        actions.append(SetTimer(now + self.config.timeout, ("round", rnd)))
        return actions + self._finish_if_complete(current)

    def on_message(self, now: float, sender: str, message: Message) -> list[Action]:
        if not isinstance(message, Push) or message.round < 0 or sender not in self.neighbors:
            return super().on_message(now, sender, message)
        oldest = self.open_round if self.open_round is not None else self.step // self.config.b
        if message.round < oldest or message.round > oldest + 2:
            self.stats.ignored += 1
            log.debug("%s: round %d from %s outside window", self.node_id, message.round, sender)
            return []
        self.inbox.setdefault(message.round, {})[sender] = (message.params, message.samples)
        return self._finish_if_complete()

    def on_timer(self, now: float, key: Hashable) -> list[Action]:
        if key == ("round", self.open_round):
            self.stats.timeouts += 1
            return self._finish_round()
        return []

    def _finish_if_complete(self, current: torch.Tensor | None = None) -> list[Action]:
        if self.open_round is None:
            return []
        got = self.inbox.get(self.open_round, {})
        if all(peer in got for peer in self.live_neighbors):
            return self._finish_round(current)
        return []

    def _finish_round(self, current: torch.Tensor | None = None) -> list[ReplaceModel]:
        """Merge the open round; ``current`` is the model if a replacement is still pending."""
        assert self.open_round is not None and self.sent is not None
        got = self.inbox.pop(self.open_round, {})
        for old in [r for r in self.inbox if r < self.open_round]:
            del self.inbox[old]
        sent, self.open_round, self.sent = self.sent, None, None
        if not got:
            return []
        merged = self._merge(sent, self.model.samples, got)
        self.stats.syncs += 1
        return [self._replace_keeping_progress(merged, sent, current)]


class GossipCore(NodeCore):
    """Gossip learning: every ``b`` steps push the model to one random live neighbour; a
    receiver merges it into its own model at once (at most one push per neighbour every
    ``b`` steps)."""

    def _after_step(self, now: float) -> list[Action]:
        peers = self.live_neighbors
        if self.step % self.config.b or not peers:
            return []
        peer = self.rng.choice(peers)
        return [Send(peer, Push(-1, self.model.read().clone(), self.model.samples))]

    def on_message(self, now: float, sender: str, message: Message) -> list[Action]:
        if not isinstance(message, Push) or message.round != -1 or sender not in self.neighbors:
            return super().on_message(now, sender, message)
        if not self._admit_session(sender, now):
            return []
        own = self.model.read().clone()
        merged = self._merge(own, self.model.samples, {sender: (message.params, message.samples)})
        self.stats.syncs += 1
        return [self._replace_keeping_progress(merged, own)]
