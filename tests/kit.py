"""The shared test kit: one fake model, one virtual-clock driver built on the runtime, one set
of hypothesis strategies and one free-port helper. Test files import what they need from
here (``from kit import ...``) instead of keeping their own copies.
"""

from __future__ import annotations

import dataclasses
import heapq
import random
import socket
from collections.abc import Callable, Hashable, Iterable, Sequence

import torch
from hypothesis import strategies as st

from p2pfl.community.sharing import shared_part
from p2pfl.learning.learner import SGDConfig
from p2pfl.learning.params import ParamSchema, ParamSpec
from p2pfl.protocol.config import ProtocolConfig, parse_protocol
from p2pfl.protocol.core import NodeCore
from p2pfl.runtime import CoreRuntime, NodeModel, open_core
from p2pfl.runtime.model import Models
from p2pfl.simulator.engine import Simulation, prepare
from p2pfl.simulator.scenario import load_scenario
from p2pfl.wire.codec import decode, encode
from p2pfl.wire.messages import Message

DIM = 8
"""Size of the fake models' parameter vector (unless a test asks for another)."""


def vector_schema(dim: int = DIM) -> ParamSchema:
    """The schema of a model that is one vector ``w`` of ``dim`` floats."""
    return ParamSchema((ParamSpec("w", (dim,)),))


# -- the fake model ------------------------------------------------------------------------
class FakeModel:
    """A model that is one tensor ``w`` and a sample count: the ``ModelAccess`` of a core in
    unit tests, and one node of a ``FakeLearner``."""

    def __init__(self, w: torch.Tensor, samples: int = 10) -> None:
        self.w = w.clone()
        self._samples = samples

    def read(self) -> torch.Tensor:
        return self.w

    @property
    def samples(self) -> int:
        return self._samples


class FakeLearner:
    """``FakeModel``s as the runtime's learner (``runtime.model.Models``): node ``i`` is
    ``models[i]``; its drift correction is kept in ``corrections`` (no training: tests move
    the models themselves)."""

    def __init__(self, models: Sequence[FakeModel], lr: float = 0.1) -> None:
        self.models = list(models)
        self.schema = vector_schema(len(self.models[0].w))
        self.sgd = SGDConfig(lr=lr)
        self.corrections: dict[int, torch.Tensor] = {}

    def get(self, node: int) -> torch.Tensor:
        return self.models[node].w

    def set(self, node: int, vector: torch.Tensor) -> None:
        self.models[node].w = vector.clone()

    def set_correction(self, node: int, vector: torch.Tensor | None) -> None:
        if vector is None:
            self.corrections.pop(node, None)
        else:
            self.corrections[node] = vector.clone()

    def lr(self, node: int, steps: int = 1) -> float:
        return self.sgd.lr


# -- one runtime, recorded -------------------------------------------------------------------
class Recorder:
    """A ``Driver`` that records what a runtime asks of it; sends to ``fail`` peers fail at
    once (reported to ``runtime``)."""

    def __init__(self, fail: Iterable[str] = ()) -> None:
        self.sent: list[tuple[float, str, Message]] = []
        self.timers: list[tuple[float, Hashable]] = []
        self.fail = set(fail)
        self.runtime: CoreRuntime | None = None

    def send(self, now: float, to: str, message: Message) -> None:
        self.sent.append((now, to, message))
        if to in self.fail:
            assert self.runtime is not None
            self.runtime.send_failed(now, to)

    def set_timer(self, at: float, key: Hashable) -> None:
        self.timers.append((at, key))


def unclipped(config: ProtocolConfig) -> ProtocolConfig:
    """``config`` without clipping unless its spec asks for it: the tests on fake models check
    session mechanics and exact merge arithmetic on models that start far apart (no common
    initialisation); clipping has its own tests (``test_merge.py``)."""
    if "clip=" in config.text:
        return config
    return dataclasses.replace(config, merge=dataclasses.replace(config.merge, clip=0.0))


def recorded_runtime(
    learner: Models,
    spec: str,
    globs: Sequence[str] = ("*",),
    *,
    node: str = "a",
    neighbors: Iterable[str] = (),
    model: NodeModel | None = None,
    fail: Iterable[str] = (),
    seed: int = 0,
) -> CoreRuntime:
    """A runtime of ``node`` running ``spec`` on ``globs`` of node 0 of ``learner`` (through
    ``model``: the channels of one node share it), driven by a ``Recorder``."""
    driver = Recorder(fail)
    driver.runtime = open_core(
        model if model is not None else NodeModel(learner, 0, 8),
        node,
        parse_protocol(spec),
        shared_part(learner.schema, list(globs)),
        driver,
        seed=seed,
        channel=str(list(globs)),
        neighbors=neighbors,
    )
    return driver.runtime


# -- graphs as adjacency dicts ---------------------------------------------------------------
def ring(n: int) -> dict[str, set[str]]:
    return {str(i): {str((i - 1) % n), str((i + 1) % n)} for i in range(n)}


def line(n: int) -> dict[str, set[str]]:
    return {str(i): {str(j) for j in (i - 1, i + 1) if 0 <= j < n} for i in range(n)}


def complete(n: int) -> dict[str, set[str]]:
    return {str(i): {str(j) for j in range(n) if j != i} for i in range(n)}


def star(n: int) -> dict[str, set[str]]:
    graph = {"0": {str(i) for i in range(1, n)}}
    graph.update({str(i): {"0"} for i in range(1, n)})
    return graph


GRAPHS: dict[str, Callable[[int], dict[str, set[str]]]] = {
    "ring": ring,
    "line": line,
    "complete": complete,
    "star": star,
}


# -- the virtual-clock driver ------------------------------------------------------------------
class _Port:
    """The ``Driver`` of one node of a ``VirtualNet``."""

    def __init__(self, net: VirtualNet, node: str) -> None:
        self.net, self.node = net, node

    def send(self, now: float, to: str, message: Message) -> None:
        self.net._send(self.node, to, message)

    def set_timer(self, at: float, key: Hashable) -> None:
        assert at >= self.net.now, f"timer {key!r} set in the past"
        self.net._push(at, "timer", (self.node, key))


class VirtualNet:
    """Nodes on ``graph`` (adjacency dict of string ids), each a protocol core run by a
    ``CoreRuntime`` on a ``FakeModel``, on a virtual clock with one event list of messages
    and timers. Messages go through the real wire codec (unless ``wire=False``).

    ``offline`` nodes are unreachable without anyone noticing: what they send or are sent is
    lost, their timers still run. ``unreachable`` nodes cannot be sent to, and the sender's
    runtime is told (``send_failed``). ``drop(src, dst, msg)`` loses chosen messages;
    ``delay(src, dst, msg)`` overrides the latency of chosen messages (None: the default).
    """

    def __init__(
        self,
        spec: str,
        graph: dict[str, set[str]],
        models: dict[str, torch.Tensor] | None = None,
        *,
        seed: int = 0,
        latency: float = 0.001,
        jitter: float = 0.0,
        samples: dict[str, int] | None = None,
        wire: bool = True,
        step_scale: float = 0.1,
        dim: int = DIM,
        lr: float = 0.1,
    ) -> None:
        self.config = unclipped(parse_protocol(spec))
        self.gen = torch.Generator().manual_seed(seed)
        self.rng = random.Random(seed)
        self.nodes = sorted(graph, key=lambda n: (len(n), n))
        self.models = {
            n: FakeModel(
                models[n] if models is not None else torch.randn(dim, generator=self.gen),
                samples[n] if samples is not None else 10,
            )
            for n in self.nodes
        }
        self.learner = FakeLearner([self.models[n] for n in self.nodes], lr=lr)
        self.schema = self.learner.schema
        whole = shared_part(self.schema, ["*"])
        self.runtimes: dict[str, CoreRuntime] = {
            n: open_core(
                NodeModel(self.learner, i, self.models[n].samples),
                n,
                self.config,
                whole,
                _Port(self, n),
                seed=seed,
                channel="all",
                neighbors=graph[n],
            )
            for i, n in enumerate(self.nodes)
        }
        self.cores: dict[str, NodeCore] = {n: r.core for n, r in self.runtimes.items()}
        self.latency, self.jitter, self.wire, self.step_scale = latency, jitter, wire, step_scale
        self.now = 0.0
        self.events: list[tuple[float, int, str, tuple]] = []
        self.seq = 0
        self.offline: set[str] = set()
        self.unreachable: set[str] = set()
        self.drop: Callable[[str, str, Message], bool] | None = None
        self.delay: Callable[[str, str, Message], float | None] | None = None
        self.log: list[tuple[float, str, str, Message]] = []
        """(time, src, dst, message) of every send, delivered or not."""
        self.added = torch.zeros(dim)
        """The sum of every local step's change."""
        self.alone = {n: m.w.clone() for n, m in self.models.items()}
        """Every node's model after the same local steps without any sync."""

    # -- what the runtime asks ----
    def _push(self, at: float, kind: str, payload: tuple) -> None:
        self.seq += 1
        heapq.heappush(self.events, (at, self.seq, kind, payload))

    def _send(self, src: str, dst: str, message: Message) -> None:
        if self.wire:
            message = decode(encode(message, self.schema), self.schema)
        self.log.append((self.now, src, dst, message))
        if dst in self.unreachable:
            self.runtimes[src].send_failed(self.now, dst)
            return
        if src in self.offline or dst in self.offline:
            return
        if self.drop is not None and self.drop(src, dst, message):
            return
        delay = self.delay(src, dst, message) if self.delay is not None else None
        if delay is None:
            delay = self.latency + self.rng.uniform(0, self.jitter)
        self._push(self.now + delay, "msg", (src, dst, message))

    # -- events ----
    def advance(self, until: float) -> None:
        """Deliver every message and fire every timer due up to ``until``."""
        while self.events and self.events[0][0] <= until:
            at, _, kind, payload = heapq.heappop(self.events)
            self.now = at
            if kind == "timer":
                node, key = payload
                self.runtimes[node].timer(at, key)
                continue
            src, dst, message = payload
            if dst not in self.offline:
                self.runtimes[dst].message(at, src, message)
        self.now = max(self.now, until)

    def settle(self, limit: int = 100_000) -> None:
        """Run until nothing is pending (timers included)."""
        for _ in range(limit):
            if not self.events:
                return
            self.advance(self.events[0][0])
        raise AssertionError("the network never went quiet")

    def step(self, node: str, change: torch.Tensor | None = None) -> None:
        """One local step: move the node's model by ``change`` (random if None), then tell
        its core."""
        if change is None:
            change = torch.randn(len(self.added), generator=self.gen) * self.step_scale
        self.models[node].w = self.models[node].w + change
        self.added += change
        self.alone[node] += change
        self.runtimes[node].local_step(self.now)

    def peer_down(self, node: str, peer: str) -> None:
        self.runtimes[node].peer_down(self.now, peer)

    def peer_up(self, node: str, peer: str) -> None:
        self.runtimes[node].peer_up(self.now, peer)

    # -- views ----
    @property
    def corrections(self) -> dict[str, torch.Tensor]:
        """Each node's drift correction, for nodes that have one."""
        return {
            n: self.learner.corrections[i]
            for i, n in enumerate(self.nodes)
            if i in self.learner.corrections
        }

    def stacked(self) -> torch.Tensor:
        return torch.stack([m.w for m in self.models.values()])

    def mean(self) -> torch.Tensor:
        return self.stacked().mean(0)

    def spread(self, alone: bool = False) -> float:
        """Mean squared distance of the models to their mean (``alone``: without syncs)."""
        w = torch.stack(list(self.alone.values())) if alone else self.stacked()
        return float((w - w.mean(0)).square().sum(1).mean())

    def sends(
        self, kind: type | None = None, src: str | None = None, dst: str | None = None
    ) -> list[tuple[float, str, str, Message]]:
        return [
            (t, s, d, m)
            for t, s, d, m in self.log
            if (kind is None or isinstance(m, kind))
            and (src is None or s == src)
            and (dst is None or d == dst)
        ]

    def stat(self, name: str) -> int:
        return sum(getattr(c.stats, name) for c in self.cores.values())


# -- hypothesis strategies ---------------------------------------------------------------------
INT64 = st.integers(-(2**63), 2**63 - 1)
SEEDS = st.integers(0, 2**31 - 1)
HEX_IDS = st.text("0123456789abcdef", min_size=31, max_size=33)
"""Community ids, valid (32 hex digits) and one digit short or long."""
MSGPACK_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=40)
    | st.binary(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=8)
        | st.dictionaries(st.text(max_size=12) | st.integers(0, 9), inner, max_size=6)
    ),
    max_leaves=16,
)
"""Anything msgpack can carry: what a hostile peer can put in a frame."""


def small_digits_run(
    protocol: str, byzantine: str = "", steps: int = 150, alpha: float = 0.5
) -> Simulation:
    """A finished simulation of 8 nodes on digits (small world, Dirichlet ``alpha``), with
    ``byzantine`` attackers if given; its summary in ``sim.summary``."""
    scenario = load_scenario(
        None,
        {
            "nodes": 8,
            "steps": steps,
            "topology": "small-world:k=4,p=0.2",
            "dataset": "digits",
            "partition": f"dirichlet:alpha={alpha}",
            "model": "mlp",
            "eval_every": 25,
            "seed": 1,
            "byzantine": byzantine,
        },
    )
    sim = Simulation(prepare(scenario), protocol)
    sim.summary = sim.run()
    return sim


def random_payloads(max_size: int = 300) -> st.SearchStrategy[bytes]:
    """Random bytes, or random msgpack values packed."""
    import msgpack

    return st.binary(max_size=max_size) | MSGPACK_VALUES.map(msgpack.packb)


# -- ports ---------------------------------------------------------------------------------------
def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 that were free a moment ago."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()
