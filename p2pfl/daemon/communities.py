"""The communities of a running node: one protocol core per joined community, syncing only the
community's shared parameters, only with its admitted members.

Each community is a channel of the node's ``SyncChannels`` (``sync.py``: the same handler,
outbox path and counters as the whole-model sync) whose peers are decided by its admission:
``p2pfl.protocol.admission`` (the membership protocol, sans-I/O) carried out by a ``Gate``,
which tells the channel's runtime who is admitted or dropped, decides which sync frames pass
and whom the community's part may go to. This module is the libp2p driver of that gate: it
carries hellos (``p2pfl.wire.community``) through the same outboxes, counts refusals, and runs
each community's ``Discovery`` (announcements, dials). Start-up checks are in
``community_checks.py``, the checkpoint part in ``community_checkpoint.py``.

A community's core sees its shared part only and its messages are encoded with the
community's shared sub-schema, so private parameters never leave the node.

Leaving (``reload`` after ``p2pfl community leave``) stops a community at once: its channel is
closed (frames queued or in flight cancelled, drift correction cleared), the topic is left,
and its members are told (a refusal "left the community").
"""

from __future__ import annotations

import logging
import time
from collections import deque
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from p2pfl.community import CommunityError
from p2pfl.community.invite import check_membership
from p2pfl.community.manifest import Manifest
from p2pfl.community.sharing import SharedPart, SharingError, check_disjoint
from p2pfl.community.store import Membership, load_memberships
from p2pfl.daemon import community_checkpoint
from p2pfl.daemon.community_checks import check_model, check_whole_model_protocol
from p2pfl.daemon.config import NodeConfig
from p2pfl.daemon.discovery import Discovery
from p2pfl.daemon.peers import PeerLedger
from p2pfl.daemon.sync import RECENT_REFUSALS, Channel, Frame, SyncChannels
from p2pfl.daemon.transport import Transport, TransportError
from p2pfl.protocol.admission import NOT_A_MEMBER, Admission, Gate, RefusalNotices
from p2pfl.protocol.config import parse_protocol
from p2pfl.protocol.core import NodeCore
from p2pfl.ratelog import RateLimitedLog
from p2pfl.runtime import CoreRuntime, NodeModel, open_core
from p2pfl.spec import SpecError
from p2pfl.wire.codec import WireError
from p2pfl.wire.community import HELLO_MAX_BYTES, HELLO_PROTOCOL, Hello

log = logging.getLogger("p2pfl.communities")

BYE_TIMEOUT_S = 2.0


@dataclass
class Community:
    """One joined community's live state."""

    membership: Membership
    part: SharedPart
    runtime: CoreRuntime
    """Its core on the shared part (replaced when it resumes from a checkpoint)."""
    gate: Gate = field(init=False)
    discovery: Discovery | None = None
    tasks: trio.CancelScope = field(default_factory=trio.CancelScope)
    counters: dict[str, int] = field(default_factory=dict)
    """Its sync channel's counters (``sync.Channel.counters``)."""
    refusals: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=RECENT_REFUSALS))
    """The last hellos refused in this community: peer, reason, unix time (for the dashboard;
    refused sync frames are in its channel's ``refusals``)."""

    @property
    def id(self) -> str:
        return self.membership.id

    @property
    def manifest(self) -> Manifest:
        return self.membership.manifest

    @property
    def core(self) -> NodeCore:
        return self.runtime.core

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
            "admission": self.manifest.admission,
            "members": sorted(self.admitted),
            "step": self.core.step,
            "syncs": self.core.stats.syncs,
            **self.counters,
        }


class Communities:
    """Every community of one node daemon: their cores, members, traffic and discovery.

    Build it after the learner is restored (cores take the current model as reference), resume
    the cores from the checkpoint with ``load_state_dict``, call ``start`` once the transport
    runs, feed it peer events, and ``reload`` when the memberships on disk change.
    ``state_dict`` is the communities' part of the node checkpoint.
    """

    def __init__(
        self,
        config: NodeConfig,
        peer_id: str,
        model: NodeModel,
        sync: SyncChannels,
        counters: dict[str, int],
        ledger: PeerLedger | None = None,
    ) -> None:
        self.config = config
        self.peer_id = peer_id
        self.model = model
        self.schema = model.learner.schema
        self.sync = sync
        sync.on_unknown = self._on_unknown_channel
        self.node_counters = counters
        """The node's counters; refused hellos count in its ``rejected`` too."""
        self.ledger = ledger if ledger is not None else PeerLedger()
        """Per-peer records of the node: refused hellos are noted there with their reason."""
        self.active: dict[str, Community] = {}
        self.notices = RefusalNotices()
        self._transport: Transport | None = None
        self._nursery: trio.Nursery | None = None
        self._refusals = RateLimitedLog(log)
        self._reload_lock = trio.Lock()
        for membership in self._checked(load_memberships(config.home)):
            self._add(membership)

    @property
    def home(self) -> Path:
        return self.config.home

    # -------------------------------------------------------------------- lifecycle

    def register(self, transport: Transport) -> None:
        """Install the hello handler on ``transport`` (before it runs peers)."""
        transport.set_handler(HELLO_PROTOCOL, self.on_hello, max_frame_bytes=HELLO_MAX_BYTES)

    def start(self, nursery: trio.Nursery, transport: Transport) -> None:
        """Run the communities loaded at construction on ``transport`` (after
        ``SyncChannels.start``)."""
        self._nursery, self._transport = nursery, transport
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
            part = check_model(self.schema, membership, self.config.model)
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
        part = check_model(self.schema, membership, self.config.model)
        community = Community(membership, part, self.new_runtime(membership, part))
        admission = Admission(membership.manifest, self.peer_id, membership.invite, self.notices)
        community.gate = Gate(
            admission, _Members(community, self.sync.guard), _Hellos(self, community)
        )
        channel = self.sync.open(
            Channel(
                community.id,
                f"community {community.label}",
                community.runtime,
                reaches=community.gate.admits,
                check=lambda peer: community.gate.frame(time.time(), peer),
                on_send_failed=lambda peer: community.gate.disconnected(time.time(), peer),
            )
        )
        community.counters = channel.counters
        self.active[community.id] = community
        return community

    def new_runtime(self, membership: Membership, part: SharedPart) -> CoreRuntime:
        """A fresh core for the community: its policy on ``part``, the current model as
        reference."""
        try:
            protocol = parse_protocol(membership.manifest.protocol)
        except SpecError as exc:
            raise CommunityError(
                f"community {membership.manifest.name!r}: protocol {exc}; ask the founder to "
                "fix the manifest"
            ) from None
        with self.sync.guard:
            return open_core(
                self.model,
                self.peer_id,
                protocol,
                part,
                self.sync.port(membership.id),
                seed=self.config.seed,
                channel=membership.id,
                max_neighbors=self.config.target_degree,
            )

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, dict[str, Any]]:
        """What a restart needs of each community, by community id (``community_checkpoint``)."""
        return {cid: community_checkpoint.state_of(c) for cid, c in self.active.items()}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Resume the communities this node is still in from ``saved`` (``state_dict`` of the
        previous run); each restored core re-applies its drift correction to its part."""
        community_checkpoint.restore(self, saved)

    async def _stop(self, community: Community) -> None:
        """Leave: no frame of this community is sent or accepted once this returns."""
        del self.active[community.id]
        community.tasks.cancel()
        self.sync.close(community.id)
        byes = _Byes()
        community.gate.driver = byes
        community.gate.leave(time.time())
        if self._transport is not None:
            with trio.move_on_after(BYE_TIMEOUT_S, shield=True):
                if community.discovery is not None:
                    await community.discovery.unsubscribe()
                async with trio.open_nursery() as nursery:
                    for peer, hello in byes.hellos:
                        nursery.start_soon(self._send_quietly, peer, hello)
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
            community.gate.greet(time.time(), peer)

    # ------------------------------------------------------------------------ hellos

    async def on_hello(self, peer: str, payload: bytes) -> None:
        """Hello handler: the community's admission decides."""
        try:
            hello = Hello.from_bytes(payload)
        except WireError as exc:
            self.node_counters["rejected"] += 1
            self.ledger.refused(peer, f"unreadable hello: {exc}")
            self._refusals.warning(("hello", peer), "refused hello from peer %s: %s", peer, exc)
            return
        community = self.active.get(hello.community)
        if community is None:
            if hello.refused is None:
                self.node_counters["rejected"] += 1
                self.ledger.refused(peer, f"hello for community {hello.community}: {NOT_A_MEMBER}")
                self._refusals.warning(
                    ("hello", peer),
                    "refused hello from peer %s for community %s: %s",
                    peer,
                    hello.community,
                    NOT_A_MEMBER,
                )
                self._on_unknown_channel(hello.community, peer)
            return
        if hello.refused is not None and community.discovery is not None:
            community.discovery.forget(peer)
        community.gate.hello(time.time(), peer, hello)

    def _on_unknown_channel(self, community: str, peer: str) -> None:
        """A hello or sync frame for a community this node is not in: tell the sender."""
        for notice in self.notices.notice(time.time(), peer, community, NOT_A_MEMBER):
            self.post_hello(community, notice.to, notice.hello)

    def post_hello(self, community: str, to: str, hello: Hello) -> None:
        """Queue ``hello`` on ``to``'s outbox (a refusal goes out even if we leave meanwhile)."""
        notice = hello.refused is not None
        self.sync.post(to, Frame(HELLO_PROTOCOL, community, hello.to_bytes(), notice))

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
        for community in list(self.active.values()):
            community.gate.disconnected(time.time(), peer)

    def status(self) -> list[dict[str, Any]]:
        """One entry per community, for ``p2pfl node status``; ``recent_refusals`` holds its
        last refused hellos and sync frames."""
        entries = []
        for community in sorted(self.active.values(), key=lambda c: c.manifest.name):
            channel = self.sync.active.get(community.id)
            refusals = [*community.refusals, *(channel.refusals if channel else ())]
            refusals.sort(key=lambda r: r["at"])
            entries.append({**community.status(), "recent_refusals": refusals[-RECENT_REFUSALS:]})
        return entries


class _Members:
    """Tells a community's runtime whom its gate admitted or dropped (on the runtime's clock,
    trio's; admission runs on unix time)."""

    def __init__(self, community: Community, guard: AbstractContextManager[Any]) -> None:
        self.community, self.guard = community, guard

    def peer_up(self, now: float, peer: str) -> None:
        with self.guard:
            self.community.runtime.peer_up(trio.current_time(), peer)

    def peer_down(self, now: float, peer: str) -> None:
        with self.guard:
            self.community.runtime.peer_down(trio.current_time(), peer)


class _Hellos:
    """A community gate's driver: hellos through the node's outboxes, refusals counted."""

    def __init__(self, communities: Communities, community: Community) -> None:
        self.communities, self.community = communities, community

    def send_hello(self, now: float, to: str, hello: Hello) -> None:
        self.communities.post_hello(self.community.id, to, hello)

    def refused(self, now: float, peer: str, reason: str) -> None:
        self.community.counters["rejected"] += 1
        self.communities.node_counters["rejected"] += 1
        self.community.refusals.append({"peer": peer, "reason": reason, "at": time.time()})
        self.communities.ledger.refused(peer, f"community {self.community.label}: {reason}")


class _Byes:
    """The driver of a community being left: its goodbyes are sent at once, not queued."""

    def __init__(self) -> None:
        self.hellos: list[tuple[str, Hello]] = []

    def send_hello(self, now: float, to: str, hello: Hello) -> None:
        self.hellos.append((to, hello))

    def refused(self, now: float, peer: str, reason: str) -> None:
        pass
