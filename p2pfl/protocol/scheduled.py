"""Protocols that talk on a fixed schedule: periodic neighbourhood averaging (``continuous``
is ``periodic`` with b=1) and pairwise gossip averaging. Both merge through
``NodeCore._adopt`` (drift correction with ``K = b``, outer optimizer, kept progress)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch

from p2pfl.protocol.actions import Action, ReplaceModel, Send, SetTimer
from p2pfl.protocol.config import ProtocolConfig
from p2pfl.protocol.core import NodeCore, RowReader, log
from p2pfl.wire.messages import Message, ModelReply, Push


class PeriodicCore(NodeCore):
    """Every ``b`` steps a node sends its model to all neighbours (round ``step // b``) and,
    once it holds every live neighbour's model of that round (or the round times out, or the
    next round starts), replaces its model by the mean of its closed neighbourhood."""

    open_round: int | None = None
    round_opened_at = 0.0
    sent: torch.Tensor | None = None

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.inbox: dict[int, dict[str, tuple[torch.Tensor, int]]] = {}
        self.sent_copies: dict[str, torch.Tensor] = {}
        """What each neighbour holds of ``sent`` (``copy_for``): the round's merge mixes these."""

    @classmethod
    def which_act(
        cls,
        config: ProtocolConfig,
        state: Mapping[str, torch.Tensor],
        rows: torch.Tensor,
        read: RowReader,
    ) -> torch.Tensor:
        """Every ``b``-th step starts a round."""
        return (state["step"][rows] + 1) % config.b == 0

    def _after_step(self, now: float) -> list[Action]:
        if self.step % self.config.b:
            return []
        # A round still open is closed first; what we send next is the model it produced.
        actions = self._finish_round() if self.open_round is not None else []
        replaced = [a.params for a in actions if isinstance(a, ReplaceModel)]
        current = replaced[0] if replaced else self.model.read()
        rnd = self.step // self.config.b
        self.open_round, self.sent = rnd, current.clone()
        self.sent_copies = {peer: self.copy_for(peer, self.sent) for peer in self.live_neighbors}
        for peer in self.live_neighbors:
            actions.append(Send(peer, Push(rnd, self.sent, self.model.samples)))
        self.round_opened_at = now
        actions.append(SetTimer(now + self.round_trip.wait, ("round", rnd)))
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
        if message.round == self.open_round:
            self.round_trip.sample(now - self.round_opened_at)  # how long peers lag our push
        return self._finish_if_complete()

    def on_timer(self, now: float, key: Hashable) -> list[Action]:
        if key == ("round", self.open_round):
            self.stats.timeouts += 1
            self.round_trip.expired()
            return self._finish_round()
        return []

    def _finish_if_complete(self, current: torch.Tensor | None = None) -> list[Action]:
        if self.open_round is None:
            return []
        got = self.inbox.get(self.open_round, {})
        if self.neighbors - self.down <= got.keys():
            return self._finish_round(current)
        return []

    def _finish_round(self, current: torch.Tensor | None = None) -> list[Action]:
        """Merge the open round; ``current`` is the model if a replacement is still pending."""
        assert self.open_round is not None and self.sent is not None
        got = self.inbox.pop(self.open_round, {})
        for old in [r for r in self.inbox if r < self.open_round]:
            del self.inbox[old]
        sent, self.open_round, self.sent = self.sent, None, None
        if not got:
            return []
        merged, lesson = self._merge(sent, self.model.samples, got, copies=self.sent_copies)
        return self._adopt(merged, sent, self.config.b, current, lesson=lesson)


class GossipCore(NodeCore):
    """Pairwise gossip averaging: every ``b`` steps a node offers its model to one random live
    neighbour (``Push`` with a negative round, ``-exchange id``); the receiver merges it into
    its own model at once (at most one offer per neighbour every ``b`` steps) and answers
    with the model it merged with (``ModelReply`` of that exchange id), which the initiator
    merges too. Both ends merge the same two vectors, so an exchange moves ``(w_j - w_i) / 2``
    from one to the other: the global mean is kept and the two drift-correction updates
    (``K = b``) cancel, however exchanges interleave (uniform merge, nothing clipped). A reply
    after the round-trip wait is ignored (the receiver's half of that exchange stays done)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.exchanges: dict[int, tuple[str, torch.Tensor, torch.Tensor, float]] = {}
        """Open exchanges by id: the peer, what we sent, the peer's copy of it, when."""
        self.next_exchange = 1

    step_fields = ("has_live_neighbors",)

    @property
    def has_live_neighbors(self) -> bool:
        return bool(self.neighbors - self.down)

    @classmethod
    def which_act(
        cls,
        config: ProtocolConfig,
        state: Mapping[str, torch.Tensor],
        rows: torch.Tensor,
        read: RowReader,
    ) -> torch.Tensor:
        """Every ``b``-th step, if some neighbour is live."""
        return ((state["step"][rows] + 1) % config.b == 0) & state["has_live_neighbors"][rows]

    def _after_step(self, now: float) -> list[Action]:
        peers = self.live_neighbors
        if self.step % self.config.b or not peers:
            return []
        peer = self.rng.choice(peers)
        exchange, self.next_exchange = self.next_exchange, self.next_exchange + 1
        sent = self.model.read().clone()
        self.exchanges[exchange] = (peer, sent, self.copy_for(peer, sent), now)
        return [
            Send(peer, Push(-exchange, sent, self.model.samples)),
            SetTimer(now + self.round_trip.wait, ("exchange", exchange)),
        ]

    def on_message(self, now: float, sender: str, message: Message) -> list[Action]:
        if isinstance(message, Push) and message.round < 0 and sender in self.neighbors:
            if not self._admit_session(sender, now):
                return []
            own = self.model.read().clone()
            offer = {sender: (message.params, message.samples)}
            copies = {sender: self.copy_for(sender, own)}  # our reply, as the peer will hold it
            merged, lesson = self._merge(own, self.model.samples, offer, copies=copies)
            reply = ModelReply(-message.round, own, self.model.samples)
            return [Send(sender, reply)] + self._adopt(merged, own, self.config.b, lesson=lesson)
        if (
            isinstance(message, ModelReply)
            and self.exchanges.get(message.session, ("",))[0] == sender
        ):
            _, sent, copy, asked_at = self.exchanges.pop(message.session)
            self.round_trip.sample(now - asked_at)
            answer = {sender: (message.params, message.samples)}
            copies = {sender: copy}
            merged, lesson = self._merge(sent, self.model.samples, answer, copies=copies)
            return self._adopt(merged, sent, self.config.b, lesson=lesson)
        return super().on_message(now, sender, message)

    def on_timer(self, now: float, key: Hashable) -> list[Action]:
        if isinstance(key, tuple) and key[0] == "exchange" and self.exchanges.pop(key[1], None):
            self.stats.timeouts += 1
            self.round_trip.expired()
        return []
