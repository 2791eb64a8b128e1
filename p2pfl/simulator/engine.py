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
from p2pfl.simulator.channels import (
    Channel,
    ModelInfo,
    community_channels,
    union_graph,
    whole_model_channel,
)
from p2pfl.simulator.network import SimNetwork
from p2pfl.simulator.objectives import OwnObjectives
from p2pfl.simulator.scenario import Scenario
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


class _Port:
    """The driver of one node's core in one channel: sends and timers go to the simulation."""

    __slots__ = ("sim", "channel", "node")

    def __init__(self, sim: Simulation, channel: int, node: int) -> None:
        self.sim, self.channel, self.node = sim, channel, node

    def send(self, now: float, to: str, message: Message) -> None:
        self.sim._send(now, self.channel, self.node, int(to), message)

    def set_timer(self, at: float, key: Hashable) -> None:
        self.sim._push(at, "timer", (self.channel, self.node, key))


class Simulation:
    """One run on one prepared scenario: every node trains on its own data and syncs over the
    channels it is a member of."""

    def __init__(
        self, prepared: Prepared, protocol: str, channels: Sequence[Channel] | None = None
    ) -> None:
        """Without ``channels``, every node runs ``protocol`` over its whole model and the
        scenario graph (one channel). With ``channels`` (a scenario's communities, or none at
        all to train alone) ``protocol`` only names the run."""
        s = prepared.scenario
        self.prepared = prepared
        self.protocol = protocol
        bank = NodeDataBank(
            [d.x_train for d in prepared.nodes],
            [d.y_train for d in prepared.nodes],
            s.batch_size,
            s.seed,
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
        models = [NodeModel(self.learner, i, len(d.y_train)) for i, d in enumerate(prepared.nodes)]
        # Per channel: member -> runtime of its core; per node: its (channel, runtime) pairs.
        self.runtimes: list[dict[int, CoreRuntime]] = []
        self.node_runtimes: list[list[tuple[int, CoreRuntime]]] = [[] for _ in range(s.nodes)]
        self.attackers = Attackers(parse_byzantine(s.byzantine), s.nodes, s.seed)
        for c, channel in enumerate(self.channels):
            members: dict[int, CoreRuntime] = {}
            for i in channel.members:
                members[i] = open_core(
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
                members[i].core = self.attackers.wrap(i, members[i].core)
                self.node_runtimes[i].append((c, members[i]))
            self.runtimes.append(members)
        self.cores: list[NodeCore] = [r.core for members in self.runtimes for r in members.values()]
        self.gates = SimGates(
            [channel.admission for channel in self.channels],
            [channel.graph for channel in self.channels],
            self,
        )
        self.channel_bytes = [0] * len(self.channels)
        self.channel_messages = [0] * len(self.channels)
        self.objectives = (
            OwnObjectives(prepared.nodes, prepared.dataset.num_classes) if s.communities else None
        )
        rng = random.Random(s.seed)
        self.speeds = torch.tensor(
            [1.0 - s.network.speed_spread * rng.random() for _ in range(s.nodes)]
        )
        self.events: list[tuple[float, int, str, Any]] = []
        self._seq = 0
        self.x_test = prepared.dataset.x_test
        self.task = ChangingTask(prepared.dataset, prepared.nodes, bank, self.objectives)
        self.rejected = 0
        # Each batch scored before it is trained on: over the run, and since the last eval.
        self.prequential, self.prequential_window = Prequential(), Prequential()

    # -- actions -----------------------------------------------------------------------------
    def _push(self, at: float, kind: str, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self.events, (at, self._seq, kind, payload))

    def _send(self, now: float, channel: int, src: int, dst: int, message: Message) -> None:
        """Move a message of ``src``'s core in ``channel`` to ``dst``. A send to a node that is
        offline, or not in the channel, fails at once (as a daemon's send to a peer it cannot
        reach): nothing goes out and the sender's core is told."""
        if (
            not self.net.online[dst]
            or dst not in self.runtimes[channel]
            or not self.gates.admits(channel, src, dst)
        ):
            self.runtimes[channel][src].send_failed(now, str(dst))
            return
        size = encoded_size(message, self.channels[channel].part.schema)
        self.channel_bytes[channel] += size
        self.channel_messages[channel] += 1
        arrival = self.net.transmit(now, src, dst, size)
        if arrival is not None:
            self._push(arrival, "msg", (channel, src, dst, _snapshot(message)))

    def _deliver_due(self, now: float) -> None:
        while self.events and self.events[0][0] <= now:
            at, _, kind, payload = heapq.heappop(self.events)
            if kind == "timer":
                channel, node, key = payload
                self.runtimes[channel][node].timer(at, key)
                continue
            channel, src, dst, message = payload
            if not self.net.online[dst]:
                self.net.lost += 1
                continue
            if kind == "hello":
                self.gates.hello(at, channel, src, dst, message)
                continue
            if self.gates.frame(at, channel, src, dst) is not None:
                self.gates.refused[channel] += 1
                continue
            params = getattr(message, "params", None)
            if isinstance(params, torch.Tensor) and not all_finite(params):
                self.rejected += 1
                log.warning("node %d rejected a message from %d: params contain NaN/inf", dst, src)
                continue
            self.runtimes[channel][dst].message(at, str(src), message)

    def _notify(self, nodes: list[int], went_down: bool, now: float) -> None:
        """Tell the neighbours of ``nodes`` in each channel that they went down or came up
        (with admission: their connections end, or they say hello again)."""
        for node in nodes:
            for c, _ in self.node_runtimes[node]:
                if self.gates.gated(c):
                    (self.gates.went_down if went_down else self.gates.came_up)(now, c, node)
                    continue
                for peer in self.channels[c].graph.neighbors(node):
                    runtime = self.runtimes[c][peer]
                    if went_down:
                        runtime.peer_down(now, str(node))
                    else:
                        runtime.peer_up(now, str(node))

    # -- admission (``SimGates`` calls these) ------------------------------------------------
    def core_peer_up(self, now: float, channel: int, node: int, peer: int) -> None:
        self.runtimes[channel][node].peer_up(now, str(peer))

    def core_peer_down(self, now: float, channel: int, node: int, peer: int) -> None:
        self.runtimes[channel][node].peer_down(now, str(peer))

    def send_hello(self, now: float, channel: int, src: int, dst: int, hello: Hello) -> None:
        arrival = self.net.transmit(now, src, dst, len(hello.to_bytes()))
        if arrival is not None:
            self._push(arrival, "hello", (channel, src, dst, hello))

    # -- run ---------------------------------------------------------------------------------
    def run(self, on_tick: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Run all steps; return the run's summary with its metrics time series."""
        s = self.prepared.scenario
        finals = set(final_eval_steps(s.steps))
        metrics: list[dict[str, Any]] = []
        progress = torch.zeros(s.nodes)
        node_steps = 0
        started = time.perf_counter()
        for t in range(1, s.steps + 1):
            now = t * s.network.step_time
            self.task.advance(t)
            if t == 1:
                self.gates.start(now)
            gone, back = self.net.churn()
            self._notify(gone, True, now)
            self._notify(back, False, now)
            self._deliver_due(now)
            before = progress.floor()
            progress += self.speeds
            due = (progress.floor() > before) & torch.tensor(self.net.online)
            active = due.nonzero().flatten()
            if len(active):
                result = self.learner.step(active)
                self.prequential.add(result)
                self.prequential_window.add(result)
                node_steps += len(active)
                for node in active.tolist():
                    for _, runtime in self.node_runtimes[node]:
                        runtime.local_step(now)
            if t % s.eval_every == 0 or t in finals or t == s.steps:
                metrics.append(self._measure(t, now))
            if on_tick is not None:
                on_tick(t)
        wall = time.perf_counter() - started
        return self._summary(metrics, finals, node_steps, wall)

    def _measure(self, t: int, now: float) -> dict[str, Any]:
        acc = loss = torch.zeros(self.learner.num_nodes)
        avg_acc = avg_loss = 0.0
        for share, y_test in self.task.test_labels:  # one set, or two mixed in a transition
            acc_c, loss_c = self.learner.evaluate(self.x_test, y_test)
            acc, loss = acc + share * acc_c, loss + share * loss_c
            avg_acc_c, avg_loss_c = self.learner.evaluate_average(self.x_test, y_test)
            avg_acc, avg_loss = avg_acc + share * avg_acc_c, avg_loss + share * avg_loss_c
        window, self.prequential_window = self.prequential_window, Prequential()
        w = self.learner.stacked()
        divergence = float((w - w.mean(0)).square().sum(1).mean())
        own = {}
        if self.objectives is not None:
            per_node = self.objectives.accuracy(self.learner)
            own = {"own_accuracy": float(per_node.mean()), "own_accuracy_nodes": per_node.tolist()}
        return {
            "protocol": self.protocol,
            "step": t,
            "time": round(now, 6),
            "accuracy": float(acc.mean()),
            "accuracy_min": float(acc.min()),
            "honest_accuracy": float(acc[self.attackers.honest(len(acc))].mean()),
            "loss": float(loss.mean()),
            "average_model_accuracy": avg_acc,
            "average_model_loss": avg_loss,
            "prequential_accuracy": window.accuracy,
            "prequential_loss": window.mean_loss,
            "concept": self.task.state.concept,
            "divergence": divergence,
            "bytes": self.net.bytes_sent,
            "messages": self.net.messages,
            "syncs": sum(c.stats.syncs for c in self.cores),
            "online": sum(self.net.online),
            **own,
        }

    def _summary(
        self, metrics: list[dict[str, Any]], finals: set[int], node_steps: int, wall: float
    ) -> dict[str, Any]:
        s = self.prepared.scenario
        final = [m for m in metrics if m["step"] in finals] or metrics[-1:]
        tail_start = s.steps - s.steps // 5
        tail = [m for m in metrics if m["step"] >= tail_start]
        stats = CoreStats().as_dict()
        for core in self.cores:
            for k, v in core.stats.as_dict().items():
                stats[k] += v
        summary = {
            "protocol": self.protocol,
            "final_accuracy": sum(m["accuracy"] for m in final) / len(final),
            "final_loss": sum(m["loss"] for m in final) / len(final),
            "honest_accuracy": sum(m["honest_accuracy"] for m in final) / len(final),
            "byzantine_nodes": sorted(self.attackers.nodes),
            "average_model_accuracy": sum(m["average_model_accuracy"] for m in final) / len(final),
            "prequential_accuracy": self.prequential.accuracy,
            "prequential_loss": self.prequential.mean_loss,
            "bytes_sent": self.net.bytes_sent,
            "messages": self.net.messages,
            "syncs": stats.pop("syncs"),
            "steps": s.steps,
            "node_steps": node_steps,
            "wall_seconds": round(wall, 3),
            "bytes_last_20pct": tail[-1]["bytes"] - tail[0]["bytes"] if len(tail) > 1 else 0,
            "messages_lost": self.net.lost,
            "messages_rejected": self.rejected,
            "final_eval_steps": sorted(finals),
            "drifts": drift_recovery(metrics, self.task.events(s.steps)),
            **stats,
            "metrics": metrics,
        }
        if self.objectives is not None:
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
                    "bytes_sent": self.channel_bytes[c],
                    "messages": self.channel_messages[c],
                    "syncs": sum(r.core.stats.syncs for r in self.runtimes[c].values()),
                    "refused": self.gates.refused[c],
                }
                for c, channel in enumerate(self.channels)
            ]
        return summary
