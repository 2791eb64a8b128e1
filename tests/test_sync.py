"""The daemon's sync channels (``SyncChannels``), offline: frames are routed by channel id,
checked by the channel's owner and counted; a send to a peer the channel cannot reach fails at
once and the core is told; a failed delivery is reported to the runtime and the owner;
closing a channel stops its frames and timers."""

from __future__ import annotations

import logging

import pytest
import torch
import trio
import trio.testing
from kit import FakeLearner, FakeModel, unclipped

from p2pfl.community.sharing import shared_part
from p2pfl.daemon.outbox import Outboxes
from p2pfl.daemon.sync import (
    SYNC_PROTOCOL,
    WHOLE_MODEL,
    Channel,
    Frame,
    SyncChannels,
    split_sync_frame,
    sync_frame,
)
from p2pfl.daemon.transport import TransportError
from p2pfl.protocol.config import parse_protocol
from p2pfl.protocol.dynamic import DynamicCore
from p2pfl.runtime import NodeModel, open_core
from p2pfl.wire.codec import encode
from p2pfl.wire.messages import Pull, Push

OTHER = "ab" * 16


class Wire:
    """A transport that records frames; sends to ``dead`` peers fail."""

    def __init__(self) -> None:
        self.frames: list[tuple[str, str, bytes]] = []
        self.dead: set[str] = set()

    async def send(self, peer: str, protocol: str, payload: bytes) -> None:
        if peer in self.dead:
            raise TransportError(f"send to {peer} failed: connection refused")
        self.frames.append((peer, protocol, payload))


def node(spec: str = "dynamic:delta=0,b=1", reaches=lambda peer: True, check=None):
    learner = FakeLearner([FakeModel(torch.zeros(4))])
    counters = {"bytes_sent": 0, "bytes_received": 0, "rejected": 0, "send_failures": 0}
    sync = SyncChannels(learner.schema, counters)
    runtime = open_core(
        NodeModel(learner, 0, 10),
        "me",
        unclipped(parse_protocol(spec)),
        shared_part(learner.schema, ["*"]),
        sync.port(WHOLE_MODEL),
        seed=0,
        channel="all",
        neighbors=["a", "b"],
    )
    failed: list[str] = []
    channel = Channel(
        WHOLE_MODEL,
        "the whole model",
        runtime,
        reaches=reaches,
        check=check or (lambda peer: None),
        on_send_failed=failed.append,
    )
    sync.open(channel)
    return learner, sync, channel, failed


CLOCK = trio.testing.MockClock
"""Time moves only when a test jumps it."""


def offline(sync: SyncChannels, body, clock: trio.testing.MockClock | None = None) -> Wire:
    wire = Wire()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            sync.start(nursery, wire)  # type: ignore[arg-type]
            await body(wire)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()

    trio.run(main, clock=clock or CLOCK())
    return wire


def test_a_send_the_channel_cannot_reach_fails_at_once():
    learner, sync, channel, failed = node(reaches=lambda peer: peer == "a")

    async def body(wire: Wire) -> None:
        learner.models[0].w += 1.0
        sync.local_step(trio.current_time())  # a violation: pulls a and b

    wire = offline(sync, body)
    core = channel.runtime.core
    assert isinstance(core, DynamicCore)
    assert [(peer, protocol) for peer, protocol, _ in wire.frames] == [("a", SYNC_PROTOCOL)]
    assert core.down == {"b"} and core.session is not None  # still waits for a
    assert failed == []  # nothing was sent to b, nothing failed on the wire


def test_a_failed_delivery_tells_the_runtime_and_the_owner():
    learner, sync, channel, failed = node()

    async def body(wire: Wire) -> None:
        wire.dead.add("b")
        learner.models[0].w += 1.0
        sync.local_step(trio.current_time())

    offline(sync, body)
    assert failed == ["b"]
    assert channel.counters["send_failures"] == 1 and sync.node_counters["send_failures"] == 1
    assert channel.runtime.core.down == {"b"}


def test_frames_are_checked_decoded_and_counted_per_channel():
    refusals = {"x": "not admitted"}
    learner, sync, channel, _ = node("gossip:b=1", check=refusals.get)
    unknown: list[tuple[str, str]] = []
    sync.on_unknown = lambda cid, peer: unknown.append((cid, peer))
    push = encode(Push(-1, torch.ones(4), 10), learner.schema)

    async def body(wire: Wire) -> None:
        await sync.on_frame("a", sync_frame(WHOLE_MODEL, push))  # taken: merged
        await sync.on_frame("x", sync_frame(WHOLE_MODEL, push))  # refused by the owner
        await sync.on_frame("a", sync_frame(WHOLE_MODEL, b"\xc1junk"))  # undecodable
        await sync.on_frame("a", sync_frame(OTHER, push))  # no such channel
        await sync.on_frame("a", b"\x00\x01")  # too short for a channel id

    offline(sync, body)
    assert channel.runtime.core.stats.syncs == 1
    torch.testing.assert_close(learner.models[0].w, torch.full((4,), 0.5))
    assert channel.counters["bytes_received"] == 4 + 16 + len(push)
    assert channel.counters["rejected"] == 2
    assert sync.node_counters["rejected"] == 4
    assert unknown == [(OTHER, "a")]


def test_a_closed_channel_sends_nothing_and_its_timers_do_not_fire():
    learner, sync, channel, _ = node()
    clock = CLOCK()

    async def body(wire: Wire) -> None:
        learner.models[0].w += 1.0
        sync.local_step(trio.current_time())  # pulls queued, a session timer set
        sync.close(WHOLE_MODEL)
        sync.post("a", Frame(SYNC_PROTOCOL, WHOLE_MODEL, b"late"))
        sync.post("a", Frame("/hello", WHOLE_MODEL, b"bye", after_close=True))
        await trio.testing.wait_all_tasks_blocked()
        clock.jump(10)  # past the session timeout
        await trio.testing.wait_all_tasks_blocked()

    wire = offline(sync, body, clock)
    assert [payload for _, _, payload in wire.frames] == [b"bye"]
    core = channel.runtime.core
    assert isinstance(core, DynamicCore) and core.stats.timeouts == 0
    assert channel.runtime.closed


@pytest.mark.parametrize("cid", [WHOLE_MODEL, OTHER])
def test_sync_frames_round_trip(cid):
    message = encode(Pull(7), FakeLearner([FakeModel(torch.zeros(4))]).schema)
    assert split_sync_frame(sync_frame(cid, message)) == (cid, message)


def test_an_outbox_whose_sender_ended_drops_instead_of_raising():
    """A core may still send while the node stops (its step ran in a thread that cannot be
    cancelled): the peer's sender has ended, the frame is dropped and counted."""
    counters = {"send_failures": 0}
    sent: list[bytes] = []

    async def send(peer: str, item: bytes) -> None:
        sent.append(item)

    outboxes = Outboxes[bytes](4, send, lambda *_: None, counters, logging.getLogger("test"))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            outboxes.start(nursery)
            outboxes.put("a", b"first")
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        outboxes.put("a", b"after the stop")

    trio.run(main)
    assert sent == [b"first"] and counters["send_failures"] == 1
