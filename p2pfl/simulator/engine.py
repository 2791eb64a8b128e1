"""The simulation engine: drives one protocol core per node and one learner for all nodes
over a ``SimNetwork`` on a virtual clock. It makes no protocol decision: it only delivers
events to the cores and carries out the actions they return.

One tick of the clock (``network.step_time`` seconds) is: apply concept drift and churn if
due, deliver every message and timer that is due, train every online node whose compute
speed gives it a step in this tick (one batched step), hand each of them ``on_local_step``,
then evaluate if due. Links carry each message's exact encoded size (``encoded_size``, equal
to ``len(encode(...))``); the receiver gets a snapshot of the sent message (what decoding those
bytes yields, checked for NaN/inf like the decoder does) without paying for encode and decode.
"""

from __future__ import annotations

import heapq
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import networkx as nx
import torch
from torch import nn

from p2pfl.data import Dataset, NodeData, load_dataset, split_nodes
from p2pfl.learning.learner import BatchedLearner, Learner, PerNodeLearner, SGDConfig
from p2pfl.learning.sampler import NodeDataBank
from p2pfl.models import build_model
from p2pfl.protocol.actions import Action, ReplaceModel, Send, SetCorrection, SetTimer
from p2pfl.protocol.config import parse_protocol
from p2pfl.protocol.core import NodeCore, make_core
from p2pfl.simulator.network import SimNetwork
from p2pfl.simulator.scenario import Scenario
from p2pfl.topology import build_topology
from p2pfl.wire.codec import all_finite, encoded_size
from p2pfl.wire.messages import Message

log = logging.getLogger("p2pfl.simulator")


@dataclass
class Prepared:
    """What every protocol of a scenario shares: data split, graph and initial model."""

    scenario: Scenario
    dataset: Dataset
    nodes: list[NodeData]
    graph: nx.Graph
    model: nn.Module


def prepare(scenario: Scenario) -> Prepared:
    """Load data, split it over the nodes, build the graph and the initial model."""
    dataset = load_dataset(scenario.dataset, scenario.seed)
    nodes = split_nodes(dataset, scenario.nodes, scenario.partition, scenario.seed)
    graph = build_topology(
        scenario.topology, scenario.nodes, scenario.seed, scenario.allow_disconnected
    )
    model = build_model(scenario.model, dataset.input_shape, dataset.num_classes, scenario.seed)
    return Prepared(scenario, dataset, nodes, graph, model)


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
    """The message as the receiver will see it: parameters copied at send time (cores may
    hand out live views of their model)."""
    params = getattr(message, "params", None)
    return message if params is None else replace(message, params=params.detach().clone())


class _NodeModel:
    """``ModelAccess`` for one row of the learner."""

    def __init__(self, learner: Learner, node: int, samples: int) -> None:
        self.learner, self.node, self._samples = learner, node, samples

    def read(self) -> torch.Tensor:
        return self.learner.get(self.node)

    @property
    def samples(self) -> int:
        return self._samples


class Simulation:
    """One protocol on one prepared scenario."""

    def __init__(self, prepared: Prepared, protocol: str) -> None:
        s = prepared.scenario
        self.prepared = prepared
        self.protocol = protocol
        self.config = parse_protocol(protocol)
        bank = NodeDataBank(
            [d.x_train for d in prepared.nodes],
            [d.y_train for d in prepared.nodes],
            s.batch_size,
            s.seed,
        )
        sgd = SGDConfig(lr=s.lr, momentum=s.momentum)
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
        self.net = SimNetwork(prepared.graph, s.network, s.seed)
        step_size = s.lr / (1 - s.momentum)
        self.cores: list[NodeCore] = [
            make_core(
                str(i),
                self.config,
                _NodeModel(self.learner, i, len(prepared.nodes[i].y_train)),
                (str(j) for j in prepared.graph.neighbors(i)),
                seed=s.seed * 100_003 + i,
                step_size=step_size,
            )
            for i in range(s.nodes)
        ]
        rng = random.Random(s.seed)
        self.speeds = torch.tensor(
            [1.0 - s.network.speed_spread * rng.random() for _ in range(s.nodes)]
        )
        self.events: list[tuple[float, int, str, Any]] = []
        self._seq = 0
        self.x_test, self.y_test = prepared.dataset.x_test, prepared.dataset.y_test
        self.rejected = 0

    # -- actions -----------------------------------------------------------------------------
    def _push(self, at: float, kind: str, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self.events, (at, self._seq, kind, payload))

    def _perform(self, node: int, actions: list[Action], now: float) -> None:
        for action in actions:
            if isinstance(action, Send):
                dst = int(action.to)
                size = encoded_size(action.message, self.schema)
                arrival = self.net.transmit(now, node, dst, size)
                if arrival is not None:
                    self._push(arrival, "msg", (node, dst, _snapshot(action.message)))
            elif isinstance(action, ReplaceModel):
                self.learner.set(node, action.params)
            elif isinstance(action, SetCorrection):
                self.learner.set_correction(node, action.vector)
            elif isinstance(action, SetTimer):
                self._push(action.at, "timer", (node, action.key))

    def _deliver_due(self, now: float) -> None:
        while self.events and self.events[0][0] <= now:
            at, _, kind, payload = heapq.heappop(self.events)
            if kind == "timer":
                node, key = payload
                self._perform(node, self.cores[node].on_timer(at, key), at)
                continue
            src, dst, message = payload
            if not self.net.online[dst]:
                self.net.lost += 1
                continue
            params = getattr(message, "params", None)
            if params is not None and not all_finite(params):
                self.rejected += 1
                log.warning("node %d rejected a message from %d: params contain NaN/inf", dst, src)
                continue
            self._perform(dst, self.cores[dst].on_message(at, str(src), message), at)

    def _notify(self, nodes: list[int], event: str, now: float) -> None:
        for node in nodes:
            for peer in self.prepared.graph.neighbors(node):
                core = self.cores[peer]
                handler: Callable[[float, str], list[Action]] = getattr(core, event)
                self._perform(peer, handler(now, str(node)), now)

    # -- run ---------------------------------------------------------------------------------
    def run(self, on_tick: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Run all steps; return the run's summary with its metrics time series."""
        s = self.prepared.scenario
        drift = self.prepared.dataset.drift
        finals = set(final_eval_steps(s.steps))
        metrics: list[dict[str, Any]] = []
        progress = torch.zeros(s.nodes)
        node_steps = 0
        started = time.perf_counter()
        for t in range(1, s.steps + 1):
            now = t * s.network.step_time
            if drift is not None and t == drift.at_step + 1:
                self._apply_drift()
            gone, back = self.net.churn()
            self._notify(gone, "on_peer_down", now)
            self._notify(back, "on_peer_up", now)
            self._deliver_due(now)
            before = progress.floor()
            progress += self.speeds
            due = (progress.floor() > before) & torch.tensor(self.net.online)
            active = due.nonzero().flatten()
            if len(active):
                self.learner.step(active)
                node_steps += len(active)
                for node in active.tolist():
                    self._perform(node, self.cores[node].on_local_step(now), now)
            if t % s.eval_every == 0 or t in finals or t == s.steps:
                metrics.append(self._measure(t, now))
            if on_tick is not None:
                on_tick(t)
        wall = time.perf_counter() - started
        return self._summary(metrics, finals, node_steps, wall)

    def _apply_drift(self) -> None:
        drift = self.prepared.dataset.drift
        assert drift is not None
        ys = [drift.relabel(d.x_train, d.y_train) for d in self.prepared.nodes]
        self.learner.data.replace_all([d.x_train for d in self.prepared.nodes], ys)
        self.y_test = drift.relabel(self.x_test, self.y_test)

    def _measure(self, t: int, now: float) -> dict[str, Any]:
        acc, loss = self.learner.evaluate(self.x_test, self.y_test)
        w = self.learner.stacked()
        divergence = float((w - w.mean(0)).square().sum(1).mean())
        return {
            "protocol": self.protocol,
            "step": t,
            "time": round(now, 6),
            "accuracy": float(acc.mean()),
            "accuracy_min": float(acc.min()),
            "loss": float(loss.mean()),
            "divergence": divergence,
            "bytes": self.net.bytes_sent,
            "messages": self.net.messages,
            "syncs": sum(c.stats.syncs for c in self.cores),
            "online": sum(self.net.online),
        }

    def _summary(
        self, metrics: list[dict[str, Any]], finals: set[int], node_steps: int, wall: float
    ) -> dict[str, Any]:
        s = self.prepared.scenario
        final = [m for m in metrics if m["step"] in finals] or metrics[-1:]
        tail_start = s.steps - s.steps // 5
        tail = [m for m in metrics if m["step"] >= tail_start]
        stats: dict[str, int] = {}
        for core in self.cores:
            for k, v in core.stats.as_dict().items():
                stats[k] = stats.get(k, 0) + v
        return {
            "protocol": self.protocol,
            "final_accuracy": sum(m["accuracy"] for m in final) / len(final),
            "final_loss": sum(m["loss"] for m in final) / len(final),
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
            **stats,
            "metrics": metrics,
        }
