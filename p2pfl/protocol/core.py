"""The node core shared by every protocol: identity, neighbours, step counter, counters, the
event entry points a driver calls, and the mechanisms every merge goes through (``_adopt``:
drift correction, outer optimizer, keeping local progress). Policies subclass it (see
``make_core``) and decide only when to talk and with whom.

Every entry point, in every policy, passes through the node's codec links
(``p2pfl.protocol.links``): compressed parameters a peer sent are decoded before the policy
sees them (a payload that does not fit is refused with a reason; a refused reply or average
reaches the policy as ``Busy``, the peer's share is simply missing), and with a ``codec``
the parameters of every ``Send`` the policy returns are compressed for its peer. Policies
only ever handle dense vectors."""

from __future__ import annotations

import functools
import logging
import math
import random
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar, Protocol

import torch

from p2pfl.learning.compression import Compressed
from p2pfl.learning.merge import clip_around, distances_to, merge
from p2pfl.protocol.actions import Action, ReplaceModel, Send, SetCorrection
from p2pfl.protocol.config import ProtocolConfig
from p2pfl.protocol.correction import DriftCorrection
from p2pfl.protocol.links import CodecLinks, LinkError
from p2pfl.protocol.outer import OuterOptimizer
from p2pfl.protocol.round_trip import PeerWaits, RoundTrip
from p2pfl.protocol.trust import PeerProgress, PeerTrust
from p2pfl.wire.messages import Average, Busy, Message, ModelReply

log = logging.getLogger("p2pfl.protocol")

DISTANCE_HISTORY = 32
"""Peers whose latest distance is remembered for the clip bound (the most recent ones)."""
MAJORITY_PEERS = 2
"""Peers the distance history needs before its (lower) median counts: with one, that peer
alone would set it (a node with one peer trusts only its own displacement and the protocol);
with two, one liar cannot raise the lower of the two."""
VERDICT_RADIUS = 2.0
"""Where the protocol gives no floor on an honest peer's distance (the fixed schedules:
periodic, continuous, gossip), how many times τ a model may lie from ours before its sender's
trust is lowered, for a peer not vouched for (its first model, or one judged lately); between
τ and there it is only clipped. A sign-flipped model lies 8-18 times ``max(s, m)`` from its
receiver in the first rounds of periodic b=10 (Dirichlet 0.5), before it has dragged its
neighbours toward zero: judged at 4τ (12 times) it was not judged in time and the honest
nodes fell to 0.174. Honest models lay within 3.2 (periodic b=10), 6.0 (continuous) and
11.1 (gossip) times ``max(s, m)`` (3,000 steps, Dirichlet 0.5; τ is 3 times that)."""
VOUCHED_VERDICT_RADIUS = 5.0
"""The verdict radius (in τ) for a peer vouched for (``PeerTrust.vouched``: every model
within its verdict lately): honest peers that drift far apart late in training under label
skew (gossip's slow mixing) keep their trust, while a liar, judged at its first model, stays
at ``VERDICT_RADIUS``. Judged at 2τ when vouched for too, 170 honest gossip models were
judged over 3,000 steps of Dirichlet 0.1 and the honest network fell from 0.929 to 0.842
(none at 5τ: 0.929)."""
PEER_SPEED_ALLOWANCE = 2.0
"""How much faster than this node a peer's machine may be before its sessions are refused."""


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
    stragglers: int = 0
    """Answers a request was resolved without, cut off as stragglers (``PeerWaits``)."""
    ignored: int = 0
    unmatched: int = 0
    """Pushes of a round that could not be matched, kept as their sender's fallback
    (``PeriodicCore``)."""
    refused_codec: int = 0
    clipped: int = 0
    refused_peer: int = 0
    distrusted: int = 0
    """Models that lay beyond their sender's verdict radius (its trust lowered)."""
    taken_over: int = 0
    """Correction updates a coordinator learnt for a member that did not adopt its average
    (``dynamic``)."""
    unconfirmed: int = 0
    """Gossip exchanges this node merged as receiver whose initiator never confirmed merging
    the reply (``Confirm``): their correction updates were not learnt (``GossipCore``)."""

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


RowReader = Callable[[torch.Tensor], torch.Tensor]
"""``read(rows)``: the current parameters ``[k, params]`` of the stacked cores at ``rows``."""


@dataclass
class EchoedAverage(Average):
    """An ``Average`` decoded from an echo on a lossy link (never on the wire): ``base`` is
    our reply as its sender decoded it (``CodecLinks.echo_base``), what the group saw of our
    model and what the average is a delta on."""

    base: torch.Tensor = field(kw_only=True)


_ENTRY_POINTS = (
    "on_local_step",
    "on_message",
    "on_timer",
    "on_peer_down",
    "on_peer_up",
    "on_heard",
    "on_send_failed",
)


def _through_links(method: Any) -> Any:
    """Wrap an entry point: decode compressed parameters before it, reset a peer's link when
    it goes down or comes back, compress the parameters it sends (idempotent, so an
    override calling ``super()`` is fine). One wrapper per kind of entry point: a message
    whose parameters are not compressed costs a type check, nothing more."""
    name = method.__name__

    def sent(self: NodeCore, actions: list[Action]) -> list[Action]:
        if self.config.codec is None or not actions:
            return actions
        return [self._compressed(a) if isinstance(a, Send) else a for a in actions]

    if name == "on_message":

        @functools.wraps(method)
        def entry(self: NodeCore, now: float, sender: str, message: Message) -> list[Action]:
            if isinstance(getattr(message, "params", None), Compressed):
                decoded = self._decoded(sender, message)
                if decoded is None:
                    return []
                message = decoded
            actions = method(self, now, sender, message)
            return actions if self.config.codec is None else sent(self, actions)

    elif name in ("on_peer_down", "on_peer_up"):

        @functools.wraps(method)
        def entry(self: NodeCore, now: float, peer: str) -> list[Action]:
            self.links.reset(peer)
            return sent(self, method(self, now, peer))

    else:

        @functools.wraps(method)
        def entry(self: NodeCore, now: float, *args: Any) -> list[Action]:
            actions = method(self, now, *args)
            return actions if self.config.codec is None else sent(self, actions)

    return entry


@dataclass(frozen=True)
class Clipped:
    """Peers' models clipped around ours (``NodeCore._clip``), with the verdict."""

    models: list[torch.Tensor]
    suspect: bool
    """A model had to be clipped (a dynamic member then refuses the average)."""
    lesson: list[torch.Tensor]
    """The peers' models the drift correction learns from (``NodeCore._adopt``): ``models``
    itself when none lay beyond its sender's radius. The correction is an integrator, and a
    lie that pulls every node alike (each a little, within its clip radius) would be learned
    by all of them and never unlearned, since their later merges agree with one another. So a
    model beyond its sender's trusted radius (dynamic, whose √Δ bounds honest peers) or
    judging radius (the fixed schedules) stands at our own model in the lesson. Every merge
    still teaches: skipping its update broke the corrections' zero sum (continuous on the demo
    fell from 0.969 to 0.575; a dynamic coordinator whose members learn theirs: 3 noise liars
    of 16 cost 12.5 points at 1,000 steps instead of 5.1). A model clipped only for its lack of
    progress (``PeerProgress``) counts as our own model in the merge: no poison in it.
    Where a session's members learn from its merge itself (dynamic, see ``NodeCore._merge``)
    the coordinator's lesson is not this list's merge but takes the liars' updates."""
    beyond: list[bool] = field(default_factory=list)
    """Per model: it lay beyond its sender's trusted (dynamic) or verdict radius."""


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
    attributes: the driver may point them at rows of a stacked tensor)."""
    step_state: ClassVar[tuple[str, ...]] = ()
    """Number fields of ``step_fields`` that a local step changes (besides the counters)
    whether or not the node then acts: ``which_act`` updates them (and tensor fields) for
    the cores that do not act."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in _ENTRY_POINTS:
            if name in vars(cls):
                setattr(cls, name, _through_links(vars(cls)[name]))

    def __init__(
        self,
        node_id: str,
        config: ProtocolConfig,
        model: ModelAccess,
        neighbors: Iterable[str],
        seed: int = 0,
        step_size: float = 0.1,
        max_neighbors: int = 0,
    ) -> None:
        """``neighbors`` are the node's chosen neighbours; a peer that comes up later becomes
        one only while there are fewer than ``max_neighbors`` (0: never)."""
        self.node_id = node_id
        self.config = config
        self.model = model
        self.neighbors: set[str] = set(neighbors) - {node_id}
        self.down: set[str] = set()
        self.rng = random.Random(seed)
        self.step_size = step_size
        self.mean_step_size: Callable[[int], float] = lambda steps: self.step_size
        """The mean step size over the latest ``steps`` local steps (a driver under a
        learning-rate schedule hands in the exact one); the drift correction divides by it."""
        self.max_neighbors = max_neighbors
        self.step = 0
        self.stats = CoreStats()
        self.links = CodecLinks(config.codec)
        self.round_trip = RoundTrip(config.timeout)
        """How long to wait for peers' answers (learnt from their round trips)."""
        self.peer_waits = PeerWaits()
        """Each peer's own round trip and missed answers (who to wait for, how long)."""
        self.anchor = model.read().clone()
        """The model right after the last merge: our displacement since then sizes the clip
        bound."""
        self._last_session: dict[str, float] = {}
        self._peer_distances: OrderedDict[str, float] = OrderedDict()
        self._distance_trend: OrderedDict[str, float] = OrderedDict()
        """Each peer's distance lately (see ``_closing_in``)."""
        self.trust = PeerTrust()
        """How much of τ each peer's model may use (lowered for peers clipped again and
        again)."""
        self.progress = PeerProgress(DISTANCE_HISTORY, model.read())
        """How much of its radius each peer's progress earns it (a stale model: none)."""
        self._first_step_at: float | None = None
        self._last_step_at = 0.0
        self.drift_correction = DriftCorrection(
            config.correction,
            config.agreement,
            config.floor,
            config.against,
            config.boost,
            config.pace,
        )
        self.outer = None if config.outer is None else OuterOptimizer(*config.outer, model.read())

    @property
    def correction(self) -> torch.Tensor | None:
        """The node's current gradient correction (None until its first update)."""
        return self.drift_correction.vector

    @correction.setter
    def correction(self, vector: torch.Tensor | None) -> None:
        self.drift_correction.vector = vector

    @property
    def live_neighbors(self) -> list[str]:
        """Neighbours not known to be down, in a stable order."""
        return sorted(self.neighbors - self.down)

    def on_local_step(self, now: float) -> list[Action]:
        """The learner finished one local step."""
        self.step += 1
        if self._first_step_at is None:
            self._first_step_at = now
        self._last_step_at = now
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
        ``[len(rows)]`` bool mask, equal to calling each core (tests check it). For the
        cores that do not act it also makes the rest of their step's change to ``state``
        (``step_state``, tensor fields); those that act are called and make it themselves."""
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
        """A peer is reachable (again). An unknown peer becomes a neighbour only while the
        node has fewer than ``max_neighbors``: connecting does not make a peer a neighbour."""
        self.down.discard(peer)
        if peer != self.node_id and len(self.neighbors) < self.max_neighbors:
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
        state = {"step": self.step, "stats": self.stats.as_dict()}
        state |= self.drift_correction.state_dict()
        return state | ({} if self.outer is None else self.outer.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
        self.step = int(state["step"])
        self.stats = CoreStats(**{k: int(v) for k, v in state["stats"].items()})
        self.drift_correction.load_state_dict(state)
        if self.outer is not None:
            self.outer.load_state_dict(state)

    def restore(self, state: dict[str, Any]) -> list[Action]:
        """Load ``state`` (``load_state_dict``) and return the actions that re-apply what the
        core keeps in the learner (e.g. ``SetCorrection``): drivers never read core fields."""
        self.load_state_dict(state)
        return self._learner_state()

    def _learner_state(self) -> list[Action]:
        """Actions that put the core's learner-side state (the drift correction) back."""
        vector = self.drift_correction.vector
        return [] if vector is None else [SetCorrection(vector.clone())]

    def _after_step(self, now: float) -> list[Action]:
        return []

    def _decoded(self, sender: str, message: Message) -> Message | None:
        """``message`` with its compressed parameters decoded on ``sender``'s link; a payload
        that does not fit is refused (logged, counted): a reply or an average becomes
        ``Busy`` (the peer's share is missing), anything else None. An average echoed on a
        lossy link becomes an ``EchoedAverage``."""
        params = getattr(message, "params", None)
        if not isinstance(params, Compressed):
            return message
        try:
            vector = self.links.decode(sender, params)
        except LinkError as exc:
            self.stats.refused_codec += 1
            log.warning(
                "%s: refused %s from %s: %s", self.node_id, type(message).__name__, sender, exc
            )
            if isinstance(message, ModelReply | Average):
                return Busy(message.session)
            return None
        if params.echo and isinstance(message, Average):
            base = self.links.echo_base(sender, params)
            return EchoedAverage(
                message.session, vector, message.steps, message.agreement, base=base
            )
        return replace(message, params=vector)  # type: ignore[type-var]

    def _compressed(self, send: Send) -> Send:
        """``send`` with its parameters compressed for its peer (averages as echoes)."""
        params = getattr(send.message, "params", None)
        if params is None or isinstance(params, Compressed):
            return send
        echo = isinstance(send.message, Average)
        coded = self.links.encode(send.to, params, echo, self._codec_tolerance())
        return Send(send.to, replace(send.message, params=coded))  # type: ignore[type-var]

    def _codec_tolerance(self) -> float | None:
        """The largest codec error a message may carry before it travels in the key codec
        (``CodecConfig.tol``; None: no limit): only ``dynamic`` has a scale for it."""
        return None

    # -- what a peer may do to this node -------------------------------------------------
    def clip_bound(self, own: torch.Tensor, displacement: float | None = None) -> float:
        """τ: the farthest an incoming model may sit from ``own`` before it is clipped.

        ``κ·max(s, floor, m)``: ``κ`` the spec's ``clip`` (see ``CLIP_FACTOR``); ``s`` this
        node's own displacement since its last merge (``||own - anchor||``, about
        b·η·|gradient| on a fixed schedule); ``floor`` what the protocol lets an honest peer
        move anyway (``_clip_floor``, √Δ for dynamic); ``m`` the lower median, once there
        are ``MAJORITY_PEERS``, of the latest distances of the peers that earned full trust
        (judged within τ, not clipped since: ``PeerTrust.vouched``) among the last
        ``DISTANCE_HISTORY`` peers heard. ``m`` covers honest distances the protocol does
        not bound (gossip's slow mixing, a node that joined late, references of dynamic
        nodes that drifted apart); a peer counts once however often it sends, and a liar
        has to be within τ, and stay there, before its distance counts: liars that are most
        of a node's peers cannot inflate τ. Where the protocol gives no floor (gossip,
        periodic) ``m`` counts every peer: trust is judged there only far beyond τ
        (``VERDICT_RADIUS``), and a median of the vouched peers shrank as honest peers were
        judged, judging more. Infinite when clipping is off. ``displacement``:
        ``||own - anchor||`` if the caller measured it already."""
        if not self.config.merge.clip:
            return math.inf
        s = displacement
        if s is None:
            s = float(torch.linalg.vector_norm(own - self.anchor))
        distances = self._peer_distances
        # Trust is judged at τ where honest distances are bounded (``_judge``): vouched only.
        bounded = self._bounded()
        seen = sorted(self.trust.vouched_values(distances) if bounded else distances.values())
        m = seen[(len(seen) - 1) // 2] if len(seen) >= MAJORITY_PEERS else 0.0
        return self.config.merge.clip * max(s, self._clip_floor(), m)

    def _clip_floor(self) -> float:
        return 0.0

    def _bounded(self) -> bool:
        """Whether the protocol bounds how far an honest peer's model may be (dynamic's √Δ):
        then trust is judged at τ and a session's members learn from its average."""
        return self._clip_floor() > 0

    def _admit_session(self, peer: str, now: float) -> bool:
        """At most one session (a pull answered, a pushed model merged at once) per peer
        every ``b`` local steps of a peer up to ``PEER_SPEED_ALLOWANCE`` times faster than us
        (timed by our own mean step time): an honest peer checks once per b of its steps, so
        one asking more often is refused and counted instead of steering us. A refused honest
        peer only retries later."""
        last = self._last_session.get(peer)
        gap = self.config.b * self._step_seconds() / PEER_SPEED_ALLOWANCE
        if last is not None and now - last < gap:
            self.stats.refused_peer += 1
            return False
        self._last_session[peer] = now
        return True

    def _step_seconds(self) -> float:
        """Mean time of our local steps so far (0 before the second step)."""
        if self._first_step_at is None or self.step < 2:
            return 0.0
        return (self._last_step_at - self._first_step_at) / (self.step - 1)

    def _clip(
        self,
        own: torch.Tensor,
        others: dict[str, torch.Tensor],
        widen: float = 1.0,
        allowance: float = 1.0,
    ) -> Clipped:
        """The models of ``others`` (by sender) clipped around ``own``, each to its sender's
        trusted share of ``widen``·τ times the share its progress earns
        (``p2pfl.protocol.trust``; a model beyond its verdict radius, ``_judge``, lowers its
        sender's trust first, a stale one earns no radius), with the verdict (see
        ``Clipped``); their distances update the per-peer history that sizes τ."""
        # Every distance the verdict needs, in one tensor operation (bit for bit each pair
        # measured alone): each peer's from us, and with clipping on, our displacement (τ)
        # and each peer's progress and ours since its baseline (``PeerProgress``).
        peers, models = list(others), list(others.values())
        clipping = bool(self.config.merge.clip)
        lasts = self.progress.baselines(peers) if clipping else []
        references = [self.progress.references(last) for last in lasts]
        k = len(peers)
        measured = distances_to(
            [*models, *models[: len(lasts)], *[own] * len(lasts), *[own][: int(clipping)]],
            [
                *[own] * k,
                *(r[0] for r in references),
                *(r[1] for r in references),
                *[self.anchor][: int(clipping)],
            ],
        )
        distances = dict(zip(peers, measured[:k], strict=True))
        closing_in = {sender: self._closing_in(sender, d) for sender, d in distances.items()}
        for sender, distance in distances.items():
            self._peer_distances.pop(sender, None)
            self._peer_distances[sender] = distance
            while len(self._peer_distances) > DISTANCE_HISTORY:
                self._peer_distances.popitem(last=False)
        if not clipping:
            return Clipped(models, suspect=False, lesson=models)
        bound = self.clip_bound(own, displacement=measured[-1]) * widen
        bounded = self._bounded()
        verdicts = {sender: bound * self._verdict(sender, bounded) for sender in distances}
        trusted = [bound * t for t in self._judge(distances, closing_in, verdicts, bounded)]
        theirs, ours = measured[k : 2 * k], measured[2 * k : 3 * k]
        shares = self.progress.record(peers, models, own, lasts, theirs, ours, allowance)
        radii = [r * share for r, share in zip(trusted, shares, strict=True)]
        clipped, count = clip_around(own, models, radii, measured[:k])
        self.stats.clipped += count
        # Only a model beyond its trusted radius (dynamic) or its verdict radius (the fixed
        # schedules) is poison the correction must not learn: it stands at our own model in
        # the lesson; a stale one clipped for its lack of progress counts as our own model in
        # the merge.
        limits = trusted if bounded else [verdicts[sender] for sender in distances]
        beyond = [d > r for d, r in zip(distances.values(), limits, strict=True)]
        lesson = (
            [own if far else model for far, model in zip(beyond, clipped, strict=True)]
            if any(beyond)
            else clipped
        )
        return Clipped(clipped, suspect=count > 0, lesson=lesson, beyond=beyond)

    def _verdict(self, sender: str, bounded: bool) -> float:
        """How many times τ ``sender``'s model may lie from ours before its trust is lowered:
        1 where the protocol bounds an honest peer's distance (``bounded``), else
        ``VERDICT_RADIUS``, or ``VOUCHED_VERDICT_RADIUS`` for a peer vouched for."""
        if bounded:
            return 1.0
        return VOUCHED_VERDICT_RADIUS if self.trust.vouched(sender) else VERDICT_RADIUS

    def _judge(
        self,
        distances: dict[str, float],
        closing_in: dict[str, bool],
        verdicts: dict[str, float],
        bounded: bool,
    ) -> list[float]:
        """Each sender's trust after its model at ``distances[sender]``: lowered beyond
        ``verdicts[sender]``, raised within it. Where the protocol bounds an honest peer's
        distance (``bounded``: √Δ for dynamic), until some peer is vouched for, a peer beyond
        its verdict is judged only if it is not closing in (``_closing_in``): two honest
        nodes that started from different models merge toward each other, so their distance
        shrinks until they are within τ; a liar that is a node's only peer keeps its
        distance (or widens it), and was never judged before (nobody vouched). On a fixed
        schedule every model is judged."""
        vouched = not bounded or any(map(self.trust.vouched, self._peer_distances))
        trust = []
        for sender, distance in distances.items():
            within = distance <= verdicts[sender]
            if vouched or within or not closing_in[sender]:
                self.stats.distrusted += not within
                trust.append(self.trust.judge(sender, within))
            else:
                trust.append(self.trust[sender])
        return trust

    def _closing_in(self, sender: str, distance: float) -> bool:
        """Whether ``sender``'s model, at ``distance`` from ours, is closer than its models
        were lately (their running mean, halved each model, over the last
        ``DISTANCE_HISTORY`` peers heard): true for a peer's first model, and for one that
        merges its way toward us, through the noise of both sides' local steps."""
        lately = self._distance_trend.pop(sender, None)
        self._distance_trend[sender] = distance if lately is None else (lately + distance) / 2
        while len(self._distance_trend) > DISTANCE_HISTORY:
            self._distance_trend.popitem(last=False)
        return lately is None or distance < lately

    def _merge(
        self,
        own: torch.Tensor,
        own_samples: int,
        others: dict[str, tuple[torch.Tensor, int]],
        widen: float = 1.0,
        copies: Mapping[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Merge our own model with the peers' ones (by sender), each clipped first (to
        ``widen`` times its radius, see ``_clip``); returns the merged model and the merge the
        drift correction learns from (``Clipped.lesson``: the merged model itself, the same
        tensor, when no model lay beyond its sender's radius).

        ``copies``: what each peer holds of ``own`` (``copy_for``), when we sent it to them
        over a lossy link. The merge then mixes what the group holds, our copy (their mean)
        among the peers' decoded ones, and keeps what our messages left out so far:
        ``own + γ·(merge(copy, peers) - copy)``, ``γ`` the codec's ``consensus_step`` (1:
        ``merge(copy, peers) + (own - copy)``). Mixing our exact model with peers' lossy ones
        would pull it toward what their codecs have not delivered yet (a 1 % ``topk`` copy
        lags by most of what its sender moved) and teach the drift correction that lag;
        this way the merge moves each model by differences of copies, as Choco-SGD does, so
        a uniform merge between copies keeps the models' sum, and the correction
        (``own - merged = γ·(copy - merge(copy, peers))``) learns from what the group saw."""
        base = own
        lossy = copies if self.config.codec is not None else None
        held = [lossy[peer] for peer in others if lossy is not None and peer in lossy]
        if held:
            base = torch.stack(held).mean(0) if len(held) > 1 else held[0]
        clipped = self._clip(base, {peer: params for peer, (params, _) in others.items()}, widen)
        samples = [own_samples] + [n for _, n in others.values()]
        mean = merge([base, *clipped.models], samples, self.config.merge)
        merged = self._mixed(own, base, mean)
        if clipped.lesson is clipped.models:
            return merged, merged
        if self._bounded():
            # A dynamic session's members each learn ``sent - average`` from the average
            # itself, and the liar's update is lost: the coordinator learns the liars'
            # (clipped) updates in their place, so the honest ones sum to zero.
            lesson = mean.clone()
            for model, far in zip(clipped.models, clipped.beyond, strict=True):
                if far:
                    lesson -= model - mean
        else:
            lesson = merge([base, *clipped.lesson], samples, self.config.merge)
        return merged, self._mixed(own, base, lesson)

    def _mixed(self, own: torch.Tensor, base: torch.Tensor, merged: torch.Tensor) -> torch.Tensor:
        """``merged`` (a merge around ``base``, our copy as the group holds it) moved onto
        ``own``: itself where ``base`` is ``own``, else ``own + γ·(merged - base)``."""
        if base is own:
            return merged
        assert self.config.codec is not None
        return own + self.config.codec.consensus_step * (merged - base)

    def copy_for(self, peer: str, x: torch.Tensor) -> torch.Tensor:
        """What ``peer`` will hold of ``x`` once we send it (``CodecLinks.copy_of``): ``x``
        itself on an exact link."""
        return x if self.config.codec is None else self.links.copy_of(peer, x)

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
        learn: bool = True,
    ) -> list[Action]:
        """Take the result of a merge: learn the drift correction from ``sent`` (the model
        this node contributed; ``seen``, the merge's copy of it, when a lossy link gave the
        merge another one) and ``lesson`` (the merge as the correction may learn it, see
        ``Clipped.lesson``) over ``steps`` shared local steps (with the group's
        ``agreement`` factor, ``DriftCorrection.group_factor``), apply the outer
        optimizer, and replace the model keeping the local steps taken since ``sent`` was
        handed out: ``w = new + (w_now - sent)``, so no local work is lost while a merge is in
        flight (``current`` stands for ``w_now`` when an earlier replacement is not applied
        yet). The ``ReplaceModel`` comes first; returns the actions. ``learn`` false: the
        caller learns the correction later, if at all (a gossip receiver, once the initiator
        confirms the exchange)."""
        actions: list[Action] = []
        new = merged if self.outer is None else self.outer.step(merged)
        now = self.model.read() if current is None else current
        self.anchor = new  # merge results are fresh tensors no one modifies in place
        actions.append(ReplaceModel(new + (now - sent)))
        if steps > 0 and learn:
            step_size = self.mean_step_size(steps)
            contributed = sent if seen is None else seen
            actions += self.drift_correction.update(
                contributed, lesson, steps, step_size, agreement
            )
        self.stats.syncs += 1
        return actions


for _name in _ENTRY_POINTS:
    setattr(NodeCore, _name, _through_links(getattr(NodeCore, _name)))


def make_core(
    node_id: str,
    config: ProtocolConfig,
    model: ModelAccess,
    neighbors: Iterable[str],
    seed: int = 0,
    step_size: float = 0.1,
    max_neighbors: int = 0,
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
    return cls(
        node_id,
        config,
        model,
        neighbors,
        seed=seed,
        step_size=step_size,
        max_neighbors=max_neighbors,
    )
