"""One core, two drivers: the same sequence of events fed to node 0's core through the
simulator's path (``Simulation``: its message and timer queue, ``deliver``, ``_send``,
churn as an offline node) and through the daemon's path (``SyncChannels``: encoded frames in
``on_frame``, the outboxes, trio timers on a mock clock, a transport whose sends fail for an
unreachable peer) produces the same sends (byte for byte, at the same times), the same timers
and the same model and drift correction. It fails if either path diverges: a rule applied by
one driver only (a step size, a seed, a liveness rule, a send to a peer that cannot be
reached) changes what the core does next.

Local steps carry an explicit parameter change (applied to both learners) so that the models
are compared exactly; that the batched and the per-node learner train alike is pinned in
``test_learner.py``. Messages from peers are drawn from templates resolved against the core's
state at that moment (a reply to its open session, an average from its coordinator, a round
it waits for), so sessions really complete.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pfl.community.sharing import shared_part
from p2pfl.daemon.sync import WHOLE_MODEL, Channel, SyncChannels, split_sync_frame, sync_frame
from p2pfl.daemon.transport import TransportError
from p2pfl.learning.learner import PerNodeLearner, SGDConfig
from p2pfl.learning.sampler import NodeDataBank
from p2pfl.protocol.config import parse_protocol
from p2pfl.protocol.dynamic import DynamicCore
from p2pfl.protocol.scheduled import PeriodicCore
from p2pfl.runtime import WHOLE_MODEL_CHANNEL, NodeModel, open_core
from p2pfl.simulator.engine import Prepared, Simulation, prepare
from p2pfl.simulator.scenario import load_scenario
from p2pfl.wire.codec import encode
from p2pfl.wire.messages import Average, Busy, Message, ModelReply, Pull, Push

TICK = 0.125
"""Time between events: a binary fraction, so timers set at ``now + timeout`` land on a tick
exactly in both drivers."""
PEERS = ("1", "2")
PROTOCOLS = [
    "dynamic:b=1,rel=0.0001,timeout=0.5",
    "dynamic:b=2,delta=0.02,cap=2,timeout=0.5,merge=samples",
    "periodic:b=2,timeout=0.5",
    "gossip:b=1",
]


@pytest.fixture(scope="module")
def prepared() -> Prepared:
    scenario = load_scenario(
        None,
        {"nodes": 3, "topology": "complete", "model": "logistic", "steps": 10, "seed": 3},
    )
    return prepare(scenario)


# -- events ---------------------------------------------------------------------------------
# ("step", change) | ("message", template, sender, params) | ("tick",) | ("down", peer) |
# ("up", peer) | ("unreachable", peer | None)
def events(numel: int) -> st.SearchStrategy[list[tuple[Any, ...]]]:
    change = st.floats(-0.3, 0.3).map(lambda s: torch.linspace(-1.0, 1.0, numel) * s)
    params = st.floats(-1.0, 1.0).map(lambda s: torch.linspace(0.0, 1.0, numel) * s)
    peer = st.sampled_from(PEERS)
    event = st.one_of(
        st.tuples(st.just("step"), change),
        st.tuples(st.just("step"), change),
        st.tuples(
            st.just("message"),
            st.sampled_from(["reply", "average", "pull", "busy", "push", "stale"]),
            peer,
            params,
        ),
        st.tuples(st.just("message"), st.just("reply"), peer, params),
        st.tuples(st.just("tick")),
        st.tuples(st.just("tick")),
        st.tuples(st.just("down"), peer),
        st.tuples(st.just("up"), peer),
        st.tuples(st.just("unreachable"), st.none() | peer),
    )
    return st.lists(event, min_size=5, max_size=40)


def resolve(core: Any, template: str, sender: str, params: torch.Tensor) -> Message:
    """A concrete message from ``sender`` for the core's current state."""
    samples, steps = 7, 3
    if isinstance(core, DynamicCore):
        session, membership = core.session, core.membership
        if template == "reply" and session is not None:
            return ModelReply(session.id, core.reference + params, samples, list(PEERS), steps)
        if template == "average" and membership is not None:
            return Average(membership.id, core.reference + params, steps)
        if template == "busy" and session is not None:
            return Busy(session.id)
    if isinstance(core, PeriodicCore) and template in ("reply", "push"):
        rnd = core.open_round if core.open_round is not None else core.step // core.config.b
        return Push(rnd, params, samples)
    if template == "push":
        return Push(-1, params, samples)
    if template == "pull":
        return Pull(12345)
    return Busy(99)  # stale: nothing the core waits for


# -- what each driver did ----------------------------------------------------------------------
@dataclass
class Trace:
    sends: dict[str, list[tuple[float, bytes]]] = field(default_factory=dict)
    """Per peer: (time, encoded message) in send order."""
    timers: list[tuple[float, Hashable]] = field(default_factory=list)
    model: torch.Tensor | None = None
    correction: torch.Tensor | None = None

    def sent(self, peer: str, at: float, data: bytes) -> None:
        self.sends.setdefault(peer, []).append((at, data))


def simulator_path(prepared: Prepared, spec: str, script: list[tuple[Any, ...]]) -> Trace:
    trace = Trace()
    sim = Simulation(prepared, spec, vectorised=False)  # the test calls the runtime directly
    schema = sim.schema
    runtime = sim.runtimes[0][0]
    push = sim._push

    def recording_push(at: float, origin: int, kind: str, payload: Any) -> None:
        if kind == "timer":
            trace.timers.append((at, payload[2]))
            push(at, origin, kind, payload)
        elif payload[2] == 0:
            push(at, origin, kind, payload)  # a message to node 0 (the test's)
        # messages node 0 sends are recorded in _send and go no further: peers stay silent

    send = sim._send

    def recording_send(now: float, channel: int, src: int, dst: int, message: Message) -> None:
        if sim.net.online[dst]:
            trace.sent(str(dst), now, encode(message, schema))
        send(now, channel, src, dst, message)

    sim._push, sim._send = recording_push, recording_send  # type: ignore[method-assign]
    now = 0.0
    for peer in PEERS:
        runtime.peer_up(now, peer)
    for event in script:
        kind = event[0]
        if kind == "step":
            sim.learner.set(0, sim.learner.get(0) + event[1])
            runtime.local_step(now)
        elif kind == "message":
            message = resolve(runtime.core, *event[1:])
            push(now, int(event[2]), "msg", (0, int(event[2]), 0, message, sim._finite(message)))
            sim.deliver(now)
        elif kind == "tick":
            now += TICK
            sim.deliver(now)
        elif kind == "down":
            runtime.peer_down(now, event[1])
        elif kind == "up":
            runtime.peer_up(now, event[1])
        else:
            for peer in PEERS:
                sim.net.online[int(peer)] = peer != event[1]
    trace.model = sim.learner.get(0).clone()
    trace.correction = sim.learner.correction(0)
    return trace


class RecordingTransport:
    """Records every frame sent; frames to ``unreachable`` fail as a dead connection does."""

    def __init__(self, trace: Trace) -> None:
        self.trace = trace
        self.unreachable: str | None = None

    async def send(self, peer: str, protocol: str, payload: bytes) -> None:
        if peer == self.unreachable:
            raise TransportError(f"send to {peer} failed: connection refused")
        _, message = split_sync_frame(payload)
        self.trace.sent(peer, trio.current_time(), message)


def daemon_path(prepared: Prepared, spec: str, script: list[tuple[Any, ...]]) -> Trace:
    trace = Trace()
    s = prepared.scenario
    node = prepared.nodes[0]
    bank = NodeDataBank([node.x_train], [node.y_train], s.batch_size, s.seed)
    learner = PerNodeLearner(prepared.model, bank, SGDConfig(lr=s.lr, momentum=s.momentum))
    schema = learner.schema
    counters = {"bytes_sent": 0, "bytes_received": 0, "rejected": 0, "send_failures": 0}
    sync = SyncChannels(schema, counters)
    runtime = open_core(
        NodeModel(learner, 0, len(node.y_train)),
        "0",
        parse_protocol(spec),
        shared_part(schema, ["*"]),
        sync.port(WHOLE_MODEL),
        seed=s.seed,
        channel=WHOLE_MODEL_CHANNEL,
        max_neighbors=len(PEERS),  # as the daemon: peers that connect become neighbours
    )
    sync.open(Channel(WHOLE_MODEL, "the whole model", runtime))
    set_timer = sync._set_timer

    def recording_set_timer(cid: str, at: float, key: Hashable) -> None:
        trace.timers.append((at, key))
        set_timer(cid, at, key)

    sync._set_timer = recording_set_timer  # type: ignore[method-assign]
    transport = RecordingTransport(trace)
    clock = trio.testing.MockClock()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            sync.start(nursery, transport)  # type: ignore[arg-type]
            for peer in PEERS:
                runtime.peer_up(trio.current_time(), peer)
            for event in script:
                kind = event[0]
                if kind == "step":
                    learner.set(0, learner.get(0) + event[1])
                    sync.local_step(trio.current_time())
                elif kind == "message":
                    message = resolve(runtime.core, *event[1:])
                    await sync.on_frame(event[2], sync_frame(WHOLE_MODEL, encode(message, schema)))
                elif kind == "tick":
                    clock.jump(TICK)
                elif kind == "down":
                    runtime.peer_down(trio.current_time(), event[1])
                elif kind == "up":
                    runtime.peer_up(trio.current_time(), event[1])
                else:
                    transport.unreachable = event[1]
                await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()

    trio.run(main, clock=clock)
    assert counters["rejected"] == 0
    trace.model = learner.get(0).clone()
    trace.correction = learner.correction(0)
    return trace


def assert_same(sim: Trace, daemon: Trace) -> None:
    assert daemon.sends == sim.sends
    assert daemon.timers == sim.timers
    assert sim.model is not None and daemon.model is not None
    torch.testing.assert_close(daemon.model, sim.model, rtol=0, atol=1e-6)
    torch.testing.assert_close(daemon.correction, sim.correction, rtol=0, atol=1e-6)


@pytest.mark.parametrize("spec", PROTOCOLS)
@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_both_drivers_make_the_core_do_the_same(prepared, spec, data):
    numel = sum(p.numel() for p in prepared.model.parameters())
    script = data.draw(events(numel))
    assert_same(simulator_path(prepared, spec, script), daemon_path(prepared, spec, script))


def test_a_full_session_with_a_failed_send_and_a_correction_is_the_same(prepared):
    """A fixed script that goes through everything: a session with one unreachable peer, a
    reply, its average and drift correction, a member role, a timeout."""
    numel = sum(p.numel() for p in prepared.model.parameters())
    up = torch.linspace(-1.0, 1.0, numel) * 0.3
    script = [
        ("unreachable", "2"),
        ("step", up),
        ("message", "reply", "1", -up),  # as far on as we are (a reply of the bare reference
        ("unreachable", None),  # would be a stale model: clipped to ours, nothing learned)
        ("up", "2"),
        ("message", "pull", "2", torch.zeros(numel)),
        ("tick",),
        ("message", "average", "2", torch.ones(numel) * 0.1),
        ("step", -up),
        ("tick",),
        ("tick",),
        ("tick",),
        ("tick",),
        ("tick",),
        ("step", up),
    ]
    sim = simulator_path(prepared, PROTOCOLS[0], script)
    assert sim.sends["1"] and sim.correction is not None and sim.correction.abs().sum() > 0
    assert_same(sim, daemon_path(prepared, PROTOCOLS[0], script))
