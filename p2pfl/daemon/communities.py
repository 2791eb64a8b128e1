"""The communities of a running node: one protocol core per joined community, syncing only the
community's shared parameters, only with its admitted members.

A community's core sees its shared part through ``PartView`` and its messages travel encoded
with the community's shared sub-schema, so private parameters never leave the node. The
messages (hello, sync frame, announcement) are defined in ``community_wire.py``; this module
runs them:

* admission: a peer whose hello holds a credential that ``check_credential`` accepts (the
  stream's authenticated peer id as prover, this node as verifier) is admitted and answered
  with this node's own hello; a refused one is answered with the reason. Admission lasts as
  long as the connection (and the invite: the credential is checked again on every frame, so
  an expiring invite stops the sync). Sync frames from peers not admitted are refused.
* discovery: each community announces this node on its topic every ``ANNOUNCE_EVERY_S``; a
  member that hears an unknown peer dials it and the hello decides. Bootstrap addresses of
  the membership (and peers that say hello) are the other way in.
* traffic: each community is a channel of the node's ``SyncChannels`` (``sync.py``), the same
  handler, outbox and counters as the whole-model sync; this module tells it who is reachable
  (admitted members) and checks every frame's sender. Hellos go through the same outboxes.

Leaving (``reload`` after ``p2pfl community leave``) stops a community at once: its channel is
closed (frames queued or in flight cancelled, drift correction cleared), the topic is left,
and its members are told (a refusal "left the community").

Each community's core state (step, reference, drift correction, stats) and counters go into
the node checkpoint by community id, so a restarted node resumes every community it is still
in where it stopped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from p2pfl.community.invite import check_credential, check_membership, make_credential
from p2pfl.community.manifest import CommunityError, Manifest
from p2pfl.community.sharing import SharedPart, SharingError, check_disjoint, shared_part
from p2pfl.community.store import Membership, load_memberships
from p2pfl.daemon.community_wire import (
    HELLO_MAX_BYTES,
    HELLO_PROTOCOL,
    LEFT,
    MAX_ANNOUNCED_ADDRS,
    MAX_REASON_CHARS,
    Announcement,
    Hello,
    topic_of,
)
from p2pfl.daemon.config import ConfigError, NodeConfig
from p2pfl.daemon.sync import Channel, Frame, SyncChannels
from p2pfl.daemon.transport import Transport, TransportError
from p2pfl.learning.params import ParamSchema
from p2pfl.models import build_model, local_parameters
from p2pfl.peers import peer_of_address
from p2pfl.protocol.config import parse_protocol
from p2pfl.protocol.core import NodeCore
from p2pfl.runtime import CoreRuntime, NodeModel, open_core
from p2pfl.spec import SpecError
from p2pfl.wire.codec import WireError

log = logging.getLogger("p2pfl.communities")

ANNOUNCE_EVERY_S = 5.0
"""Announcements per community and node: one every 5 s, a few hundred bytes each."""
MAINTAIN_EVERY_S = 1.0
REDIAL_EVERY_S = 3.0
"""At most one dial per peer and community every 3 s."""
REFUSAL_EVERY_S = 10.0
"""At most one refusal notice per peer and community every 10 s."""
MAX_REFUSALS_REMEMBERED = 1024
KNOWN_MEMBER_TTL_S = 60.0
"""An announced peer is dialled while its announcements are at most this old."""
MAX_ANNOUNCED_PEERS = 256
"""Announced peers remembered per community (announcements prove no membership)."""
BYE_TIMEOUT_S = 2.0


# ---------------------------------------------------------------------------------- checks


def check_model(schema: ParamSchema, membership: Membership, model_spec: str) -> SharedPart:
    """The node's shared part for ``membership``; raise CommunityError if the node's model does
    not have exactly the parameters the community's manifest describes."""
    manifest = membership.manifest
    label = f"community {manifest.name!r} ({manifest.id[:12]})"
    fix = (
        f"run the node with the community's model: --model {manifest.model!r} on data with "
        f"inputs {list(manifest.input_shape)} and {manifest.classes} classes, or leave it with "
        f"`p2pfl community leave {manifest.id[:12]}`"
    )
    try:
        part = shared_part(schema, manifest.shared, _local_parameters(manifest))
    except SharingError as exc:
        raise CommunityError(
            f"{label} shares {list(manifest.shared)}, but this node's model "
            f"({model_spec!r}) does not fit: {exc}; {fix}"
        ) from None
    if part.schema != manifest.schema:
        raise CommunityError(
            f"{label} shares {_describe(manifest.schema)}, but this node's model "
            f"({model_spec!r}) has {_describe(part.schema)} under {list(manifest.shared)}; {fix}"
        )
    return part


def _local_parameters(manifest: Manifest) -> list[str]:
    """What the community's ``local=`` keeps on every member (e.g. BatchNorm's affine
    parameters), named on the manifest's own model."""
    local = parse_protocol(manifest.protocol).local
    if not local:
        return []
    model = build_model(manifest.model, manifest.input_shape, manifest.classes, seed=0)
    return local_parameters(model, local)


def check_whole_model_protocol(config: NodeConfig, memberships: Sequence[Membership]) -> None:
    """Refuse a whole-model protocol on a node in communities: it would send every parameter,
    private ones included, to every connected peer."""
    if memberships and config.protocol_config.kind != "none":
        names = ", ".join(repr(m.manifest.name) for m in memberships)
        raise ConfigError(
            f"this node is a member of {names} but its whole-model protocol is "
            f"{config.protocol!r}, which would send every parameter (private ones included) to "
            f'every connected peer; set protocol = "none" in {config.home / "config.toml"} '
            "(or start with --protocol none), or leave the communities with "
            "`p2pfl community leave`"
        )


def _describe(schema: ParamSchema) -> str:
    return ", ".join(f"{p.name} {list(p.shape)} {p.dtype}" for p in schema.params) or "nothing"


# ---------------------------------------------------------------------------- one community


@dataclass
class Community:
    """One joined community's live state."""

    membership: Membership
    part: SharedPart
    runtime: CoreRuntime
    """Its core on the shared part (replaced when it resumes from a checkpoint)."""
    admitted: dict[str, bytes | None] = field(default_factory=dict)
    """Members admitted on their current connection, with the credential they presented."""
    greeted: set[str] = field(default_factory=set)
    """Peers we said hello to on their current connection."""
    announced: dict[str, tuple[tuple[str, ...], float]] = field(default_factory=dict)
    """Peers heard on the topic (members, as they say): their addresses and when (trio
    clock)."""
    last_dial: dict[str, float] = field(default_factory=dict)
    tasks: trio.CancelScope = field(default_factory=trio.CancelScope)
    counters: dict[str, int] = field(default_factory=dict)
    """Its sync channel's counters (``sync.Channel.counters``)."""

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
    def label(self) -> str:
        return f"{self.manifest.name!r} ({self.id[:12]})"

    def bootstrap_peers(self) -> dict[str, str]:
        """Peer id -> address of the membership's bootstrap list."""
        peers = {peer_of_address(addr): addr for addr in self.membership.bootstrap}
        return {peer: addr for peer, addr in peers.items() if peer is not None}

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


# ------------------------------------------------------------------------------- all of them


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
        model: NodeModel,
        sync: SyncChannels,
        counters: dict[str, int],
    ) -> None:
        self.config = config
        self.peer_id = peer_id
        self.model = model
        self.schema = model.learner.schema
        self.sync = sync
        sync.on_unknown = self._on_unknown_channel
        self.node_counters = counters
        """The node's counters; refused hellos count in its ``rejected`` too."""
        self.active: dict[str, Community] = {}
        self._transport: Transport | None = None
        self._nursery: trio.Nursery | None = None
        self._last_refusal: dict[tuple[str, str], float] = {}
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
        community = Community(membership, part, self._new_runtime(membership, part))
        channel = self.sync.open(
            Channel(
                community.id,
                f"community {community.label}",
                community.runtime,
                reaches=lambda peer: peer in community.admitted,
                check=lambda peer: self._admission_problem(community, peer),
                on_send_failed=lambda peer: self._drop(community, peer),
            )
        )
        community.counters = channel.counters
        self.active[community.id] = community
        return community

    def _new_runtime(self, membership: Membership, part: SharedPart) -> CoreRuntime:
        """A fresh core for the community: its policy on ``part``, the current model as
        reference."""
        try:
            protocol = parse_protocol(membership.manifest.protocol)
        except SpecError as exc:
            raise CommunityError(
                f"community {membership.manifest.name!r}: protocol {exc}; ask the founder to "
                "fix the manifest"
            ) from None
        return open_core(
            self.model,
            self.peer_id,
            protocol,
            part,
            self.sync.port(membership.id),
            seed=self.config.seed,
            channel=membership.id,
        )

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, dict[str, Any]]:
        """What a restart needs of each community, by community id: its core's state and its
        counters, with the digest of the shared schema they belong to."""
        return {
            cid: {
                "name": community.manifest.name,
                "schema": community.part.schema.digest(),
                "core": community.core.state_dict(),
                "counters": dict(community.counters),
            }
            for cid, community in self.active.items()
        }

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Resume the communities this node is still in from ``saved`` (``state_dict`` of the
        previous run); each restored core re-applies its drift correction to its part.

        State of a community the node left is ignored; state that does not fit the community
        (another shared schema, a malformed entry) is logged and that community starts afresh.
        """
        for cid, state in saved.items():
            community = self.active.get(cid)
            if community is None:
                name = state.get("name") if isinstance(state, dict) else None
                log.info(
                    "ignored the saved state of community %r (%s): this node is no longer a member",
                    name,
                    str(cid)[:12],
                )
                continue
            try:
                runtime, counters = self._restored(community, state)
            except (KeyError, TypeError, ValueError, RuntimeError) as exc:
                log.warning(
                    "community %s starts afresh at step 0: its saved state does not fit (%s)",
                    community.label,
                    exc,
                )
                continue
            community.runtime = self.sync.active[community.id].runtime = runtime
            community.counters.update(counters)
            log.info("community %s resumed at step %d", community.label, community.core.step)

    def _restored(
        self, community: Community, state: dict[str, Any]
    ) -> tuple[CoreRuntime, dict[str, int]]:
        """A new core's runtime and the counters for ``community`` restored from ``state``;
        raise ValueError (or KeyError, TypeError) if it does not fit."""
        if not isinstance(state, dict):
            raise TypeError(f"expected a table, found {type(state).__name__}")
        if bytes(state["schema"]) != community.part.schema.digest():
            raise ValueError("it was saved for another shared schema")
        counters = {
            name: int(v) for name, v in state["counters"].items() if name in community.counters
        }
        runtime = self._new_runtime(community.membership, community.part)
        runtime.restore(state["core"])
        return runtime, counters

    async def _stop(self, community: Community) -> None:
        """Leave: no frame of this community is sent or accepted once this returns."""
        del self.active[community.id]
        community.tasks.cancel()
        self.sync.close(community.id)
        if self._transport is not None:
            with trio.move_on_after(BYE_TIMEOUT_S, shield=True):
                try:
                    await self._transport.unsubscribe(topic_of(community.id))
                except Exception as exc:
                    log.debug("unsubscribing %s failed: %s", community.label, exc)
                async with trio.open_nursery() as byes:
                    for peer in community.admitted:
                        bye = Hello(community.id, refused=LEFT, answer=True)
                        byes.start_soon(self._send_quietly, peer, bye)
        log.info("left community %s: its sync stopped", community.label)

    async def _send_quietly(self, peer: str, hello: Hello) -> None:
        assert self._transport is not None
        try:
            await self._transport.send(peer, HELLO_PROTOCOL, hello.to_bytes())
        except TransportError as exc:
            log.debug("could not tell peer %s: %s", peer, exc)

    # ------------------------------------------------------------- community tasks

    async def _run(self, community: Community) -> None:
        """Announce, listen for announcements and reach bootstrap peers until left."""
        with community.tasks:
            assert self._transport is not None
            try:
                subscription = await self._transport.subscribe(topic_of(community.id))
            except Exception as exc:
                log.warning("cannot subscribe to %s: %s", topic_of(community.id), exc)
                return
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._announce, community)
                nursery.start_soon(self._maintain, community)
                async for origin, data in subscription:
                    self._on_announcement(community, origin, data)

    async def _announce(self, community: Community) -> None:
        assert self._transport is not None
        while True:
            await trio.sleep(ANNOUNCE_EVERY_S if community.admitted else MAINTAIN_EVERY_S)
            announcement = Announcement(
                self.peer_id, tuple(self._transport.listen_addrs[:MAX_ANNOUNCED_ADDRS])
            )
            try:
                await self._transport.publish(topic_of(community.id), announcement.to_bytes())
            except TransportError as exc:
                log.debug("announcement for %s not published: %s", community.label, exc)

    async def _maintain(self, community: Community) -> None:
        """Dial bootstrap and announced members; greet connected ones not greeted yet."""
        assert self._transport is not None
        while True:
            now = trio.current_time()
            connected = set(self._transport.peers())
            candidates = dict(community.bootstrap_peers())
            for peer, (addrs, heard) in list(community.announced.items()):
                if now - heard > KNOWN_MEMBER_TTL_S:
                    del community.announced[peer]
                elif addrs and len(community.admitted) < self.config.target_degree:
                    candidates.setdefault(peer, addrs[0])
            for peer, addr in candidates.items():
                if peer == self.peer_id or peer in community.admitted:
                    continue
                if peer in connected:
                    self._greet(community, peer)
                elif now - community.last_dial.get(peer, -REDIAL_EVERY_S) >= REDIAL_EVERY_S:
                    community.last_dial[peer] = now
                    self._nursery_start(self._dial, community, peer, addr)
            await trio.sleep(MAINTAIN_EVERY_S)

    async def _dial(self, community: Community, peer: str, addr: str) -> None:
        assert self._transport is not None
        try:
            await self._transport.connect(addr)
        except TransportError as exc:
            log.info(
                "community %s: could not reach %s (will retry): %s", community.label, peer, exc
            )
            return
        if self.active.get(community.id) is community:
            self._greet(community, peer)

    def _on_announcement(self, community: Community, origin: str, data: bytes) -> None:
        """A peer announced itself: remember it (the maintenance loop dials it and the hello
        decides whether it is a member)."""
        try:
            announcement = Announcement.from_bytes(data)
            if announcement.peer != origin:
                raise WireError(f"it names peer {announcement.peer}, not its signer")
        except WireError as exc:
            log.info("ignored announcement from %s on %s: %s", origin, community.label, exc)
            return
        addrs = tuple(a for a in announcement.addrs if peer_of_address(a) == origin)
        if origin not in community.announced:
            if len(community.announced) >= MAX_ANNOUNCED_PEERS:
                log.debug(
                    "community %s: too many announced peers, ignored %s", community.label, origin
                )
                return
            if origin not in community.admitted:
                log.info("community %s: heard of peer %s", community.label, origin)
        community.announced[origin] = (addrs, trio.current_time())

    def _nursery_start(self, fn: Any, *args: Any) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(fn, *args)

    # ------------------------------------------------------------------------ hello

    def _greet(self, community: Community, peer: str) -> None:
        """Say hello (a credential made for this peer only) once per connection."""
        if peer in community.greeted:
            return
        community.greeted.add(peer)
        hello = Hello(community.id, make_credential(community.membership, self.peer_id, peer))
        self.sync.post(peer, Frame(HELLO_PROTOCOL, community.id, hello.to_bytes()))

    async def on_hello(self, peer: str, payload: bytes) -> None:
        """Hello handler: admit the peer if its credential holds, else tell it why not."""
        try:
            hello = Hello.from_bytes(payload)
        except WireError as exc:
            self.node_counters["rejected"] += 1
            log.warning("refused hello from peer %s: %s", peer, exc)
            return
        community = self.active.get(hello.community)
        if hello.refused is not None:
            if community is not None:
                if hello.refused == LEFT:
                    log.info("member %s left community %s", peer, community.label)
                else:
                    log.warning(
                        "peer %s refused us in community %s: %s",
                        peer,
                        community.label,
                        hello.refused,
                    )
                community.announced.pop(peer, None)
                self._drop(community, peer, greet_again=False)
            return
        if community is None:
            self.node_counters["rejected"] += 1
            log.warning(
                "refused hello from peer %s: this node is not a member of community %s",
                peer,
                hello.community,
            )
            self._refuse(hello.community, peer, "this node is not a member of that community")
            return
        try:
            check_credential(
                community.manifest, peer, self.peer_id, hello.credential, int(time.time())
            )
        except CommunityError as exc:
            community.counters["rejected"] += 1
            self.node_counters["rejected"] += 1
            log.warning("refused peer %s in community %s: %s", peer, community.label, exc)
            self._refuse(community.id, peer, str(exc))
            return
        if peer not in community.admitted:
            log.info("community %s: admitted member %s", community.label, peer)
            community.admitted[peer] = hello.credential
            community.runtime.peer_up(trio.current_time(), peer)
        if not hello.answer:  # answers are not answered: no ping-pong
            community.greeted.add(peer)
            credential = make_credential(community.membership, self.peer_id, peer)
            answer = Hello(community.id, credential, answer=True)
            self.sync.post(peer, Frame(HELLO_PROTOCOL, community.id, answer.to_bytes()))

    def _refuse(self, community_id: str, peer: str, reason: str) -> None:
        """Tell ``peer`` why it was refused (at most once per REFUSAL_EVERY_S and community)."""
        now = trio.current_time()
        if len(self._last_refusal) > MAX_REFUSALS_REMEMBERED:
            self._last_refusal = {
                k: t for k, t in self._last_refusal.items() if now - t < REFUSAL_EVERY_S
            }
        if now - self._last_refusal.get((peer, community_id), -REFUSAL_EVERY_S) < REFUSAL_EVERY_S:
            return
        self._last_refusal[(peer, community_id)] = now
        notice = Hello(community_id, answer=True, refused=reason[:MAX_REASON_CHARS])
        frame = Frame(HELLO_PROTOCOL, community_id, notice.to_bytes(), after_close=True)
        self.sync.post(peer, frame)

    def _drop(self, community: Community, peer: str, greet_again: bool = True) -> None:
        """Forget ``peer``'s admission (it refused us, left, or is unreachable); unless
        ``greet_again`` is False, the maintenance loop may say hello again."""
        if greet_again:
            community.greeted.discard(peer)
        if peer in community.admitted:
            del community.admitted[peer]
            community.runtime.peer_down(trio.current_time(), peer)

    # -------------------------------------------------------------------- sync frames

    def _on_unknown_channel(self, channel: str, peer: str) -> None:
        """A sync frame for a community this node is not in: tell the sender."""
        self._refuse(channel, peer, "this node is not a member of that community")

    def _admission_problem(self, community: Community, peer: str) -> str | None:
        if peer not in community.admitted:
            self._refuse(community.id, peer, "not admitted: say hello with a valid invite first")
            return "not admitted (no valid hello on this connection)"
        try:
            check_credential(
                community.manifest, peer, self.peer_id, community.admitted[peer], int(time.time())
            )
        except CommunityError as exc:
            self._drop(community, peer, greet_again=False)
            self._refuse(community.id, peer, str(exc))
            return str(exc)
        return None

    # ---------------------------------------------------------------------- peer events

    def peer_up(self, peer: str) -> None:
        """A connection opened: greet it in the communities where it is a known member."""
        if self._nursery is None:
            return  # not started yet: the maintenance loops greet it
        for community in list(self.active.values()):
            if peer in community.bootstrap_peers() or peer in community.announced:
                self._greet(community, peer)

    def peer_down(self, peer: str) -> None:
        """The last connection closed: admissions end with it."""
        for community in list(self.active.values()):
            self._drop(community, peer)

    def status(self) -> list[dict[str, Any]]:
        """One entry per community, for ``p2pfl node status``."""
        return [c.status() for c in sorted(self.active.values(), key=lambda c: c.manifest.name)]
