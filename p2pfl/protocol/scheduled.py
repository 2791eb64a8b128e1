"""Protocols that talk on a fixed schedule: periodic neighbourhood averaging (``continuous``
is ``periodic`` with b=1) and pairwise gossip averaging. Both merge through
``NodeCore._adopt`` (drift correction with ``K = b``, outer optimizer, kept progress)."""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass

import torch

from p2pfl.protocol.actions import Action, ReplaceModel, Send, SetTimer
from p2pfl.protocol.config import ProtocolConfig
from p2pfl.protocol.core import NodeCore, RowReader, log
from p2pfl.wire.messages import Confirm, Message, ModelReply, Push


class PeriodicCore(NodeCore):
    """Every ``b`` steps a node sends its model to all neighbours (round ``step // b``) and,
    once it holds the model of that round of every live neighbour it waits for (or the
    missing ones are stragglers, or the round times out, or the next round starts), replaces
    its model by the mean of its closed neighbourhood. A neighbour that missed rounds is
    waited for less often (``PeerWaits``); its model is merged whenever it arrives in time.

    Round numbers are local step counts, so they match only between nodes that started
    together (the simulator's): daemons started apart count other numbers, and one a few
    steps ahead opens the next round before its neighbour's push of the last one arrives (at
    load, a pair of daemons 30 steps apart with ``b=20``: the faster one merged twice in
    6,000 steps). A push whose round cannot be matched (older than the open round, or more
    than two ahead) is its sender's *fallback*: its latest such model, merged in its place
    when a round closes without its model of that round (a push of the round supersedes it)."""

    open_round: int | None = None
    round_opened_at = 0.0
    round_deadline = math.inf
    """When the open round's wait runs out (its ``round`` timer)."""
    sent: torch.Tensor | None = None
    slowest: float | None = None
    """The latest push of the open round so far, after the round opened (None: none yet)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.inbox: dict[int, dict[str, tuple[torch.Tensor, int]]] = {}
        self.awaited: set[str] = set()
        """The neighbours whose model of the open round it waits for."""
        self.sent_copies: dict[str, torch.Tensor] = {}
        """What each neighbour holds of ``sent`` (``copy_for``): the round's merge mixes these."""
        self.fallback: dict[str, tuple[torch.Tensor, int]] = {}
        """Each neighbour's latest push of a round we could not match (see the class)."""
        self.peer_agreement: dict[str, float | None] = {}
        """The drift-correction agreement factor each neighbour told with its latest push."""

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
        self.open_round, self.sent, self.slowest = rnd, current.clone(), None
        self.sent_copies = {peer: self.copy_for(peer, self.sent) for peer in self.live_neighbors}
        for peer in self.live_neighbors:
            push = Push(rnd, self.sent, self.model.samples, self.drift_correction.shared())
            actions.append(Send(peer, push))
            self.peer_waits.asked(peer, rnd, now)
        self.awaited = set(self.peer_waits.expected(self.live_neighbors))
        self.round_opened_at, self.round_deadline = now, now + self.round_trip.wait
        actions.append(SetTimer(self.round_deadline, ("round", rnd)))
        return actions + self._finish_if_complete(current)

    def on_message(self, now: float, sender: str, message: Message) -> list[Action]:
        if not isinstance(message, Push) or message.round < 0 or sender not in self.neighbors:
            return super().on_message(now, sender, message)
        oldest = self.open_round if self.open_round is not None else self.step // self.config.b
        # A model of a round we opened (even closed) times how long the peer lags our push;
        # any other proves it alive.
        timed = self.peer_waits.answered(sender, message.round, now) is not None
        if not timed:
            self.peer_waits.heard(sender)
        if timed or message.round >= oldest:
            self.awaited.add(sender)  # a peer that answers again is waited for again
        self.peer_agreement[sender] = message.agreement
        if not oldest <= message.round <= oldest + 2:
            self.stats.unmatched += 1
            self.fallback[sender] = (message.params, message.samples)
            log.debug(
                "%s: round %d from %s kept as a fallback", self.node_id, message.round, sender
            )
            return []
        self.inbox.setdefault(message.round, {})[sender] = (message.params, message.samples)
        if message.round != self.open_round:
            return []
        self.round_trip.sample(now - self.round_opened_at)
        self.slowest = max(now - self.round_opened_at, self.slowest or 0.0)
        actions = self._finish_if_complete()
        if self.open_round is not None and math.isfinite(at := self._cut_off_at()):
            actions.append(SetTimer(at, ("straggler", self.open_round)))  # stragglers left
        return actions

    def _cut_off_at(self) -> float:
        assert self.slowest is not None
        missing = self._missing()
        return self.round_opened_at + self.peer_waits.cut_off(self.slowest, missing, unknown=False)

    def _missing(self) -> set[str]:
        """The awaited live neighbours whose model of the open round has not arrived."""
        assert self.open_round is not None
        return self.awaited - self.down - self.inbox.get(self.open_round, {}).keys()

    def on_timer(self, now: float, key: Hashable) -> list[Action]:
        if key == ("straggler", self.open_round) and now >= self.round_deadline:
            key = ("round", self.open_round)  # a tie is the wait's: whichever timer fires first
        if key == ("round", self.open_round):
            self.stats.timeouts += 1  # the models in hand (if any) were too slow for a cut-off
            self.round_trip.expired()
            return self._finish_round()
        if key == ("straggler", self.open_round) and now >= self._cut_off_at():
            self.stats.stragglers += len(self._missing())
            return self._finish_round()
        return []

    def _finish_if_complete(self, current: torch.Tensor | None = None) -> list[Action]:
        if self.open_round is None or self._missing():
            return []
        return self._finish_round(current)

    def _finish_round(self, current: torch.Tensor | None = None) -> list[Action]:
        """Merge the open round; ``current`` is the model if a replacement is still pending."""
        assert self.open_round is not None and self.sent is not None
        got = self.inbox.pop(self.open_round, {})
        for peer, pushed in self.fallback.items():
            got.setdefault(peer, pushed)  # a push of the round supersedes the fallback
        self.fallback.clear()
        missing = self._missing() - got.keys()
        if got:  # else nobody answered: the links are slow, not these peers
            self.peer_waits.missed(sorted(missing))
        for old in [r for r in self.inbox if r < self.open_round]:
            del self.inbox[old]
        sent, self.open_round, self.sent = self.sent, None, None
        if not got:
            return []
        merged, lesson = self._merge(sent, self.model.samples, got, copies=self.sent_copies)
        told = (self.peer_agreement.get(peer) for peer in got)
        agreement = self.drift_correction.group_factor(*told)
        return self._adopt(merged, sent, self.config.b, current, lesson=lesson, agreement=agreement)


CONFIRM_WAITS = 2.0
"""How many round-trip waits (``RoundTrip.wait``, when the offer was merged) a gossip
receiver keeps an exchange's correction update for its initiator's ``Confirm``: an honest
initiator confirms within one wait of our reply's arrival (it ignores later replies)."""


@dataclass(frozen=True)
class _Unconfirmed:
    """A receiver's correction update of one exchange, learnt once its initiator confirms."""

    sent: torch.Tensor
    lesson: torch.Tensor
    step_size: float
    agreement: float | None
    until: float


class GossipCore(NodeCore):
    """Pairwise gossip averaging: every ``b`` steps a node offers its model to one random live
    neighbour (``Push`` with a negative round, ``-exchange id``); the receiver merges it into
    its own model at once (at most one offer per neighbour every ``b`` steps) and answers
    with the model it merged with (``ModelReply`` of that exchange id), which the initiator
    merges too. Both ends merge the same two vectors, so an exchange moves ``(w_j - w_i) / 2``
    from one to the other: the global mean is kept and the two drift-correction updates
    (``K = b``) cancel, however exchanges interleave (uniform merge, nothing clipped). A
    neighbour that let offers go unanswered is offered less often (``PeerWaits``).

    **Both ends learn, or neither.** With the drift correction on, the initiator tells the
    receiver it merged the reply (``Confirm`` of the exchange id, a few dozen bytes), and the
    receiver learns its correction update of the exchange only then (its model is merged at
    once either way); a reply after the round-trip wait is ignored and never confirmed, and
    an unconfirmed update is dropped after ``CONFIRM_WAITS`` waits (``unconfirmed`` in the
    stats). A peer that pushes its model to every neighbour and merges no reply (a flooder)
    otherwise had each receiver learn an update nobody mirrored: the corrections lost their
    zero sum, which cost honest nodes 4.5 points at 3 flooders of 16 (docs/byzantine.md)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.exchanges: dict[int, tuple[str, torch.Tensor, torch.Tensor, float, float | None]]
        self.exchanges = {}
        """Open exchanges by id: the peer, what we sent, the peer's copy of it, when, and the
        agreement factor we told it."""
        self.next_exchange = 1
        self.unconfirmed: dict[tuple[str, int], _Unconfirmed] = {}
        """Exchanges we merged as receiver, by initiator and exchange id: their correction
        updates wait for the initiator's ``Confirm``."""

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
        peer = self.rng.choice(self.peer_waits.expected(peers) or peers)
        exchange, self.next_exchange = self.next_exchange, self.next_exchange + 1
        sent = self.model.read().clone()
        told = self.drift_correction.shared()
        self.exchanges[exchange] = (peer, sent, self.copy_for(peer, sent), now, told)
        self.peer_waits.asked(peer, exchange, now)
        return [
            Send(peer, Push(-exchange, sent, self.model.samples, told)),
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
            told = self.drift_correction.shared()
            reply = ModelReply(-message.round, own, self.model.samples, agreement=told)
            agreement = self.drift_correction.group_factor(message.agreement)
            confirmed = bool(self.drift_correction.lam)
            adopted = self._adopt(
                merged, own, self.config.b, lesson=lesson, agreement=agreement, learn=not confirmed
            )
            if confirmed:
                self._expire_unconfirmed(now)
                step_size = self.mean_step_size(self.config.b)
                until = now + CONFIRM_WAITS * self.round_trip.wait
                pending = _Unconfirmed(own, lesson, step_size, agreement, until)
                replaced = self.unconfirmed.pop((sender, -message.round), None)
                self.stats.unconfirmed += replaced is not None  # an exchange id offered again
                self.unconfirmed[(sender, -message.round)] = pending
            return [Send(sender, reply)] + adopted
        if isinstance(message, Confirm):
            return self._learn_confirmed(now, sender, message.session)
        if isinstance(message, ModelReply):
            self.peer_waits.answered(sender, message.session, now)  # late ones too
        if (
            isinstance(message, ModelReply)
            and self.exchanges.get(message.session, ("",))[0] == sender
        ):
            _, sent, copy, asked_at, told = self.exchanges.pop(message.session)
            self.round_trip.sample(now - asked_at)
            answer = {sender: (message.params, message.samples)}
            copies = {sender: copy}
            merged, lesson = self._merge(sent, self.model.samples, answer, copies=copies)
            agreement = self.drift_correction.group_factor(message.agreement, own=told)
            adopted = self._adopt(merged, sent, self.config.b, lesson=lesson, agreement=agreement)
            if self.drift_correction.lam:
                adopted.append(Send(sender, Confirm(message.session)))
            return adopted
        return super().on_message(now, sender, message)

    def _learn_confirmed(self, now: float, sender: str, exchange: int) -> list[Action]:
        """``sender`` confirmed exchange ``exchange``: learn our correction update of it (if we
        merged it as receiver and it has not expired)."""
        self._expire_unconfirmed(now)
        pending = self.unconfirmed.pop((sender, exchange), None)
        if pending is None:
            return []
        return list(
            self.drift_correction.update(
                pending.sent, pending.lesson, self.config.b, pending.step_size, pending.agreement
            )
        )

    def _expire_unconfirmed(self, now: float) -> None:
        """Drop the correction updates whose confirmation did not come in time."""
        expired = [key for key, pending in self.unconfirmed.items() if pending.until < now]
        for key in expired:
            del self.unconfirmed[key]
        self.stats.unconfirmed += len(expired)

    def on_timer(self, now: float, key: Hashable) -> list[Action]:
        if isinstance(key, tuple) and key[0] == "exchange" and key[1] in self.exchanges:
            self.stats.timeouts += 1
            self.round_trip.expired()
            self.peer_waits.missed([self.exchanges.pop(key[1])[0]])
        return []
