"""The communities of a running node: one protocol core per joined community, syncing only the
community's shared parameters, only with its admitted members.

This is the libp2p driver of each community's admission (``p2pfl.protocol.admission``: the
membership protocol in front of the community's sync core, carried out by its ``Gate``) and
of its sync core. It carries the hello and sync
frames (formats in ``p2pfl.wire.community``) through per-peer ``Outboxes``, runs the timers,
applies model actions to the learner through the community's ``SharedPart``, and starts each
community's ``Discovery`` (announcements, dials). Start-up checks are in
``community_checks.py``, the checkpoint part in ``community_checkpoint.py``.

A community's core sees its shared part through ``PartView`` and its messages travel encoded
with the community's shared sub-schema, so private parameters never leave the node.

Leaving (``reload`` after ``p2pfl community leave``) stops a community at once: its core is
dropped, frames queued or in flight are cancelled, the topic is left, its drift correction
cleared, and its members are told (a refusal "left the community").
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from p2pfl.community import CommunityError
from p2pfl.community.invite import check_membership
from p2pfl.community.manifest import Manifest
from p2pfl.community.sharing import Corrections, PartView, SharedPart, SharingError, check_disjoint
from p2pfl.community.store import Membership, load_memberships
from p2pfl.daemon import community_checkpoint
from p2pfl.daemon.community_checks import check_model, check_whole_model_protocol
from p2pfl.daemon.config import NodeConfig
from p2pfl.daemon.discovery import Discovery
from p2pfl.daemon.outbox import Outboxes
from p2pfl.daemon.transport import Transport, TransportError
from p2pfl.learning.learner import PerNodeLearner
from p2pfl.protocol.actions import Action, ReplaceModel, Send, SetCorrection, SetTimer
from p2pfl.protocol.admission import NOT_A_MEMBER, Admission, Gate, RefusalNotices, SendHello
from p2pfl.protocol.config import parse_protocol
from p2pfl.protocol.core import NodeCore, make_core
from p2pfl.spec import SpecError
from p2pfl.wire.codec import WireError, decode, encode, max_message_bytes
from p2pfl.wire.community import (
    HELLO_MAX_BYTES,
    HELLO_PROTOCOL,
    ID_BYTES,
    SYNC_PROTOCOL,
    Hello,
    split_sync_frame,
    sync_frame,
)

log = logging.getLogger("p2pfl.communities")

BYE_TIMEOUT_S = 2.0
OUTBOX_SIZE = 64


@dataclass
class Community:
    """One joined community's live state."""

    membership: Membership
    part: SharedPart
    core: NodeCore
    max_frame: int
    gate: Gate = field(init=False)
    discovery: Discovery | None = None
    sending: set[trio.CancelScope] = field(default_factory=set)
    """Scopes of this community's frames in flight (cancelled when it is left)."""
    tasks: trio.CancelScope = field(default_factory=trio.CancelScope)
    counters: dict[str, int] = field(
        default_factory=lambda: {"bytes_sent": 0, "bytes_received": 0, "rejected": 0}
    )

    @property
    def id(self) -> str:
        return self.membership.id

    @property
    def manifest(self) -> Manifest:
        return self.membership.manifest

    @property
    def admitted(self) -> dict[str, bytes | None]:
        """Members admitted on their current connection, with the credential they showed."""
        return self.gate.admission.admitted

    @property
    def label(self) -> str:
        return f"{self.manifest.name!r} ({self.id[:12]})"

    def status(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.manifest.name,
            "shared": list(self.manifest.shared),
            "protocol": self.manifest.protocol,
            "members": sorted(self.admitted),
            "step": self.core.step,
            "syncs": self.core.stats.syncs,
            **self.counters,
        }


@dataclass(frozen=True)
class _Frame:
    protocol: str
    community: str
    data: bytes
    after_leave: bool = False
    """Send even if the community is no longer active (refusal notices)."""

    def __len__(self) -> int:
        return len(self.data)


class Communities:
    """Every community of one node daemon: their cores, members, traffic and discovery.

    Build it after the learner is restored (cores take the current model as reference), resume
    the cores from the checkpoint with ``load_state_dict``, call ``start`` once the transport
    runs, feed it local steps and peer events, and ``reload`` when the memberships on disk
    change. ``state_dict`` is the communities' part of the node checkpoint.
    """

    def __init__(
        self,
        config: NodeConfig,
        peer_id: str,
        learner: PerNodeLearner,
        samples: int,
        seed: int,
        counters: dict[str, int],
    ) -> None:
        self.config = config
        self.peer_id = peer_id
        self.learner = learner
        self.samples = samples
        self.seed = seed
        self.node_counters = counters
        """The node's counters; refused frames count in its ``rejected`` too."""
        self.corrections = Corrections(learner.schema.numel)
        self.active: dict[str, Community] = {}
        self.max_sync_frame = ID_BYTES + max_message_bytes(learner.schema)
        self.notices = RefusalNotices()
        self._transport: Transport | None = None
        self._nursery: trio.Nursery | None = None
        self._outboxes = Outboxes[_Frame](
            OUTBOX_SIZE, self._send, self._send_failed, counters, log, "community outbox"
        )
        self._reload_lock = trio.Lock()
        for membership in self._checked(load_memberships(config.home)):
            self._add(membership)

    @property
    def home(self) -> Path:
        return self.config.home

    # -------------------------------------------------------------------- lifecycle

    def register(self, transport: Transport) -> None:
        """Install the hello and sync handlers on ``transport`` (before it runs peers)."""
        transport.set_handler(HELLO_PROTOCOL, self.on_hello, max_frame_bytes=HELLO_MAX_BYTES)
        transport.set_handler(SYNC_PROTOCOL, self.on_sync, max_frame_bytes=self.max_sync_frame)

    def start(self, nursery: trio.Nursery, transport: Transport) -> None:
        """Run the communities loaded at construction on ``transport``."""
        self._nursery, self._transport = nursery, transport
        self._outboxes.start(nursery)
        for community in self.active.values():
            nursery.start_soon(self._run, community)

    async def reload(self) -> list[str]:
        """Re-read the memberships: stop left communities at once, start joined ones.

        Raises CommunityError or ConfigError (nothing new starts then; leaves still apply)."""
        async with self._reload_lock:
            memberships = load_memberships(self.home)
            wanted = {m.id: m for m in memberships}
            for cid in [c for c in self.active if c not in wanted]:
                await self._stop(self.active[cid])
            joined = [m for m in memberships if m.id not in self.active]
            if joined:
                self._checked(memberships)
            for membership in joined:
                community = self._add(membership)
                if self._nursery is not None:
                    self._nursery.start_soon(self._run, community)
                log.info("joined community %s", community.label)
            return sorted(self.active)

    def _checked(self, memberships: list[Membership]) -> list[Membership]:
        """Check the memberships against the node's model, protocol and each other."""
        check_whole_model_protocol(self.config, memberships)
        parts = []
        for membership in memberships:
            part = check_model(self.learner.schema, membership, self.config.model)
            parts.append((f"community {membership.manifest.name!r}", part))
            try:
                check_membership(membership, self.peer_id, int(time.time()))
            except CommunityError as exc:
                log.warning("members will refuse this node: %s", exc)
        try:
            check_disjoint(parts)
        except SharingError as exc:
            raise CommunityError(str(exc)) from None
        return memberships

    def _add(self, membership: Membership) -> Community:
        part = check_model(self.learner.schema, membership, self.config.model)
        core = self.new_core(membership, part)
        community = Community(membership, part, core, max_message_bytes(part.schema))
        admission = Admission(membership.manifest, self.peer_id, membership.invite, self.notices)
        community.gate = Gate(admission, _CoreEvents(self, community), _GateDriver(self, community))
        self.active[community.id] = community
        return community

    def new_core(self, membership: Membership, part: SharedPart) -> NodeCore:
        """A fresh core for the community: its policy on ``part``, the current model as
        reference."""
        try:
            protocol = parse_protocol(membership.manifest.protocol)
        except SpecError as exc:
            raise CommunityError(
                f"community {membership.manifest.name!r}: protocol {exc}; ask the founder to "
                "fix the manifest"
            ) from None
        digest = hashlib.sha256(f"{self.seed}:{membership.id}".encode()).digest()
        return make_core(
            self.peer_id,
            protocol,
            PartView(lambda: self.learner.get(0), part, self.samples),
            [],
            seed=int.from_bytes(digest[:8], "big") & (2**63 - 1),
            step_size=self.config.lr,
        )

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, dict[str, Any]]:
        """What a restart needs of each community, by community id (see
        ``community_checkpoint``)."""
        return {cid: community_checkpoint.state_of(c) for cid, c in self.active.items()}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Resume the communities this node is still in from ``saved`` (``state_dict`` of the
        previous run), then give the learner the combined drift correction of their cores."""
        community_checkpoint.restore(self, saved)

    async def _stop(self, community: Community) -> None:
        """Leave: no frame of this community is sent or accepted once this returns."""
        del self.active[community.id]
        community.tasks.cancel()
        for scope in community.sending:
            scope.cancel()
        self.learner.set_correction(0, self.corrections.clear(community.part))
        byes: list[SendHello] = []
        community.gate.driver = _Byes(byes)
        community.gate.leave(_now())
        if self._transport is not None:
            with trio.move_on_after(BYE_TIMEOUT_S, shield=True):
                if community.discovery is not None:
                    await community.discovery.unsubscribe()
                async with trio.open_nursery() as nursery:
                    for bye in byes:
                        nursery.start_soon(self._send_quietly, bye.to, bye.hello)
        log.info("left community %s: its sync stopped", community.label)

    async def _send_quietly(self, peer: str, hello: Hello) -> None:
        assert self._transport is not None
        try:
            await self._transport.send(peer, HELLO_PROTOCOL, hello.to_bytes())
        except TransportError as exc:
            log.debug("could not tell peer %s: %s", peer, exc)

    async def _run(self, community: Community) -> None:
        """Discover members until the community is left."""
        assert self._transport is not None
        community.discovery = Discovery(
            community.membership,
            self.peer_id,
            self._transport,
            self.config.target_degree,
            lambda peer: self._greet(community, peer),
            lambda: community.admitted,
        )
        with community.tasks:
            await community.discovery.run()

    def _greet(self, community: Community, peer: str) -> None:
        if self.active.get(community.id) is community:
            community.gate.greet(_now(), peer)

    # ------------------------------------------------------------------------ frames

    async def on_hello(self, peer: str, payload: bytes) -> None:
        """Hello handler: the community's admission decides."""
        try:
            hello = Hello.from_bytes(payload)
        except WireError as exc:
            self.node_counters["rejected"] += 1
            log.warning("refused hello from peer %s: %s", peer, exc)
            return
        community = self.active.get(hello.community)
        if community is None:
            if hello.refused is None:
                self.node_counters["rejected"] += 1
                log.warning(
                    "refused hello from peer %s for community %s: %s",
                    peer,
                    hello.community,
                    NOT_A_MEMBER,
                )
                self._notify(self.notices.notice(_now(), peer, hello.community, NOT_A_MEMBER))
            return
        if hello.refused is not None and community.discovery is not None:
            community.discovery.forget(peer)
        community.gate.hello(_now(), peer, hello)

    async def on_sync(self, peer: str, payload: bytes) -> None:
        """Sync handler: decode with the community's schema if the peer is admitted to it."""
        cid, message_bytes = split_sync_frame(payload)
        community = self.active.get(cid) if message_bytes else None
        if community is None:
            self.node_counters["rejected"] += 1
            log.warning(
                "refused sync frame from peer %s: this node is not a member of community %s",
                peer,
                cid or "(none)",
            )
            if len(cid) == 2 * ID_BYTES:
                self._notify(self.notices.notice(_now(), peer, cid, NOT_A_MEMBER))
            return
        if not community.gate.frame(_now(), peer):
            return
        try:
            message = decode(message_bytes, community.part.schema, community.max_frame)
        except WireError as exc:
            log.warning(
                "refused sync frame from peer %s in community %s: %s", peer, community.label, exc
            )
            self._count_refusal(community)
            return
        community.counters["bytes_received"] += 4 + len(payload)
        self._perform(community, community.core.on_message(_now(), peer, message))

    def _notify(self, notices: list[SendHello]) -> None:
        for notice in notices:
            frame = _Frame(HELLO_PROTOCOL, notice.hello.community, notice.hello.to_bytes(), True)
            self._outboxes.put(notice.to, frame)

    # ------------------------------------------------------------------------ actions

    def on_local_step(self, now: float) -> None:
        """The learner took a step: every community core takes it too."""
        for community in list(self.active.values()):
            self._perform(community, community.core.on_local_step(_now()))

    def _count_refusal(self, community: Community) -> None:
        community.counters["rejected"] += 1
        self.node_counters["rejected"] += 1

    def _put_hello(self, community: Community, to: str, hello: Hello) -> None:
        notice = hello.refused is not None  # sent even if we leave meanwhile
        self._outboxes.put(to, _Frame(HELLO_PROTOCOL, community.id, hello.to_bytes(), notice))

    def _perform(self, community: Community, actions: list[Action]) -> None:
        not_admitted: list[str] = []
        for action in actions:
            if self.active.get(community.id) is not community:
                return
            if isinstance(action, Send):
                if not community.gate.admits(action.to):  # e.g. named by a member for widening
                    log.debug("community %s: %s is not admitted", community.label, action.to)
                    not_admitted.append(action.to)
                    continue
                data = sync_frame(community.id, encode(action.message, community.part.schema))
                self._outboxes.put(action.to, _Frame(SYNC_PROTOCOL, community.id, data))
            elif isinstance(action, ReplaceModel):
                self.learner.set(0, community.part.put(self.learner.get(0), action.params))
            elif isinstance(action, SetCorrection):
                full = self.corrections.set(community.part, action.vector)
                self.learner.set_correction(0, full)
            elif isinstance(action, SetTimer):
                assert self._nursery is not None
                self._nursery.start_soon(self._timer, community, action.at, action.key)
        for peer in not_admitted:
            if peer not in community.core.down:
                self._perform(community, community.core.on_peer_down(_now(), peer))

    async def _timer(self, community: Community, at: float, key: Hashable) -> None:
        await trio.sleep_until(at - _now() + trio.current_time())
        if self.active.get(community.id) is community:
            self._perform(community, community.core.on_timer(_now(), key))

    async def _send(self, peer: str, frame: _Frame) -> None:
        """Send one queued frame unless its community was left meanwhile; leaving cancels it
        in flight."""
        assert self._transport is not None
        community = self.active.get(frame.community)
        if community is None and not frame.after_leave:
            return  # left while the frame waited
        with trio.CancelScope() as scope:
            if community is not None:
                community.sending.add(scope)
            try:
                await self._transport.send(peer, frame.protocol, frame.data)
            finally:
                if community is not None:
                    community.sending.discard(scope)
            if community is not None and frame.protocol == SYNC_PROTOCOL:
                community.counters["bytes_sent"] += 4 + len(frame.data)

    def _send_failed(self, peer: str, frame: _Frame, exc: TransportError) -> None:
        log.warning("%s; dropping peer %s from community %s", exc, peer, frame.community)
        community = self.active.get(frame.community)
        if community is not None:
            community.gate.disconnected(_now(), peer)

    # ---------------------------------------------------------------------- peer events

    def peer_up(self, peer: str) -> None:
        """A connection opened: greet it in the communities where it is a known member."""
        if self._nursery is None:
            return  # not started yet: the discovery loops greet it
        for community in list(self.active.values()):
            if community.discovery is not None and community.discovery.knows(peer):
                self._greet(community, peer)

    def peer_down(self, peer: str) -> None:
        """The last connection closed: admissions end with it."""
        self._outboxes.close(peer)
        for community in list(self.active.values()):
            community.gate.disconnected(_now(), peer)

    def status(self) -> list[dict[str, Any]]:
        """One entry per community, for ``p2pfl node status``."""
        return [c.status() for c in sorted(self.active.values(), key=lambda c: c.manifest.name)]


class _CoreEvents:
    """Tells a community's core who its gate admitted or dropped."""

    def __init__(self, communities: Communities, community: Community) -> None:
        self.communities, self.community = communities, community

    def peer_up(self, now: float, peer: str) -> None:
        self.communities._perform(self.community, self.community.core.on_peer_up(now, peer))

    def peer_down(self, now: float, peer: str) -> None:
        self.communities._perform(self.community, self.community.core.on_peer_down(now, peer))


class _GateDriver:
    """Sends a community's hellos through the outboxes and counts its refusals."""

    def __init__(self, communities: Communities, community: Community) -> None:
        self.communities, self.community = communities, community

    def send_hello(self, now: float, to: str, hello: Hello) -> None:
        self.communities._put_hello(self.community, to, hello)

    def refused(self, now: float, peer: str, reason: str) -> None:
        self.communities._count_refusal(self.community)


@dataclass
class _Byes:
    """Collects the hellos of a community being left (sent at once, not queued)."""

    hellos: list[SendHello]

    def send_hello(self, now: float, to: str, hello: Hello) -> None:
        self.hellos.append(SendHello(to, hello))

    def refused(self, now: float, peer: str, reason: str) -> None:
        pass


def _now() -> float:
    """The admission clock: unix seconds (invites expire on it)."""
    return time.time()
