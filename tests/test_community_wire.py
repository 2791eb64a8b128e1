"""Community wire formats and what a node does with anything a peer sends.

Parsing hellos and announcements raises WireError and nothing else; the hello and sync
handlers of a node's communities never raise on random bytes, random msgpack or valid
messages with random contents: each frame is either counted as refused or taken (run offline,
without a network: a transport that records frames and cannot dial).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kit import HEX_IDS, INT64, MSGPACK_VALUES, random_payloads
from test_community_daemon import admit, draft, found, make_nodes

from p2pfl.community.invite import HeldInvite, make_credential
from p2pfl.community.manifest import Manifest
from p2pfl.community.store import load_memberships
from p2pfl.daemon.communities import Communities
from p2pfl.daemon.node import NodeDaemon
from p2pfl.daemon.sync import SYNC_PROTOCOL, SyncChannels, split_sync_frame, sync_frame
from p2pfl.daemon.transport import TransportError
from p2pfl.runtime import NodeModel
from p2pfl.wire.codec import WireError, encode
from p2pfl.wire.community import HELLO_PROTOCOL, LEFT, Announcement, Hello
from p2pfl.wire.messages import Average, Busy, ModelReply, Pull, Push

RANDOM_PAYLOADS = random_payloads()
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# -------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xc1",
        msgpack.packb([1, 2]),
        msgpack.packb(
            {"community": "x" * 32, "credential": None, "answer": False, "refused": None}
        ),
        msgpack.packb({"community": "ab" * 16, "credential": 5, "answer": False, "refused": None}),
        msgpack.packb({"community": "ab" * 16, "credential": None, "answer": 1, "refused": None}),
        msgpack.packb(
            {"community": "ab" * 16, "credential": None, "answer": True, "refused": "r" * 5000}
        ),
        msgpack.packb({"community": "ab" * 16, "credential": None, "answer": True, "extra": 1}),
    ],
)
def test_malformed_hello_is_a_wire_error(payload):
    with pytest.raises(WireError):
        Hello.from_bytes(payload)


@pytest.mark.parametrize(
    "payload",
    [
        b"\x00" * 3000,
        msgpack.packb({"peer": "p", "addrs": ["a"] * 9}),
        msgpack.packb({"peer": "p", "addrs": [1]}),
        msgpack.packb({"peer": "", "addrs": []}),
        msgpack.packb({"peer": "p"}),
        msgpack.packb({"peer": "p", "addrs": [], "credential": b"an old-format announcement"}),
    ],
)
def test_malformed_announcement_is_a_wire_error(payload):
    with pytest.raises(WireError):
        Announcement.from_bytes(payload)


def test_hello_announcement_and_sync_frame_round_trip():
    hello = Hello("ab" * 16, b"cred", answer=True)
    assert Hello.from_bytes(hello.to_bytes()) == hello
    ann = Announcement("12D3KooWpeer", ("/ip4/127.0.0.1/tcp/1/p2p/12D3KooWpeer",))
    assert Announcement.from_bytes(ann.to_bytes()) == ann
    assert split_sync_frame(sync_frame("ab" * 16, b"message")) == ("ab" * 16, b"message")


def hello_shaped(
    community: st.SearchStrategy[Any], credential: st.SearchStrategy[Any]
) -> st.SearchStrategy[bytes]:
    """Maps with the hello's keys (sometimes one more or one less), values valid or not."""
    fields = st.fixed_dictionaries(
        {
            "community": community | MSGPACK_VALUES,
            "credential": credential | MSGPACK_VALUES,
            "answer": st.booleans() | MSGPACK_VALUES,
            "refused": st.none() | st.sampled_from([LEFT, "r" * 1001]) | MSGPACK_VALUES,
        }
    )
    extra = st.dictionaries(st.sampled_from(["peer", "addrs", "x"]), MSGPACK_VALUES, max_size=1)
    return st.tuples(fields, extra, st.booleans()).map(
        lambda t: msgpack.packb(
            {k: v for k, v in {**t[0], **t[1]}.items() if not (t[2] and k == "answer")}
        )
    )


def parse_or_wire_error(parse: Callable[[bytes], Any], payload: bytes) -> Any:
    """``parse(payload)``, or None if it raised WireError (anything else fails the test)."""
    try:
        return parse(payload)
    except WireError:
        return None


@FUZZ
@given(payload=RANDOM_PAYLOADS | hello_shaped(HEX_IDS, st.none() | st.binary(max_size=200)))
def test_parsing_a_hello_raises_only_wire_errors(payload):
    hello = parse_or_wire_error(Hello.from_bytes, payload)
    if hello is not None:
        assert Hello.from_bytes(hello.to_bytes()) == hello


@FUZZ
@given(
    payload=RANDOM_PAYLOADS
    | st.fixed_dictionaries(
        {
            "peer": st.text(max_size=130) | MSGPACK_VALUES,
            "addrs": st.lists(st.text(max_size=260), max_size=9) | MSGPACK_VALUES,
        }
    ).map(msgpack.packb)
)
def test_parsing_an_announcement_raises_only_wire_errors(payload):
    announcement = parse_or_wire_error(Announcement.from_bytes, payload)
    if announcement is not None:
        assert Announcement.from_bytes(announcement.to_bytes()) == announcement


# ------------------------------------------------------------------------------- handlers


class _Silence:
    """A subscription on which nothing is ever published."""

    def __aiter__(self) -> _Silence:
        return self

    async def __anext__(self) -> tuple[str, bytes]:
        await trio.sleep_forever()
        raise AssertionError("unreachable")


class OfflineTransport:
    """What ``Communities`` uses of a transport, without a network: frames are recorded,
    dials fail, subscriptions stay silent."""

    listen_addrs: list[str] = []

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, bytes]] = []

    def peers(self) -> list[str]:
        return []

    async def send(self, peer_id: str, protocol: str, payload: bytes) -> None:
        self.sent.append((peer_id, protocol, payload))

    async def connect(self, multiaddr: str) -> str:
        raise TransportError(f"offline: cannot reach {multiaddr}")

    async def subscribe(self, topic: str) -> _Silence:
        return _Silence()

    async def unsubscribe(self, topic: str) -> None:
        pass

    async def publish(self, topic: str, data: bytes) -> None:
        pass


@dataclass
class Setup:
    """Node A founded two communities (body: dynamic, head: gossip) and invited B to both."""

    a: NodeDaemon
    b_peer: str
    outsider: str
    manifests: list[Manifest]
    credentials: dict[str, bytes | None]
    """B's credential for A, by community id."""

    def communities(self) -> Communities:
        """A fresh runtime for A's communities (a trio run each)."""
        a = self.a
        counters = dict(a.counters)
        sync = SyncChannels(a.schema, counters)
        return Communities(a.config, a.peer_id, NodeModel(a.learner, 0, 100), sync, counters)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    a, b, outsider = make_nodes(Path(tmp_path_factory.mktemp("fuzz")), 3)
    manifests = [
        found(a, draft("body", ["fc1.*"], "dynamic:b=1")),
        found(a, draft("head", ["head.*"], "gossip:b=1")),
    ]
    for manifest in manifests:
        admit(a, manifest, b)
    credentials = {m.id: make_credential(m, b.peer_id, a.peer_id) for m in load_memberships(b.home)}
    return Setup(a.start(2), b.peer_id, outsider.peer_id, manifests, credentials)


def run_offline(setup: Setup, body: Callable[[Communities], Awaitable[None]]) -> Communities:
    """Run ``body`` on fresh communities of A until every task waits; any error fails."""

    async def main() -> Communities:
        communities = setup.communities()
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                communities.sync.start(nursery, OfflineTransport())  # type: ignore[arg-type]
                communities.start(nursery, OfflineTransport())  # type: ignore[arg-type]
                await body(communities)
                await trio.testing.wait_all_tasks_blocked()
                nursery.cancel_scope.cancel()
        return communities

    return trio.run(main)


def refused(communities: Communities) -> int:
    return communities.node_counters["rejected"]


@FUZZ
@given(data=st.data())
def test_the_hello_handler_takes_anything(setup, data):
    ids = [m.id for m in setup.manifests]
    credentials = [c for c in setup.credentials.values() if c is not None]
    community = st.sampled_from(ids) | HEX_IDS
    credential = st.none() | st.sampled_from(credentials) | st.binary(max_size=200)
    mangled = st.sampled_from(credentials).flatmap(
        lambda c: st.tuples(st.integers(0, len(c) - 1), st.integers(1, 255)).map(
            lambda t: c[: t[0]] + bytes([c[t[0]] ^ t[1]]) + c[t[0] + 1 :]
        )
    )
    hellos = st.lists(
        st.tuples(
            st.sampled_from([setup.b_peer, setup.outsider]),
            RANDOM_PAYLOADS | hello_shaped(community, credential | mangled),
        ),
        min_size=1,
        max_size=4,
    )
    sequence = data.draw(hellos)

    async def body(communities: Communities) -> None:
        for peer, payload in sequence:
            before = refused(communities)
            await communities.on_hello(peer, payload)
            if parse_or_wire_error(Hello.from_bytes, payload) is None:
                assert refused(communities) == before + 1

    run_offline(setup, body)


def messages(numel: int, peers: list[str]) -> st.SearchStrategy[Any]:
    """Valid sync messages for a part of ``numel`` parameters, with random contents."""
    sessions = st.integers(0, 3) | INT64
    counts = st.integers(0, 2**63 - 1)
    params = st.sampled_from([0.0, 1.0, -3.5, 1e30]).map(lambda v: torch.full((numel,), v))
    neighbors = st.lists(st.sampled_from(peers), max_size=4)
    return st.one_of(
        st.builds(Pull, session=sessions),
        st.builds(ModelReply, sessions, params, counts, neighbors, counts),
        st.builds(Busy, session=sessions),
        st.builds(Average, sessions, params, counts),
        st.builds(Push, INT64, params, counts),
    )


@FUZZ
@given(data=st.data())
def test_the_sync_handler_takes_anything(setup, data):
    """B is admitted first; then every frame, from B or an outsider, valid or not, is either
    refused (counted) or taken (its bytes counted in the community)."""
    parts = {m.id: setup.a.communities.active[m.id].part for m in setup.manifests}
    peers = [setup.a.peer_id, setup.b_peer, setup.outsider, "12D3KooWnotapeer"]
    valid = st.sampled_from(list(parts)).flatmap(
        lambda cid: messages(parts[cid].schema.numel, peers).map(
            lambda m: sync_frame(cid, encode(m, parts[cid].schema))
        )
    )
    to_community = st.tuples(st.sampled_from(list(parts)), RANDOM_PAYLOADS).map(
        lambda t: sync_frame(*t)
    )
    frames = st.lists(
        st.tuples(
            st.sampled_from([setup.b_peer] * 3 + [setup.outsider]),
            valid | to_community | RANDOM_PAYLOADS,
        ),
        min_size=1,
        max_size=6,
    )
    sequence = data.draw(frames)

    async def body(communities: Communities) -> None:
        for cid, credential in setup.credentials.items():
            await communities.on_hello(setup.b_peer, Hello(cid, credential).to_bytes())
            assert setup.b_peer in communities.active[cid].admitted
        for peer, payload in sequence:
            before = refused(communities)
            taken = {cid: c.counters["bytes_received"] for cid, c in communities.active.items()}
            await communities.sync.on_frame(peer, payload)
            now_taken = {cid: c.counters["bytes_received"] for cid, c in communities.active.items()}
            assert (refused(communities) == before + 1) != (now_taken != taken)

    run_offline(setup, body)


# ----------------------------------------------------- two nodes over an in-memory link


class Link:
    """An in-memory connection between two nodes' communities: a send runs the other node's
    handler for the protocol at once (no libp2p), so the daemon's community path (hello,
    admission, sync channels, outboxes, timers) runs whole and deterministically."""

    listen_addrs: list[str] = []

    def __init__(self, me: str) -> None:
        self.me = me
        self.other: Link | None = None
        self.handlers: dict[str, Callable[[str, bytes], Awaitable[None]]] = {}
        self.frames: list[tuple[str, str, int]] = []
        """(peer, protocol, bytes) of every frame this node sent; frames to a peer that is not
        linked (an outsider that sent us something) go nowhere."""

    def set_handler(self, protocol: str, handler: Any, max_frame_bytes: int = 0) -> None:
        self.handlers[protocol] = handler

    def peers(self) -> list[str]:
        return [self.other.me] if self.other else []

    async def send(self, peer_id: str, protocol: str, payload: bytes) -> None:
        self.frames.append((peer_id, protocol, len(payload)))
        if self.other is not None and peer_id == self.other.me:
            await self.other.handlers[protocol](self.me, payload)

    async def connect(self, multiaddr: str) -> str:
        raise TransportError("in-memory link: no dialing")

    async def subscribe(self, topic: str) -> _Silence:
        return _Silence()

    async def unsubscribe(self, topic: str) -> None:
        pass

    async def publish(self, topic: str, data: bytes) -> None:
        pass


@dataclass
class Pair:
    """A founded a community and invited B; their communities are linked in memory."""

    a: Any
    b: Any
    manifest: Manifest
    nodes: dict[str, Communities]
    links: dict[str, Link]

    def community(self, node: Any) -> Any:
        return self.nodes[node.peer_id].active[self.manifest.id]


def linked_pair(tmp_path: Path, shared: str, protocol: str) -> tuple[Pair, Any, HeldInvite]:
    """A and B in a community of ``protocol`` sharing ``shared``; C, the third node, was
    invited too but left, and returns with its invite re-signed by itself (forged)."""
    a, b, c = make_nodes(tmp_path, 3)
    manifest = found(a, draft("linked", [shared], protocol))
    admit(a, manifest, b)
    held = admit(a, manifest, c)
    (c.home / "communities" / manifest.id / "membership.toml").unlink()
    resigned = c.key.private_key.sign(held.invite.signed_bytes())  # C signs, not the founder
    forged = HeldInvite(dataclasses.replace(held.invite, signature=resigned), held.private_key)
    nodes = {}
    for node in (a, b):
        daemon = node.start(3)
        counters = dict(daemon.counters)
        sync = SyncChannels(daemon.schema, counters)
        model = NodeModel(daemon.learner, 0, 100)
        nodes[node.peer_id] = Communities(daemon.config, node.peer_id, model, sync, counters)
    links = {peer: Link(peer) for peer in nodes}
    links[a.peer_id].other, links[b.peer_id].other = links[b.peer_id], links[a.peer_id]
    return Pair(a, b, manifest, nodes, links), c, forged


STEP_S = 1.0
"""Virtual seconds between the local steps of ``run_linked``."""


def run_linked(pair: Pair, steps: int, before_step: Callable[[], None], rest: Any) -> None:
    """Start both nodes' communities on their links, let B greet A, take ``steps`` local
    steps on both (``before_step`` first) ``STEP_S`` apart on a virtual clock, then run
    ``rest()``. Virtual time, because on the wall clock a loaded machine spaces the steps
    unevenly: a peer's push after a stalled step then arrives sooner than half the node's
    mean step time and is refused (``NodeCore._admit_session``), and a reply held up
    beyond the round-trip wait times out: neither is what these tests are about."""
    clock = trio.testing.MockClock()
    trio.run(_run_linked, pair, clock, steps, before_step, rest, clock=clock)


async def _run_linked(
    pair: Pair,
    clock: trio.testing.MockClock,
    steps: int,
    before_step: Callable[[], None],
    rest: Any,
) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for peer, communities in pair.nodes.items():
                communities.sync.register(pair.links[peer])  # type: ignore[arg-type]
                communities.register(pair.links[peer])  # type: ignore[arg-type]
                communities.sync.start(nursery, pair.links[peer])  # type: ignore[arg-type]
                communities.start(nursery, pair.links[peer])  # type: ignore[arg-type]
            pair.community(pair.b).gate.greet(time.time(), pair.a.peer_id)
            await trio.testing.wait_all_tasks_blocked()
            assert set(pair.community(pair.a).admitted) == {pair.b.peer_id}
            assert set(pair.community(pair.b).admitted) == {pair.a.peer_id}
            for _ in range(steps):
                before_step()
                for communities in pair.nodes.values():
                    communities.sync.local_step(trio.current_time())
                await trio.testing.wait_all_tasks_blocked()
                clock.jump(STEP_S)
            await rest()
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()


def test_two_daemons_admit_each_other_and_sync_over_an_in_memory_link(tmp_path):
    """A founds a gossip community and invites B; C holds a forged invite. Over in-memory
    links the daemon path admits A and B to each other at the first hello, every local step
    pushes B's shared part to A (and back), and A refuses C's hello and frames: C gets no
    sync frame, and A's core never hears of it."""
    pair, c, forged = linked_pair(tmp_path, "head.*", "gossip:b=1")
    a, b, manifest = pair.a, pair.b, pair.manifest
    a_side = pair.nodes[a.peer_id]

    async def outsider() -> None:
        c_hello = Hello(manifest.id, forged.prove(c.peer_id, a.peer_id))
        await a_side.on_hello(c.peer_id, c_hello.to_bytes())
        schema = a_side.active[manifest.id].part.schema
        push = Push(1, torch.zeros(schema.numel), 10)
        await a_side.sync.on_frame(c.peer_id, sync_frame(manifest.id, encode(push, schema)))

    run_linked(pair, 5, lambda: None, outsider)
    community_a, community_b = pair.community(a), pair.community(b)
    assert community_a.core.live_neighbors == [b.peer_id]
    assert community_a.counters["bytes_received"] > 0 and community_b.counters["bytes_sent"] > 0
    # each node merged its own 5 exchanges and the other's 5 (steps evenly paced: none refused)
    assert community_a.core.stats.syncs == community_b.core.stats.syncs == 10
    assert community_a.counters["rejected"] == 2  # C's hello and C's frame
    sent_by_a = pair.links[a.peer_id].frames
    assert len([f for f in sent_by_a if f[:2] == (b.peer_id, SYNC_PROTOCOL)]) >= 5
    assert [f[1] for f in sent_by_a if f[0] == c.peer_id] == [HELLO_PROTOCOL]  # why: refused


def test_dynamic_sessions_complete_over_an_in_memory_link(tmp_path):
    """Dynamic averaging through the daemon's community path (sessions, timers, replies,
    the averaged part written back): with the shared part drifting every step, sessions
    complete without a timeout, and after the last one A's and B's shared parts are equal."""
    pair, _, _ = linked_pair(tmp_path, "fc1.*", "dynamic:b=1,delta=0.000001")
    generator = torch.Generator().manual_seed(0)

    def drift() -> None:
        for node in (pair.a, pair.b):
            learner = node.daemon.learner
            learner.set(
                0, learner.get(0) + 0.01 * torch.randn(learner.schema.numel, generator=generator)
            )

    async def nothing() -> None:
        pass

    run_linked(pair, 6, drift, nothing)
    community_a, community_b = pair.community(pair.a), pair.community(pair.b)
    assert community_a.core.stats.syncs + community_b.core.stats.syncs >= 3
    assert community_a.core.stats.timeouts == community_b.core.stats.timeouts == 0
    part = community_a.part
    shared_a = part.take(pair.a.daemon.learner.get(0))
    shared_b = part.take(pair.b.daemon.learner.get(0))
    assert torch.allclose(shared_a, shared_b)
