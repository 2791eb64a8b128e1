"""The simulation engine: drives protocol cores and one learner for all nodes over a
``SimNetwork`` on a virtual clock. It makes no protocol decision and applies no action itself:
each core runs in a ``CoreRuntime`` (``p2pfl.runtime``), which feeds it events and applies its
model actions; the engine moves the messages it sends and fires the timers it sets.

Cores live in channels (see ``channels.py``): a channel is a graph over its members, the part
of the model they share and one core per member. The plain simulation is one channel over the
whole model; with communities a node has one core per community it is in. A core reads and
writes only its channel's part, and its messages are sized with the part's sub-schema (so their
bytes are the part's bytes). A send to a node that is offline (or outside the channel) fails at
once and the sender's core is told, as a daemon's send to a peer it cannot reach.

A simulation may run a range of the nodes only (a shard, ``sharding.py``): messages to other
nodes go to its outbox. Events are ordered by time, then by the node whose action made them
and that node's own count, so the order never depends on how nodes interleave. With
``vectorised`` the cores' local steps run through ``batched_protocol.py``.

One tick of the clock (``network.step_time`` seconds) is: bring the task to this step
(concept drift, ``stream.py``) and apply churn if due, deliver every message and timer that
is due, train every online node whose compute speed gives it a step in this tick (one
batched step, each batch scored before it is trained on), hand each of them
``on_local_step``, then evaluate if due. Links carry each message's exact encoded size
(``encoded_size``, equal to ``len(encode(...))``); the receiver gets a snapshot of the sent
message (what decoding those bytes yields, checked for NaN/inf like the decoder does) without
paying for encode and decode.
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import math
import random
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import networkx as nx
import torch
from torch import nn

from p2pfl.data import Dataset, NodeData, load_dataset, split_nodes
from p2pfl.learning.batched import BatchedLearner
from p2pfl.learning.learner import Learner, PerNodeLearner, SGDConfig
from p2pfl.learning.params import ParamSchema
from p2pfl.learning.sampler import NodeDataBank
from p2pfl.learning.schedule import parse_lr_schedule
from p2pfl.models import build_model
from p2pfl.protocol.byzantine import Attackers, parse_byzantine
from p2pfl.protocol.core import CoreStats, NodeCore
from p2pfl.runtime import CoreRuntime, NodeModel, open_core
from p2pfl.simulator.admission import SimGates
from p2pfl.simulator.batched_protocol import StackedCores
from p2pfl.simulator.channels import (
    Channel,
    ModelInfo,
    community_channels,
    union_graph,
    whole_model_channel,
)
from p2pfl.simulator.network import SimNetwork
from p2pfl.simulator.objectives import OwnObjectives
from p2pfl.simulator.scenario import Scenario, ScenarioError
from p2pfl.simulator.stream import ChangingTask, Prequential, drift_recovery
from p2pfl.topology import build_topology
from p2pfl.wire.codec import all_finite, encoded_size
from p2pfl.wire.community import Hello
from p2pfl.wire.messages import Message

log = logging.getLogger("p2pfl.simulator")


@dataclass
class Prepared:
    """What every run of a scenario shares: data split, graph, initial model and, if the
    scenario has communities, their channels (``graph`` is then the union of their graphs)."""

    scenario: Scenario
    dataset: Dataset
    nodes: list[NodeData]
    graph: nx.Graph
    model: nn.Module
    communities: list[Channel] = field(default_factory=list)


def prepare(scenario: Scenario) -> Prepared:
    """Load data, split it over the nodes, build the graph, the initial model and the
    communities' channels (``ScenarioError`` if a community does not fit the model)."""
    s = scenario
    dataset = load_dataset(s.dataset, s.seed)
    nodes = split_nodes(dataset, s.nodes, s.partition, s.seed)
    model = build_model(s.model, dataset.input_shape, dataset.num_classes, s.seed)
    if not s.communities:
        graph = build_topology(s.topology, s.nodes, s.seed, s.allow_disconnected)
        return Prepared(s, dataset, nodes, graph, model)
    schema = ParamSchema.from_module(model)
    info = ModelInfo(s.model, tuple(dataset.input_shape), dataset.num_classes)
    channels = community_channels(
        s.communities, schema, s.nodes, s.seed, s.allow_disconnected, model=info, module=model
    )
    return Prepared(s, dataset, nodes, union_graph(channels, s.nodes), model, channels)


def final_eval_steps(steps: int, count: int = 5) -> list[int]:
    """Prime-numbered steps in the last tenth of the run (no sync period b >= 2 divides a
    prime, so no protocol is measured right after its own averaging)."""
    start = max(2, steps - max(steps // 10, count * 4))
    primes = [n for n in range(start, steps + 1) if all(n % d for d in range(2, math.isqrt(n) + 1))]
    if not primes:
        return [steps]
    pick = [primes[round(i * (len(primes) - 1) / max(count - 1, 1))] for i in range(count)]
    return sorted(set(pick))


def _snapshot(message: Message) -> Message:
    """The message as the receiver will see it. Cores never modify a tensor they sent, but
    they may send a live view of their model (``ModelAccess.read``): views are copied at send
    time, other tensors are handed over as they are."""
    params = getattr(message, "params", None)
    if not isinstance(params, torch.Tensor) or params._base is None:
        return message  # compressed payloads are fresh tensors
    return replace(message, params=params.detach().clone())


Event = tuple[float, int, int, str, Any]
"""``(time, origin, count, kind, payload)``: ordered by time, then by the node whose action
made it and that node's own count, so the order never depends on how nodes interleave (the
same in one process and in shards)."""


class _Port:
    """The driver of one node's core in one channel: sends and timers go to the simulation."""

    __slots__ = ("sim", "channel", "node")

    def __init__(self, sim: Simulation, channel: int, node: int) -> None:
        self.sim, self.channel, self.node = sim, channel, node

    def send(self, now: float, to: str, message: Message) -> None:
        self.sim._send(now, self.channel, self.node, int(to), message)

    def set_timer(self, at: float, key: Hashable) -> None:
        self.sim._push(at, self.node, "timer", (self.channel, self.node, key))


class Simulation:
    """One run on one prepared scenario: every node trains on its own data and syncs over the
    channels it is a member of.

    ``nodes`` restricts the run to a range of nodes (a shard, see ``sharding.py``): it trains
    and runs the cores of those nodes only, and messages to other nodes go to ``outbox``.
    ``vectorised`` takes the protocol's local steps for all cores of a channel at once
    (``batched_protocol.py``); False calls every core on every step (the reference path)."""

    def __init__(
        self,
        prepared: Prepared,
        protocol: str,
        channels: Sequence[Channel] | None = None,
        *,
        vectorised: bool = True,
        nodes: range | None = None,
    ) -> None:
        """Without ``channels``, every node runs ``protocol`` over its whole model and the
        scenario graph (one channel). With ``channels`` (a scenario's communities, or none at
        all to train alone) ``protocol`` only names the run."""
        s = prepared.scenario
        self.prepared = prepared
        self.protocol = protocol
        self.nodes = range(s.nodes) if nodes is None else nodes
        first = self.first = self.nodes.start
        local = [prepared.nodes[i] for i in self.nodes]
        bank = NodeDataBank(
            [d.x_train for d in local],
            [d.y_train for d in local],
            s.batch_size,
            s.seed,
            prepared.dataset.fresh,
        )
        schedule = parse_lr_schedule(s.lr_schedule).with_horizon(s.steps)
        sgd = SGDConfig(lr=s.lr, momentum=s.momentum, schedule=schedule)
        self.learner: Learner
        if s.learner == "batched":
            try:
                self.learner = BatchedLearner(prepared.model, bank, sgd)
            except ValueError as exc:
                log.warning("%s; falling back to the per-node learner (slower)", exc)
                self.learner = PerNodeLearner(prepared.model, bank, sgd)
        else:
            self.learner = PerNodeLearner(prepared.model, bank, sgd)
        self.schema = self.learner.schema
        if channels is None:
            channels = [whole_model_channel(prepared.graph, prepared.model, protocol)]
        self.channels = list(channels)
        self.net = SimNetwork(prepared.graph, s.network, s.seed)
        models = {
            i: NodeModel(self.learner, i - first, len(prepared.nodes[i].y_train))
            for i in self.nodes
        }
        # Per channel: member -> runtime of its core (this run's nodes only), the members'
        # rows, their stacked step state; per local node: its channels.
        self.runtimes: list[dict[int, CoreRuntime]] = []
        self.members: list[frozenset[int]] = [frozenset(c.members) for c in self.channels]
        self.node_channels: list[list[int]] = [[] for _ in self.nodes]
        self.stacked: list[StackedCores | None] = []
        self._row_of: list[torch.Tensor] = []  # local node -> row in the channel, or -1
        self._member_rows: list[torch.Tensor] = []  # row -> local learner row
        self._members: list[list[int]] = []  # row -> node
        self._row_index: list[dict[int, int]] = []  # node -> row
        self.attackers = Attackers(parse_byzantine(s.byzantine), s.nodes, s.seed)
        for c, channel in enumerate(self.channels):
            runtimes: dict[int, CoreRuntime] = {}
            for i in channel.members:
                if i not in self.nodes:
                    continue
                runtimes[i] = open_core(
                    models[i],
                    str(i),
                    channel.protocol,
                    channel.part,
                    _Port(self, c, i),
                    seed=s.seed,
                    channel=channel.name,
                    # with admission, a core hears of its neighbours once they are admitted
                    neighbors=() if channel.admission else map(str, channel.graph.neighbors(i)),
                    max_neighbors=channel.graph.degree(i) if channel.admission else 0,
                )
                runtimes[i].core = self.attackers.wrap(i, runtimes[i].core)
                self.node_channels[i - first].append(c)
            self.runtimes.append(runtimes)
            self._members.append(list(runtimes))
            self._row_index.append({node: row for row, node in enumerate(runtimes)})
            rows = torch.full((len(self.nodes),), -1, dtype=torch.long)
            member_rows = torch.tensor(list(runtimes), dtype=torch.long) - first
            rows[member_rows] = torch.arange(len(runtimes))
            self._row_of.append(rows)
            self._member_rows.append(member_rows)
            cores = [r.core for r in runtimes.values()]
            self.stacked.append(
                StackedCores(cores, lambda r, c=c: self._read_rows(c, r))
                if vectorised and cores and len({type(core) for core in cores}) == 1
                else None
            )
        self.cores: list[NodeCore] = [r.core for rs in self.runtimes for r in rs.values()]
        if nodes is not None and any(channel.admission for channel in self.channels):
            raise ScenarioError(
                "a sharded run cannot simulate community admission yet; run this scenario in "
                "one process (without --shards)"
            )
        self.gates = SimGates(
            [channel.admission for channel in self.channels],
            [channel.graph for channel in self.channels],
            self,
        )
        self._gated = [self.gates.gated(c) for c in range(len(self.channels))]
        self._schemas = [channel.part.schema for channel in self.channels]
        self._scheduled = not self.learner.sgd.schedule.constant
        self.channel_bytes = [0] * len(self.channels)
        self.channel_messages = [0] * len(self.channels)
        self.objectives = (
            OwnObjectives(local, prepared.dataset.num_classes) if s.communities else None
        )
        rng = random.Random(s.seed)
        self.speeds = torch.tensor(
            [1.0 - s.network.speed_spread * rng.random() for _ in range(s.nodes)]
        )
        self.progress = torch.zeros(s.nodes)
        self.events: list[Event] = []
        self.outbox: list[Event] = []
        self._pushed = [0] * s.nodes
        self._checked: tuple[Any, bool] = (None, True)  # the tensor _finite checked last
        self.x_test = prepared.dataset.x_test
        self.task = ChangingTask(prepared.dataset, local, bank, self.objectives)
        self.rejected = 0
        self.node_steps = 0
        # Each batch scored before it is trained on: over the run, and since the last eval.
        self.prequential, self.prequential_window = Prequential(), Prequential()

    # -- actions -----------------------------------------------------------------------------
    def _read_rows(self, channel: int, rows: torch.Tensor) -> torch.Tensor:
        """The shared parameters ``[k, p]`` of the channel's members at ``rows``."""
        local = self._member_rows[channel][rows]
        if isinstance(self.learner, BatchedLearner):
            params = self.learner.params
            w = params if len(local) == len(params) else params.index_select(0, local)
        else:
            w = torch.stack([self.learner.get(i) for i in local.tolist()])
        part = self.channels[channel].part
        span = part.span
        whole = span is not None and span.start == 0 and span.stop == w.shape[-1]
        return w if whole else part.take(w)

    def _push(self, at: float, origin: int, kind: str, payload: Any) -> None:
        """Queue an event ``origin``'s core caused; a message to a node of another shard goes
        to the outbox."""
        count = self._pushed[origin]
        self._pushed[origin] = count + 1
        event = (at, origin, count, kind, payload)
        if kind != "timer" and payload[2] not in self.nodes:
            self.outbox.append(event)
        else:
            heapq.heappush(self.events, event)

    def _send(self, now: float, channel: int, src: int, dst: int, message: Message) -> None:
        """Move a message of ``src``'s core in ``channel`` to ``dst``. A send to a node that is
        offline, or not in the channel, fails at once (as a daemon's send to a peer it cannot
        reach): nothing goes out and the sender's core is told."""
        if (
            not self.net.online[dst]
            or dst not in self.members[channel]
            or (self._gated[channel] and not self.gates.admits(channel, src, dst))
        ):
            self.runtimes[channel][src].send_failed(now, str(dst))
            return
        size = encoded_size(message, self._schemas[channel])
        self.channel_bytes[channel] += size
        self.channel_messages[channel] += 1
        arrival = self.net.transmit(now, src, dst, size)
        if arrival is not None:
            sent = _snapshot(message)
            self._push(arrival, src, "msg", (channel, src, dst, sent, self._finite(sent)))

    def _finite(self, message: Message) -> bool:
        """Whether ``message``'s parameters are free of NaN/inf, checked once per tensor (a
        core sends the same tensor to every peer of a round; sent tensors never change)."""
        params = getattr(message, "params", None)
        if not isinstance(params, torch.Tensor):
            return True
        if params is not self._checked[0]:
            self._checked = (params, all_finite(params))
        return self._checked[1]

    def _runtime(self, channel: int, node: int) -> CoreRuntime:
        """The runtime of ``node``'s core in ``channel``, its core up to date for a call (on
        the vectorised path: its counters, and the step size of its latest step)."""
        runtime = self.runtimes[channel][node]
        stacked = self.stacked[channel]
        if stacked is not None:
            stacked.core(self._row_index[channel][node])
            if self._scheduled:
                runtime.core.step_size = runtime.model.step_size()
        return runtime

    # -- one tick, in phases (a shard runs them one at a time, see sharding.py) ---------------
    def accept(self, events: Sequence[Event]) -> None:
        """Messages from other shards, due at their times."""
        for event in events:
            heapq.heappush(self.events, event)

    @property
    def next_event(self) -> float:
        """Time of the earliest pending event (inf if none)."""
        return self.events[0][0] if self.events else math.inf

    def begin_tick(self, t: int, now: float) -> None:
        """Concept drift if due, then churn (neighbours of nodes that went or came back are
        told)."""
        self.task.advance(t)
        if t == 1:
            self.gates.start(now)
        gone, back = self.net.churn()
        self._notify(gone, True, now)
        self._notify(back, False, now)

    def deliver(self, now: float, horizon: float = math.inf) -> None:
        """Deliver every message and timer due by ``now`` and earlier than ``horizon``."""
        events, online, gated, pop = self.events, self.net.online, self._gated, heapq.heappop
        until = min(now, math.nextafter(horizon, -math.inf))  # due by now, before horizon
        while events and events[0][0] <= until:
            at, _, _, kind, payload = pop(events)
            if kind == "timer":
                channel, node, key = payload
                self._runtime(channel, node).timer(at, key)
                continue
            channel, src, dst, message, finite = payload
            if not online[dst]:
                self.net.lost += 1
                continue
            if kind == "hello":
                self.gates.hello(at, channel, src, dst, message)
                continue
            if gated[channel] and self.gates.frame(at, channel, src, dst) is not None:
                self.gates.refused[channel] += 1
                continue
            if not finite:
                self.rejected += 1
                log.warning("node %d rejected a message from %d: params contain NaN/inf", dst, src)
                continue
            self._runtime(channel, dst).message(at, str(src), message)

    def _notify(self, nodes: list[int], went_down: bool, now: float) -> None:
        """Tell the neighbours (of this run) of ``nodes`` in each channel that they went down
        or came up."""
        for node in nodes:
            for c, channel in enumerate(self.channels):
                if node not in self.members[c]:
                    continue
                if self.gates.gated(c):
                    (self.gates.went_down if went_down else self.gates.came_up)(now, c, node)
                    continue
                runtimes = self.runtimes[c]
                for peer in channel.graph.neighbors(node):
                    if peer in runtimes:
                        runtime = self._runtime(c, peer)
                        if went_down:
                            runtime.peer_down(now, str(node))
                        else:
                            runtime.peer_up(now, str(node))

    # -- admission (``SimGates`` calls these) ------------------------------------------------
    def core_peer_up(self, now: float, channel: int, node: int, peer: int) -> None:
        self._runtime(channel, node).peer_up(now, str(peer))

    def core_peer_down(self, now: float, channel: int, node: int, peer: int) -> None:
        self._runtime(channel, node).peer_down(now, str(peer))

    def send_hello(self, now: float, channel: int, src: int, dst: int, hello: Hello) -> None:
        arrival = self.net.transmit(now, src, dst, len(hello.to_bytes()))
        if arrival is not None:
            self._push(arrival, src, "hello", (channel, src, dst, hello, True))

    def train(self, now: float) -> None:
        """Every online node whose speed gives it a step in this tick takes one (one batched
        step for all), then its cores count it; those that act are called."""
        before = self.progress.floor()
        self.progress += self.speeds
        due = (self.progress.floor() > before) & self.net.online_mask
        active = due.nonzero().flatten()
        first, stop = self.first, self.nodes.stop
        if first or stop < len(due):
            mine = active[(active >= first) & (active < stop)]
            window: tuple[int, int] | None = (int((active < first).sum()), len(active))
        else:
            mine, window = active, None
        if not len(mine):
            if window is not None and len(active):
                self.learner.data.skip(len(active))
            return
        rows = mine - first
        result = self.learner.step(rows, window)
        self.prequential.add(result)
        self.prequential_window.add(result)
        self.node_steps += len(mine)
        for c, stacked in enumerate(self.stacked):
            if stacked is None:
                continue
            channel_rows = self._row_of[c][rows]
            members, runtimes = self._members[c], self.runtimes[c]
            for row in stacked.local_step(channel_rows[channel_rows >= 0], now):
                stacked.core(row)
                runtimes[members[row]].local_step(now)
        if any(stacked is None for stacked in self.stacked):
            for node in mine.tolist():
                for c in self.node_channels[node - first]:
                    if self.stacked[c] is None:
                        self.runtimes[c][node].local_step(now)

    # -- run ---------------------------------------------------------------------------------
    def run(self, on_tick: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Run all steps; return the run's summary with its metrics time series."""
        s = self.prepared.scenario
        finals = set(final_eval_steps(s.steps))
        metrics: list[dict[str, Any]] = []
        started = time.perf_counter()
        for t in range(1, s.steps + 1):
            now = t * s.network.step_time
            self.begin_tick(t, now)
            self.deliver(now)
            self.train(now)
            if measured_at(s, t, finals):
                metrics.append(self.measure([self.local_metrics()], t, now))
            if on_tick is not None:
                on_tick(t)
        wall = time.perf_counter() - started
        drifts = self.task.events(s.steps)
        return summarize(s, self.protocol, self.channels, metrics, [self.totals()], wall, drifts)

    def local_metrics(self) -> dict[str, Any]:
        """This run's (shard's) part of a metrics row: per-node accuracy and loss (mixed over
        the task's test labels during a transition), parameter sums for the divergence and the
        average model, prequential sums and counters; ``combine_metrics`` adds the parts up."""
        acc = loss = torch.zeros(self.learner.num_nodes)
        for share, y_test in self.task.test_labels:  # one set, or two mixed in a transition
            acc_c, loss_c = self.learner.evaluate(self.x_test, y_test)
            acc, loss = acc + share * acc_c, loss + share * loss_c
        square, column = 0.0, torch.zeros(self.schema.numel, dtype=torch.float64)
        w = self.learner.stacked()
        for start in range(0, len(w), EVAL_BLOCK):
            block = w[start : start + EVAL_BLOCK].double()
            square += float(block.square().sum())
            column += block.sum(0)
        window, self.prequential_window = self.prequential_window, Prequential()
        part = {
            "accuracy": acc.tolist(),
            "loss": loss.tolist(),
            "square": square,
            "column": column,
            "prequential": dataclasses.astuple(window),
            "honest": [i not in self.attackers.nodes for i in self.nodes],
            "concept": self.task.state.concept,
            "bytes": self.net.bytes_sent,
            "messages": self.net.messages,
            "syncs": sum(c.stats.syncs for c in self.cores),
            "online": sum(self.net.online),
        }
        if self.objectives is not None:
            part["own"] = self.objectives.accuracy(self.learner).tolist()
        return part

    def _cores_up_to_date(self) -> None:
        """On the vectorised path, bring every core's counters and step size up to date (e.g.
        before reading cores at the end of a run)."""
        for c, stacked in enumerate(self.stacked):
            if stacked is None:
                continue
            stacked.flush()
            if self._scheduled:
                for runtime in self.runtimes[c].values():
                    runtime.core.step_size = runtime.model.step_size()

    def score_average(self, column: torch.Tensor, nodes: int) -> tuple[float, float]:
        """Accuracy and loss of the network's average model (``column``: the parameters
        summed over all ``nodes``, in float64), mixed over the task's test labels."""
        vector = (column / nodes).float()
        acc = loss = 0.0
        for share, y_test in self.task.test_labels:
            acc_c, loss_c = self.learner.evaluate_vector(vector, self.x_test, y_test)
            acc, loss = acc + share * acc_c, loss + share * loss_c
        return acc, loss

    def measure(self, parts: Sequence[dict[str, Any]], t: int, now: float) -> dict[str, Any]:
        """The metrics row of step ``t`` from every shard's ``local_metrics`` (in node order);
        this simulation (any shard) scores the average model."""
        n = sum(len(p["accuracy"]) for p in parts)
        column = sum((p["column"] for p in parts[1:]), parts[0]["column"].clone())
        return combine_metrics(parts, self.protocol, t, now, self.score_average(column, n))

    def totals(self) -> dict[str, Any]:
        """This run's (shard's) counters for the summary; ``summarize`` adds shards up."""
        self._cores_up_to_date()
        stats = CoreStats().as_dict()
        for core in self.cores:
            for k, v in core.stats.as_dict().items():
                stats[k] += v
        return {
            "byzantine_nodes": sorted(i for i in self.nodes if i in self.attackers.nodes),
            "bytes_sent": self.net.bytes_sent,
            "messages": self.net.messages,
            "messages_lost": self.net.lost,
            "messages_rejected": self.rejected,
            "node_steps": self.node_steps,
            "prequential": list(dataclasses.astuple(self.prequential)),
            "stats": stats,
            "channel_bytes": self.channel_bytes,
            "channel_messages": self.channel_messages,
            "channel_refused": list(self.gates.refused),
            "channel_syncs": [
                sum(r.core.stats.syncs for r in runtimes.values()) for runtimes in self.runtimes
            ],
        }


EVAL_BLOCK = 256


def measured_at(s: Scenario, t: int, finals: set[int]) -> bool:
    """Whether step ``t`` is evaluated."""
    return t % s.eval_every == 0 or t in finals or t == s.steps


def combine_metrics(
    parts: Sequence[dict[str, Any]],
    protocol: str,
    t: int,
    now: float,
    average: tuple[float, float],
) -> dict[str, Any]:
    """One metrics row from the parts of every shard (in node order) and the average model's
    accuracy and loss. Means over nodes are exactly rounded sums (``math.fsum``), so they do
    not depend on how nodes were split."""
    acc = [a for p in parts for a in p["accuracy"]]
    loss = [v for p in parts for v in p["loss"]]
    n = len(acc)
    mean = sum((p["column"] for p in parts[1:]), parts[0]["column"].clone()) / n
    divergence = sum(p["square"] for p in parts) / n - float(mean.square().sum())
    prequential = _prequential([p["prequential"] for p in parts])
    honest = [h for p in parts for h in p["honest"]]
    own = {}
    if "own" in parts[0]:
        nodes = [v for p in parts for v in p["own"]]
        own = {"own_accuracy": math.fsum(nodes) / n, "own_accuracy_nodes": nodes}
    return {
        "protocol": protocol,
        "step": t,
        "time": round(now, 6),
        "accuracy": math.fsum(acc) / n,
        "accuracy_min": min(acc),
        "honest_accuracy": math.fsum(a for a, h in zip(acc, honest, strict=True) if h)
        / max(1, sum(honest)),
        "loss": math.fsum(loss) / n,
        "average_model_accuracy": average[0],
        "average_model_loss": average[1],
        "prequential_accuracy": prequential.accuracy,
        "prequential_loss": prequential.mean_loss,
        "concept": parts[0]["concept"],
        "divergence": max(0.0, divergence),
        "bytes": sum(p["bytes"] for p in parts),
        "messages": sum(p["messages"] for p in parts),
        "syncs": sum(p["syncs"] for p in parts),
        "online": parts[0]["online"],
        **own,
    }


def _prequential(parts: Sequence[Sequence[float]]) -> Prequential:
    """The shards' prequential sums added up."""
    return Prequential(*(sum(values) for values in zip(*parts, strict=True)))


def summarize(
    s: Scenario,
    protocol: str,
    channels: Sequence[Channel],
    metrics: list[dict[str, Any]],
    parts: Sequence[dict[str, Any]],
    wall: float,
    drift_events: Any,
) -> dict[str, Any]:
    """The run's summary from its metrics rows, every shard's ``totals`` (in node order) and
    the task's drift events (``ChangingTask.events``)."""
    finals = set(final_eval_steps(s.steps))
    final = [m for m in metrics if m["step"] in finals] or metrics[-1:]
    tail_start = s.steps - s.steps // 5
    tail = [m for m in metrics if m["step"] >= tail_start]
    total: dict[str, Any] = {}
    for part in parts:
        for k, v in part.items():
            if k == "prequential":
                continue
            if k == "byzantine_nodes":
                total[k] = total.get(k, []) + v
                continue
            if isinstance(v, dict):
                total[k] = {kk: total.get(k, {}).get(kk, 0) + vv for kk, vv in v.items()}
            elif isinstance(v, list):
                total[k] = [a + b for a, b in zip(total.get(k, [0] * len(v)), v, strict=True)]
            else:
                total[k] = total.get(k, 0) + v
    stats = dict(total["stats"])
    prequential = _prequential([p["prequential"] for p in parts])
    summary = {
        "protocol": protocol,
        "final_accuracy": sum(m["accuracy"] for m in final) / len(final),
        "final_loss": sum(m["loss"] for m in final) / len(final),
        "honest_accuracy": sum(m["honest_accuracy"] for m in final) / len(final),
        "byzantine_nodes": total["byzantine_nodes"],
        "average_model_accuracy": sum(m["average_model_accuracy"] for m in final) / len(final),
        "prequential_accuracy": prequential.accuracy,
        "prequential_loss": prequential.mean_loss,
        "bytes_sent": total["bytes_sent"],
        "messages": total["messages"],
        "syncs": stats.pop("syncs"),
        "steps": s.steps,
        "node_steps": total["node_steps"],
        "wall_seconds": round(wall, 3),
        "bytes_last_20pct": tail[-1]["bytes"] - tail[0]["bytes"] if len(tail) > 1 else 0,
        "messages_lost": total["messages_lost"],
        "messages_rejected": total["messages_rejected"],
        "final_eval_steps": sorted(finals),
        "drifts": drift_recovery(metrics, drift_events),
        **stats,
        "metrics": metrics,
    }
    if s.communities:
        per_node = torch.tensor([m["own_accuracy_nodes"] for m in final]).mean(0)
        summary["final_own_accuracy"] = float(per_node.mean())
        summary["own_accuracy_nodes"] = per_node.tolist()
        summary["channels"] = [
            {
                "name": channel.name,
                "protocol": channel.protocol.label,
                "shared": channel.part.schema.names,
                "shared_params": channel.part.schema.numel,
                "members": channel.members,
                "bytes_sent": total["channel_bytes"][c],
                "messages": total["channel_messages"][c],
                "syncs": total["channel_syncs"][c],
                "refused": total["channel_refused"][c],
            }
            for c, channel in enumerate(channels)
        ]
    return summary
