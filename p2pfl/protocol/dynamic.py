"""Decentralized dynamic averaging (Kamp et al., 2018) with balancing sessions.

Each node keeps a reference ``r`` (the last average it agreed on). Every ``b`` local steps it
checks the local condition ``||w - r||² <= Δ``. On a violation it becomes the coordinator of
a *balancing session*: it pulls the models of ``group`` of its live neighbours (all with
``group=0``), averages them with its own, and while that average is still farther than Δ
from ``r`` it widens the group with neighbours of the members (doubling it, up to ``cap``
nodes; the paper's hedge). It then sends the average to the group; every member sets
``w = r = average``.

With ``group=2,cap=3`` a session is small: 2 random neighbours and at most 3 nodes, so
widening only fills the place of a member that was busy. Every member costs two models on
the wire (its reply and the average), and on the fair comparison's sweeps the trigger did
not make the syncs of a node rarer than a fixed schedule at equal accuracy: bytes follow
the member-syncs. Three nodes synced for four models instead of a neighbourhood of five for
eight reached 99 % of continuous averaging with 1.1–1.5× fewer bytes than the default
(every neighbour and the hedge); where sessions are rare (95 %) the larger groups mixed
more per session and were 1.1–1.25× cheaper under label skew, and early in training (200
steps, Dirichlet 0.5) small sessions mixed slower and held less under attack
(docs/fair-comparison.md): not the default.

Decisions that matter on a real network:

* A node is in at most one session at a time. A ``Pull`` that reaches a busy node is
  answered with ``Busy`` and the coordinator goes on without it; two nodes that violate
  together therefore never wait on each other.
* Members keep training while the session runs. When the average arrives they adopt
  ``average + (w_now - w_sent)``: local steps taken meanwhile are kept, none is lost.
* Every wait is bounded by the core's round-trip wait (``timeout`` at least, see
  ``p2pfl.protocol.round_trip``). Once some peers answered, the missing ones are cut off as
  stragglers at a multiple of the round trips in hand (``PeerWaits``), and a peer that
  missed answers is asked less often. A coordinator resolves with whoever answered and
  releases the others (``Busy`` sent back); a member whose coordinator vanished drops out of
  the session and keeps its own model.
* Δ: absolute ``delta``, or ``rel * ||r||²`` (default), i.e. a violation when the model has
  moved by more than √rel of its own norm. This scale-free rule works unchanged across the
  built-in models and data sets. With ``lr_power=p`` Δ is multiplied by ``(η/η_peak)^p``,
  η the step size of the node's latest step and η_peak the largest it has taken (so a
  warm-up counts as the peak): under a decaying learning-rate schedule SGD noise moves a
  model by about η per step, so ``p=2`` keeps Δ in proportion to it. The factor is taken
  whenever the reference changes (at every session the node joins); at a constant rate
  it is 1 and the protocol is the default's.
* ``condition=coherent`` tests only the *coherent* part of the motion. At a constant learning
  rate SGD noise moves a model forever: with the moves ``v_1..v_n`` between checks since the
  last sync, ``||w − r||² = Σ ||v_j||² + Σ_{j≠k} v_j·v_k``; for independent noise the cross
  terms have mean zero (negative near an optimum, which pulls the model back), while a real
  gradient makes them grow with the square of the steps. The coherent condition is a CUSUM
  of the cross terms, ``C ← max(0, C + 2 v·(w_prev − r))`` (each check adds what the move
  ``v`` added to ``||w − r||²`` beyond its own ``||v||²``), violated when ``C > Δ``: a
  network that only jitters around its optimum goes quiet, a drifting one still talks, and
  the clamp at zero keeps a long quiet phase from delaying the reaction to a later drift.
  ``condition=smoothed`` tests ``||ŵ − r||² > Δ`` on an exponential moving average ``ŵ`` of
  the model (time constant ``smoothing`` steps, default 16): noise averages out of ``ŵ``,
  while both a drift and a model that settled away from ``r`` (e.g. on a stale drift
  correction after the task changed) still violate. ``condition=distance`` is the paper's
  ``||w − r||² > Δ``.
* ``condition=growth`` tests how much faster than linearly ``D = ||w − r||²`` grows since
  the last sync. Over the first ``window`` steps after a sync the node only measures its
  noise rate ``s``: the largest squared move per step between its checks (``||v||² / b``).
  Noise moves a model by about that much every step, so it makes ``D`` grow at most
  linearly, ``D ≲ s·n`` (``n`` steps since the sync; it levels off near an optimum), while
  a real change of speed ``g`` adds only ``g²b`` to ``s`` but ``g²n²`` to ``D``. After the
  window the node keeps a CUSUM of the excess over that floor, ``C ← max(0, C + Δe)`` with
  ``e = D − s·n``, and violates when ``C > Δ``. The clamp at zero drops the deficit of a
  model that settled (``D`` levelling off below ``s·n``), so a drift after a long quiet
  phase is not held back by it. (A rate taken from ``D / n`` itself counts a change under
  way during the window as noise: measured, it then missed a drift.)
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from p2pfl.protocol.actions import Action, ReplaceModel, Send, SetTimer
from p2pfl.protocol.config import ProtocolConfig
from p2pfl.protocol.core import (
    DISTANCE_HISTORY,
    PEER_SPEED_ALLOWANCE,
    EchoedAverage,
    NodeCore,
    RowReader,
    log,
)
from p2pfl.protocol.trust import snapshot
from p2pfl.wire.messages import Average, Busy, Message, ModelReply, Pull


@dataclass
class Session:
    """A balancing session this node coordinates."""

    id: int
    sent: torch.Tensor
    asked: set[str]
    round: int = 0
    asked_at: float = 0.0
    deadline: float = math.inf
    """When the round's wait runs out (its ``session`` timer)."""
    replies: dict[str, ModelReply] = field(default_factory=dict)
    refused: set[str] = field(default_factory=set)
    cut: set[str] = field(default_factory=set)
    """Peers given up on (stragglers, or the round's wait expired)."""
    slowest: float | None = None
    """The slowest answer of the session so far (None: none yet)."""

    @property
    def pending(self) -> set[str]:
        return self.asked - set(self.replies) - self.refused - self.cut

    @property
    def answered(self) -> bool:
        """``not pending``, without building the set (asked every answer of a session)."""
        replies, refused, cut = self.replies, self.refused, self.cut
        return all(p in replies or p in refused or p in cut for p in self.asked)


@dataclass
class Membership:
    """A session of another node this node has handed its model to."""

    id: int
    coordinator: str
    sent: torch.Tensor


MAX_WIDENING_ROUNDS = 6
MERGED_RADIUS = 2.0
"""How many times τ a peer's reply may lie from the coordinator in its merge, where a
member's check of the ``Average`` it adopts whole uses τ itself: one model among the group's
moves the average by its radius over the group's size, an adopted average moves the member
by all of it. Under label skew honest groups sit more than τ apart (nodes that last synced
with different neighbours drift apart); clipped at τ, coordinators cut (and distrusted) the
replies of honest far peers, the network split into groups that stayed apart and single
nodes fell far behind (Dirichlet 0.5, ``rel=0.005``, 3,000 steps: 0.916 at 1, 0.966 at 2,
0.958 with no clipping). A member checks an ``Average`` from a coordinator it heard from
before and vouches for (``PeerTrust.vouched``: its models lay within their radius lately)
at 2τ as well (at τ honest averages under label skew were refused, each refusal breaking
its session's zero sum and the coordinator's trust with the member: on Dirichlet 0.1 a
cascade), and any other at τ: a first contact is measured from where the member started,
and stale averages of 3 replayers of 16 fit 2τ there (200 steps, seed 1: 0.285 instead of
0.831); a coordinator known only from a model the member refused earned no 2τ: with τ
sized by the member's own displacement ``s`` since its last merge, a sign-flipped average
(``2||w||`` from what the member sent) fits 2τ = 6s once a member that rarely merges has
trained ``||w||/3`` alone, and a ``fake-average`` peer's second average was adopted (an
honest daemon at 0.245 against 0.930 trained alone, CI on a912145)."""
IDLE_SESSION_WAITS = 2  # a node that stopped training admits a peer once per this many waits
ANSWERABLE_SESSIONS = 4
"""Sessions a coordinator remembers after sending their average, so that a member that
refuses or misses it (and says so with ``Busy``) has its correction update learnt by the
coordinator instead (``DynamicCore._take_over``)."""


DISTANCE_BLOCK = 64
UNCALIBRATED = -1.0
"""``growth``'s noise rate before a check has measured it (rates are never negative)."""


class BlockBuffers:
    """Buffers of a block of rows (``DISTANCE_BLOCK``), by name, that the vectorised check reuses
    from block to block and from step to step. Its temporaries are megabytes (64 rows of the
    benchmark's 4,810 parameters: 1.2 MB each); allocated afresh, the allocator gave them
    back to the system after each block and took page faults to map them again."""

    def __init__(self) -> None:
        self._store: dict[str, torch.Tensor] = {}

    def get(self, name: str, rows: int, width: int) -> torch.Tensor:
        """An uninitialised ``[rows, width]`` tensor, valid until the next ``get`` of
        ``name``."""
        buf = self._store.get(name)
        if buf is None or buf.shape[-1] != width or len(buf) < rows:
            buf = self._store[name] = torch.empty(max(rows, DISTANCE_BLOCK), width)
        return buf[:rows]


BLOCKS = BlockBuffers()
"""The vectorised check's buffers (one set per process: a check runs to its end before the
next starts)."""


def squared_distances(
    w: torch.Tensor, r: torch.Tensor, scratch: torch.Tensor | None = None
) -> torch.Tensor:
    """``||w_i - r_i||²`` for every row of ``w`` and ``r`` (``[k, p]``), a block of rows at a
    time (the difference of a block stays in cache; ``scratch``: a buffer of at least
    ``min(k, DISTANCE_BLOCK)`` rows to take it in). One row gives bit for bit what that row
    gives among many: the per-node and the vectorised drift test agree exactly."""
    k = len(w)
    out = torch.empty(k)
    if scratch is None:
        scratch = torch.empty(min(k, DISTANCE_BLOCK), w.shape[-1])
    for start in range(0, k, DISTANCE_BLOCK):
        stop = min(start + DISTANCE_BLOCK, k)
        d = torch.sub(w[start:stop], r[start:stop], out=scratch[: stop - start])
        torch.sum(d.square_(), 1, out=out[start:stop])
    return out


def row_dots(a: torch.Tensor, b: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """``a_i · b_i`` for every row of ``a`` and ``b`` (``[k, p]``), a block of rows at a time
    (``scratch`` as for ``squared_distances``); like ``squared_distances``, one row gives bit
    for bit what it gives among many."""
    k = len(a)
    out = torch.empty(k)
    if scratch is None:
        scratch = torch.empty(min(k, DISTANCE_BLOCK), a.shape[-1])
    for start in range(0, k, DISTANCE_BLOCK):
        stop = min(start + DISTANCE_BLOCK, k)
        torch.sum(
            torch.mul(a[start:stop], b[start:stop], out=scratch[: stop - start]),
            1,
            out=out[start:stop],
        )
    return out


def _store_kept(
    column: torch.Tensor, rows: torch.Tensor, values: torch.Tensor, skip: torch.Tensor
) -> None:
    """``column[rows] = values`` except where ``skip`` (usually nowhere: one copy then)."""
    if skip.any():
        kept = (~skip).nonzero().flatten()
        rows, values = rows.index_select(0, kept), values.index_select(0, kept)
    column.index_copy_(0, rows, values.to(column.dtype))


class DynamicCore(NodeCore):
    """Dynamic averaging; see the module docstring."""

    step_counters = ("step", "steps_since_sync")
    step_fields = (
        "busy",
        "quiet_until",
        "delta",
        "reference",
        "_checked",
        "_coherence",
        "_noise_rate",
        "_excess",
    )
    step_state = ("_coherence", "_noise_rate", "_excess")

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.reference = self.model.read().clone()
        self.steps_since_sync = 0
        self.session: Session | None = None
        self.membership: Membership | None = None
        self._timed_out: tuple[Membership, int] | None = None
        """The membership we last gave up waiting on, and our sync count then: its average
        is still adopted if it arrives while we are idle and have not synced since."""
        self.quiet_until = 0
        self._session_models: OrderedDict[str, tuple[torch.Tensor, float, float]] = OrderedDict()
        """Per peer: our model at our last session with it (``snapshot``), the norm of that
        snapshot's rounding error, and the session's time."""
        self.peak_step_size = self.step_size
        """The largest step size so far (``lr_power``'s reference)."""
        self._delta = self._compute_delta()
        self._coherent = self.config.condition != "distance"
        self._checked = self.reference.clone() if self._coherent else None
        self._coherence = 0.0
        growth = self.config.condition == "growth"
        self._noise_rate: float | None = UNCALIBRATED if growth else None
        """``growth``: the largest ``||v||² / b`` at a check within ``window`` steps of the
        sync (``v`` the move since the previous check, over ``n`` steps for the first)."""
        self._excess: float | None = 0.0 if growth else None
        """``growth``: ``e = D − s·n`` at the last check."""
        self._averaged: OrderedDict[
            int, tuple[torch.Tensor, dict[str, torch.Tensor], int, float | None]
        ] = OrderedDict()
        """Per recent session we coordinated: its average, the members' models in it (by
        member, until it adopted or not), the shared step count and agreement factor
        (``_take_over``)."""

    def state_dict(self) -> dict[str, Any]:
        """Base state plus reference and steps since the last sync."""
        return super().state_dict() | {
            "reference": self.reference.clone(),
            "steps_since_sync": self.steps_since_sync,
            "peak_step_size": self.peak_step_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "reference" in state:
            self.reference = state["reference"].clone()
            self.steps_since_sync = int(state["steps_since_sync"])
            self.peak_step_size = float(state.get("peak_step_size", self.step_size))
            self._delta = self._compute_delta()

    # -- the local condition -------------------------------------------------------------
    @property
    def delta(self) -> float:
        """The current threshold Δ on ``||w - r||²``."""
        return self._delta

    def _compute_delta(self) -> float:
        if self.config.delta is not None:
            delta = self.config.delta
        else:
            delta = self.config.rel * float(self.reference.dot(self.reference))
        if self.config.lr_power:
            self.peak_step_size = max(self.peak_step_size, self.step_size)
            delta *= (self.step_size / self.peak_step_size) ** self.config.lr_power
        return delta

    def _clip_floor(self) -> float:
        """An honest peer may be up to √Δ from its reference without violating."""
        return math.sqrt(self._delta) if math.isfinite(self._delta) else 0.0

    def _codec_tolerance(self) -> float | None:
        """``tol·√Δ``: a reply off by more than that in the codec (by a good part of what the
        Δ test allows) travels in the key codec (``CodecConfig.tol``)."""
        codec = self.config.codec
        if codec is None or codec.tol is None:
            return None
        return codec.tol * self._clip_floor()

    def _admit_session(self, peer: str, now: float) -> bool:
        """A coordinator may pull us again only once we moved at least
        ``√Δ / PEER_SPEED_ALLOWANCE`` since our last session with it: an honest one has to
        drift √Δ from its fresh reference before it violates again, which takes a peer no more
        than that many times faster than us at least this long. A peer that claims violations
        faster (a flood) is refused and counted. A node that no longer trains (finished, or
        serving only) admits one session per peer every ``IDLE_SESSION_WAITS`` round-trip
        waits instead, so a peer that restarted or trains longer is still served. What we
        moved is measured from a half-precision ``snapshot`` less its rounding error: never
        more than we moved, so a flood is refused at least as often as with a full copy."""
        last = self._session_models.get(peer)
        if last is not None:
            model, error, at = last
            # At least this far from our model then (the snapshot is off by ``error``).
            moved = max(0.0, float(torch.linalg.vector_norm(self.model.read() - model)) - error)
            idle = self._last_step_at <= at  # we stopped training: our moves time nothing
            if moved < math.sqrt(self._delta) / PEER_SPEED_ALLOWANCE and not (
                idle and now - at >= IDLE_SESSION_WAITS * self.round_trip.wait
            ):
                self.stats.refused_peer += 1
                return False
        self._session_models.pop(peer, None)
        self._session_models[peer] = (*snapshot(self.model.read()), now)
        while len(self._session_models) > DISTANCE_HISTORY:
            self._session_models.popitem(last=False)
        return True

    def drift(self) -> float:
        """``||w - r||²``: how far the model has moved since the last agreement."""
        return float(squared_distances(self.model.read()[None], self.reference[None])[0])

    @classmethod
    def which_act(
        cls,
        config: ProtocolConfig,
        state: Mapping[str, torch.Tensor],
        rows: torch.Tensor,
        read: RowReader,
    ) -> torch.Tensor:
        """Every ``b``-th step, a node in no session and not backing off checks its condition
        (``_condition``, here for all of them at once) against Δ; those above it act
        (``_after_step``). The smoothed and coherent conditions keep state from check to
        check: it is updated here for the nodes that do not act (those that act compute it
        themselves)."""
        step = state["step"][rows] + 1
        act = (step % config.b == 0) & ~state["busy"][rows] & (step >= state["quiet_until"][rows])
        due = rows[act]
        if len(due):
            violated = [
                cls._check(config, state, block, read) for block in due.split(DISTANCE_BLOCK)
            ]
            act[act.clone()] = torch.cat(violated)
        return act

    @staticmethod
    def _check(
        config: ProtocolConfig,
        state: Mapping[str, torch.Tensor],
        due: torch.Tensor,
        read: RowReader,
    ) -> torch.Tensor:
        """Which cores at rows ``due`` (one block: its rows stay in cache) violate their
        ``_condition`` (NaN too, as ``_after_step``); the checks' new state is stored for the
        others. The same operations as ``_condition`` on each row, so bit for bit its result."""
        w = read(due)
        k, width = w.shape
        reference = torch.index_select(
            state["reference"], 0, due, out=BLOCKS.get("reference", k, width)
        )
        delta = state["delta"][due]
        scratch = BLOCKS.get("scratch", k, width)
        if config.condition == "distance":
            return ~(squared_distances(w, reference, scratch).double() <= delta)
        if config.condition == "growth":
            return DynamicCore._check_growth(config, state, due, w, reference, delta)
        checked = torch.index_select(state["_checked"], 0, due, out=BLOCKS.get("checked", k, width))
        if config.condition == "smoothed":
            # checked += (w - checked) * a, in fewer temporaries
            move = torch.sub(w, checked, out=BLOCKS.get("move", k, width))
            checked += move.mul_(min(1.0, config.b / config.smoothing))
            violated = ~(squared_distances(checked, reference, scratch).double() <= delta)
            _store_kept(state["_checked"], due, checked, violated)
            return violated
        move = torch.sub(w, checked, out=BLOCKS.get("move", k, width))
        apart = torch.sub(checked, reference, out=reference)  # the reference is not read again
        sums = state["_coherence"][due] + 2 * row_dots(move, apart, scratch).double()
        value = torch.where(sums > 0.0, sums, 0.0)  # max(0.0, sums), NaN to 0 as there
        violated = ~(value <= delta)
        _store_kept(state["_checked"], due, w, violated)
        _store_kept(state["_coherence"], due, value, violated)
        return violated

    @staticmethod
    def _check_growth(
        config: ProtocolConfig,
        state: Mapping[str, torch.Tensor],
        due: torch.Tensor,
        w: torch.Tensor,
        reference: torch.Tensor,
        delta: torch.Tensor,
    ) -> torch.Tensor:
        """``_check`` for ``condition=growth``: the operations of ``_growth`` on every row."""
        drift = squared_distances(w, reference).double()
        n = state["steps_since_sync"][due] + 1
        rate = state["_noise_rate"][due]
        calibrating = (n <= config.window) | (rate == UNCALIBRATED)
        checked = state["_checked"].index_select(0, due)
        measured = squared_distances(w, checked).double() / n.clamp(max=config.b)
        rate = torch.where(calibrating & (measured > rate), measured, rate)
        excess = drift - rate * n
        sums = state["_coherence"][due] + (excess - state["_excess"][due])
        value = torch.where(calibrating, 0.0, torch.where(sums > 0.0, sums, 0.0))
        excess = torch.where(calibrating, 0.0, excess)
        violated = ~(value <= delta)
        for name, column in (("_noise_rate", rate), ("_excess", excess), ("_coherence", value)):
            _store_kept(state[name], due, column, violated)
        _store_kept(state["_checked"], due, w, violated | ~calibrating)
        return violated

    def _growth(self) -> float:
        """``condition=growth`` at a check: 0 while measuring the noise rate, then the CUSUM
        of the distance's excess over it (see the module)."""
        assert self._noise_rate is not None and self._excess is not None
        assert self._checked is not None
        now = self.model.read()
        drift = float(squared_distances(now[None], self.reference[None])[0])
        n = self.steps_since_sync
        if n <= self.config.window or self._noise_rate == UNCALIBRATED:
            move = float(squared_distances(now[None], self._checked[None])[0])
            self._noise_rate = max(self._noise_rate, move / min(n, self.config.b))
            self._checked = now.clone()
            self._excess, self._coherence = 0.0, 0.0
            return 0.0
        excess = drift - self._noise_rate * n
        self._coherence = max(0.0, self._coherence + (excess - self._excess))
        self._excess = excess
        return self._coherence

    def _condition(self) -> float:
        """What is compared with Δ at a check: ``||w − r||²``, or with the coherent condition
        the CUSUM of the cross terms of the moves between checks (see the module)."""
        if self._noise_rate is not None:
            return self._growth()
        if not self._coherent:
            return self.drift()
        assert self._checked is not None
        now = self.model.read()
        if self.config.condition == "smoothed":
            self._checked += (now - self._checked) * min(1.0, self.config.b / self.config.smoothing)
            return float(squared_distances(self._checked[None], self.reference[None])[0])
        move = now - self._checked
        dot = row_dots(move[None], (self._checked - self.reference)[None])[0]
        self._coherence = max(0.0, self._coherence + 2 * float(dot))
        self._checked = now.clone()
        return self._coherence

    @property
    def busy(self) -> bool:
        return self.session is not None or self.membership is not None

    def _after_step(self, now: float) -> list[Action]:
        self.steps_since_sync += 1
        if self.step % self.config.b or self.busy or self.step < self.quiet_until:
            return []
        if self._condition() <= self._delta:
            return []
        self.stats.violations += 1
        return self._start_session(now)

    # -- coordinator -----------------------------------------------------------------------
    def _start_session(self, now: float) -> list[Action]:
        peers = self.peer_waits.expected(self.live_neighbors)
        if self.config.group and len(peers) > self.config.group:
            peers = self.rng.sample(peers, self.config.group)
        if not peers:
            return []
        sid = self.rng.getrandbits(62)
        self.session = Session(sid, self.model.read().clone(), set(peers))
        self.stats.sessions += 1
        return self._ask(now, peers)

    def _ask(self, now: float, peers: list[str]) -> list[Action]:
        assert self.session is not None
        s = self.session
        s.asked_at = now
        for peer in peers:
            self.peer_waits.asked(peer, s.id, now)
        actions: list[Action] = [Send(p, Pull(s.id)) for p in peers]
        s.deadline = now + self.round_trip.wait
        actions.append(SetTimer(s.deadline, ("session", s.id, s.round)))
        if s.slowest is not None:  # a wider round: its round trips are known already
            actions += self._straggler_timer(s)
        return actions

    def _on_reply(self, now: float, sender: str, msg: ModelReply) -> list[Action]:
        s = self.session
        if s is None or s.id != msg.session or sender not in s.asked or sender in s.replies:
            # A late reply to a session already resolved: let the peer go at once (it was
            # slow, not silent: restored, and its round trip learnt).
            self.stats.ignored += 1
            self.peer_waits.answered(sender, msg.session, now)
            return [Send(sender, Busy(msg.session))]
        s.replies[sender] = msg
        return self._on_answer(now, sender)

    def _on_answer(self, now: float, sender: str) -> list[Action]:
        """``sender`` answered the session (reply or ``Busy``): resolve it once every peer
        has, else (re)arm the cut-off for the stragglers."""
        s = self.session
        assert s is not None
        trip = now - s.asked_at
        self.round_trip.sample(trip)
        self.peer_waits.answered(sender, s.id, now)
        s.slowest = max(trip, s.slowest or 0.0)
        if s.answered:
            return self._resolve(now)
        return self._straggler_timer(s)

    def _cut_off_at(self, s: Session) -> float:
        assert s.slowest is not None
        return s.asked_at + self.peer_waits.cut_off(s.slowest, s.pending)

    def _straggler_timer(self, s: Session) -> list[Action]:
        at = self._cut_off_at(s)
        return [SetTimer(at, ("straggler", s.id, s.round))] if math.isfinite(at) else []

    def _give_up(self, now: float, s: Session) -> list[Action]:
        """Resolve without the peers still pending: they missed this session, unless nobody
        answered (then the links are slow: the node-wide wait backs off instead)."""
        if s.slowest is not None:
            self.peer_waits.missed(sorted(s.pending))
        s.cut |= s.pending
        return self._resolve(now)

    def _resolve(self, now: float) -> list[Action]:
        s = self.session
        assert s is not None
        if not s.replies:
            # Nobody was free: back off for a random number of checks before trying again.
            self.session = None
            self.quiet_until = self.step + self.config.b * self.rng.randint(1, 4)
            return []
        replies = {peer: (r.params, r.samples) for peer, r in s.replies.items()}
        average, lesson = self._merge(s.sent, self.model.samples, replies, MERGED_RADIUS)
        if float((average - self.reference).square().sum()) > self._delta:
            wider = self._widen()
            if wider:
                s.asked |= set(wider)
                s.round += 1
                return self._ask(now, wider)
        steps = [self.steps_since_sync] + [r.steps for r in s.replies.values()]
        group_steps = max(1, round(sum(steps) / len(steps)))
        # The members learn theirs from the average they checked against what they sent;
        # our lesson takes the update of a model beyond its trusted radius in its sender's
        # place (``NodeCore._merge``), so the honest updates sum to zero.
        agreement = self.drift_correction.group_factor(*(r.agreement for r in s.replies.values()))
        actions: list[Action] = [
            Send(p, Average(s.id, average, group_steps, agreement)) for p in s.replies
        ]
        # Peers that never answered (timed out) are released instead of waiting for us.
        actions += [Send(p, Busy(s.id)) for p in sorted(s.asked - set(s.replies) - s.refused)]
        self.session = None
        # Stand in only where no model lay beyond its trusted radius (``lesson is average``,
        # ``NodeCore._merge``): a liar that refused must not have its lie learnt in its place.
        if self.config.stand_in and lesson is average and self.drift_correction.lam:
            members = {peer: r.params for peer, r in s.replies.items()}
            self._averaged[s.id] = (average, members, group_steps, agreement)
            while len(self._averaged) > ANSWERABLE_SESSIONS:
                self._averaged.popitem(last=False)
        return actions + self._adopt(
            average, s.sent, group_steps, lesson=lesson, agreement=agreement
        )

    def _take_over(self, session: int, member: str) -> list[Action]:
        """``member`` did not adopt the average of our ``session`` (refused it, or left the
        session before it arrived): learn its correction update in its place, so that the
        session's updates still sum to zero (``p2pfl.protocol.correction``, "What it
        preserves"). Only a session in which no model lay beyond its trusted radius is
        remembered, so what is learnt here is bounded by that radius; once per member."""
        average, members, steps, agreement = self._averaged[session]
        model = members.pop(member)
        if not members:
            del self._averaged[session]
        self.stats.taken_over += 1
        step_size = self.mean_step_size(steps)
        return self.drift_correction.update(
            model, average, steps, step_size, agreement, observe=False
        )

    def _widen(self) -> list[str]:
        """Up to as many new peers as the group has (doubling it), drawn from the members'
        neighbours, within ``cap`` and the widening round limit."""
        s = self.session
        assert s is not None
        size = 1 + len(s.replies)
        room = size if not self.config.cap else min(size, self.config.cap - size)
        if room <= 0 or s.round >= MAX_WIDENING_ROUNDS:
            return []
        known = {n for r in s.replies.values() for n in r.neighbors}
        fresh = self.peer_waits.expected(sorted(known - s.asked - {self.node_id}))
        return self.rng.sample(fresh, min(room, len(fresh)))

    # -- member ------------------------------------------------------------------------------
    def _on_pull(self, now: float, sender: str, msg: Pull) -> list[Action]:
        actions: list[Action] = []
        if self.session is not None and msg.session < self.session.id:
            actions = self._give_way()
        if self.busy:
            self.stats.refused_busy += 1
            return [Send(sender, Busy(msg.session))]
        if not self._admit_session(sender, now):
            return [Send(sender, Busy(msg.session))]
        sent = self.model.read().clone()
        self.membership = Membership(msg.session, sender, sent)
        reply = ModelReply(
            msg.session,
            sent,
            self.model.samples,
            self.live_neighbors,
            self.steps_since_sync,
            self.drift_correction.shared(),
        )
        deadline = now + self.round_trip.wait * (MAX_WIDENING_ROUNDS + 2)
        return actions + [Send(sender, reply), SetTimer(deadline, ("member", msg.session))]

    def _give_way(self) -> list[Action]:
        """Abandon our session for a competing one with a lower id (so of all competing
        coordinators, the lowest id always proceeds: no livelock when many violate at once);
        the peers we asked are released."""
        s = self.session
        assert s is not None
        self.session = None
        self.stats.gave_way += 1
        return [Send(p, Busy(s.id)) for p in sorted(s.asked - s.refused)]

    def _on_average(self, sender: str, msg: Average) -> list[Action]:
        m = self.membership or self._late_membership()
        if m is None or m.id != msg.session or m.coordinator != sender:
            self.stats.ignored += 1
            log.debug("%s: stale average from %s", self.node_id, sender)
            return []
        self.membership = self._timed_out = None
        # Never adopt a model unchecked: the average is checked around what we sent, like a
        # peer's model in our own merge (one history entry per peer: a coordinator that
        # floods us counts once; our other peers' distances keep the bound honest). One
        # beyond the coordinator's trusted radius is refused: we keep our model, reference
        # and correction, as if the coordinator had vanished (adopting even its clipped
        # remainder would count as a sync and reset our reference: a flood of such
        # sessions would keep us from ever syncing with honest peers).
        # On a lossy link the average is a delta on the coordinator's copy of our reply
        # (``EchoedAverage.base``), not on what we sent: it is checked around that copy and teaches
        # the correction from it; our reply's codec error, which no one in the group saw, is
        # dropped with it (see ``p2pfl.protocol.links``).
        seen = msg.base if isinstance(msg, EchoedAverage) else m.sent
        # An average of n models with ours among them moves at least 1/n as far as we did
        # unless it left our model out (a replay); a coordinator we know and vouch for is
        # checked at the radius it merged our reply at (``p2pfl.protocol.trust``,
        # ``MERGED_RADIUS``).
        pooled = self.config.cap or len(self.neighbors) + 1
        known = self.progress.knows(sender) and self.trust.vouched(sender)
        widen = MERGED_RADIUS if known else 1.0
        if self._clip(seen, {sender: msg.params}, widen, allowance=pooled).suspect:
            self.stats.refused_peer += 1
            log.debug("%s: refused the average of %s (beyond its radius)", self.node_id, sender)
            # With ``stand_in`` the coordinator is told (``Busy``): it learns our correction
            # update in our place.
            return self._leave(msg.session, sender)
        actions = self._adopt(
            msg.params, m.sent, msg.steps, seen=seen, lesson=msg.params, agreement=msg.agreement
        )
        if self.config.merge.clip:
            adopted = next(a.params for a in actions if isinstance(a, ReplaceModel))
            self.progress.adopted(sender, msg.params, adopted)
        return actions

    def _late_membership(self) -> Membership | None:
        """The session we timed out of, if its average may still be adopted: the group
        adopted it and counted our model in it, so taking it late keeps the network's mean
        (``_adopt`` keeps the steps taken since). Not once we synced again (our reference
        moved on) or while busy, nor with ``stand_in`` (the coordinator learnt our
        correction update in our place)."""
        if self._timed_out is None or self.busy or self.config.stand_in:
            return None
        m, syncs = self._timed_out
        return m if syncs == self.stats.syncs else None

    def _leave(self, session: int, coordinator: str) -> list[Action]:
        """We do not adopt the average of ``coordinator``'s ``session``: with ``stand_in``
        it is told (``Busy``; it leaves our model out, or learns our update in our place)."""
        return [Send(coordinator, Busy(session))] if self.config.stand_in else []

    def _adopt(
        self,
        merged: torch.Tensor,
        sent: torch.Tensor,
        steps: int,
        current: torch.Tensor | None = None,
        seen: torch.Tensor | None = None,
        *,
        lesson: torch.Tensor,
        agreement: float | None = None,
    ) -> list[Action]:
        """The shared merge (correction, outer step, kept progress); the result becomes the
        reference."""
        actions = super()._adopt(
            merged, sent, steps, current, seen, lesson=lesson, agreement=agreement
        )
        self.reference = merged if self.outer is None else self.outer.anchor  # never modified
        if self._coherent:
            self._checked = next(a.params for a in actions if isinstance(a, ReplaceModel)).clone()
            self._coherence = 0.0
        if self._noise_rate is not None:
            self._noise_rate, self._excess, self._coherence = UNCALIBRATED, 0.0, 0.0
        self._delta = self._compute_delta()
        self.steps_since_sync = 0
        return actions

    # -- events --------------------------------------------------------------------------------
    def on_message(self, now: float, sender: str, message: Message) -> list[Action]:
        if isinstance(message, Pull):
            return self._on_pull(now, sender, message)
        if isinstance(message, ModelReply):
            return self._on_reply(now, sender, message)
        if isinstance(message, Average):
            return self._on_average(sender, message)
        if isinstance(message, Busy):
            s, m = self.session, self.membership
            if s is not None and s.id == message.session and sender in s.asked:
                if sender in s.replies:  # a member that left: its model stays out
                    del s.replies[sender]
                    s.refused.add(sender)
                if sender in s.refused:
                    return []
                s.refused.add(sender)
                return self._on_answer(now, sender)
            if m is not None and m.id == message.session and m.coordinator == sender:
                self.membership = None  # released: the session went on without us
            elif sender in self._averaged.get(message.session, (None, {}))[1]:
                return self._take_over(message.session, sender)  # refused or missed it
            else:
                self.peer_waits.answered(sender, message.session, now)  # late, not silent
            return []
        return super().on_message(now, sender, message)

    def on_timer(self, now: float, key: Hashable) -> list[Action]:
        s, m = self.session, self.membership
        if s is not None and key == ("straggler", s.id, s.round) and now >= s.deadline:
            key = ("session", s.id, s.round)  # a tie is the wait's: whichever timer fires first
        if s is not None and key == ("session", s.id, s.round):
            # Reached only if the answers in hand (if any) were too slow for a cut-off before
            # it: the links are slow, the next wait doubles.
            self.stats.timeouts += 1
            self.round_trip.expired()
            return self._give_up(now, s)
        if s is not None and key == ("straggler", s.id, s.round):
            if s.answered or now < self._cut_off_at(s):
                return []  # resolved, or a later answer moved the cut-off (its own timer)
            self.stats.stragglers += len(s.pending)
            return self._give_up(now, s)
        if m is not None and key == ("member", m.id):
            self.stats.timeouts += 1
            self.membership = None
            self._timed_out = (m, self.stats.syncs)
            return self._leave(m.id, m.coordinator)  # as for a refused average
        return []

    def on_peer_down(self, now: float, peer: str) -> list[Action]:
        super().on_peer_down(now, peer)
        m = self.membership
        if m is not None and m.coordinator == peer:
            self.membership = None  # our coordinator is gone: keep our own model
        s = self.session
        if s is not None and peer in s.asked and peer not in s.replies:
            s.refused.add(peer)
            return self._resolve(now) if s.answered else []
        return []
