"""A simulation split into shards by node ranges, on Ray workers (or in one process).

Each shard is a ``Simulation`` over a contiguous range of nodes: it trains those nodes, runs
their cores and keeps their events; a message to a node of another shard goes to its outbox
and the driver hands it over. Everything random is tied to who decides, not to the order of
decisions (see ``network.py``, ``NodeDataBank.draw``'s window, the engine's event order), so
a sharded run takes the same decisions as one process: same bytes, messages, syncs and
models, the same summary.

Shards advance together in windows (conservative parallel discrete-event simulation): no
message arrives sooner than ``lookahead`` (the network's minimum latency) after it is sent,
so once every shard has processed its events earlier than ``horizon = earliest pending
event + lookahead``, no message can still arrive before ``horizon``. A tick is one or more
windows until the horizon passes the tick's time; the last one also trains and, when due,
measures. Messages cross shards once per window, in one call per shard.

Backends: ``ray`` (one actor per shard; ``address`` of an existing cluster, or a local one
started on first use) and ``local`` (shards called one after the other in this process: the
same results, for tests and debugging).
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from p2pfl.simulator.channels import Channel
from p2pfl.simulator.engine import (
    Event,
    Prepared,
    Simulation,
    final_eval_steps,
    measured_at,
    summarize,
)
from p2pfl.simulator.scenario import ScenarioError

BACKENDS = ("ray", "local")


def shard_ranges(nodes: int, shards: int) -> list[range]:
    """``shards`` contiguous node ranges of (almost) equal size."""
    if not 1 <= shards <= nodes:
        raise ScenarioError(f"shards must be between 1 and the number of nodes ({nodes})")
    edges = [round(i * nodes / shards) for i in range(shards + 1)]
    return [range(a, b) for a, b in zip(edges, edges[1:], strict=False)]


class Shard:
    """One shard of a run: a ``Simulation`` over ``nodes``, advanced one window at a time."""

    def __init__(
        self,
        prepared: Prepared,
        run: str,
        nodes: range,
        vectorised: bool = True,
        threads: int = 0,
    ) -> None:
        """``run`` is a protocol of the scenario, or "alone"/"communities" for a scenario with
        communities. ``threads``: torch threads in this shard (0 keeps the default)."""
        if threads:
            torch.set_num_threads(threads)
        self.sim = Simulation(
            prepared, run, run_channels(prepared, run), vectorised=vectorised, nodes=nodes
        )
        self.finals = set(final_eval_steps(prepared.scenario.steps))

    def advance(
        self, t: int, inbound: list[Event], horizon: float, begin: bool
    ) -> tuple[list[Event], float, dict[str, Any] | None]:
        """Take ``inbound`` messages; at the tick's first window start the tick; deliver what
        is due before ``horizon``; if the horizon is past the tick's time, train (and measure
        when due). Returns the outbox, the next pending event time and the metrics part."""
        sim = self.sim
        s = sim.prepared.scenario
        now = t * s.network.step_time
        sim.accept(inbound)
        if begin:
            sim.begin_tick(t, now)
        sim.deliver(now, horizon)
        part = None
        if horizon > now:
            sim.train(now)
            if measured_at(s, t, self.finals):
                part = sim.local_metrics()
        outbox, sim.outbox = sim.outbox, []
        return outbox, sim.next_event, part

    def measure(self, parts: list[dict[str, Any]], t: int, now: float) -> dict[str, Any]:
        """The metrics row from every shard's part (``Simulation.measure``)."""
        return self.sim.measure(parts, t, now)

    def drift_events(self) -> Any:
        """The task's drift events over the run (``ChangingTask.events``)."""
        return self.sim.task.events(self.sim.prepared.scenario.steps)

    def totals(self) -> dict[str, Any]:
        """The shard's counters for the summary."""
        return self.sim.totals()

    def peak_mb(self) -> float:
        """Peak resident memory of the process this shard runs in (MB)."""
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def cpu_seconds(self) -> float:
        """CPU time of the process this shard runs in."""
        return time.process_time()


def run_channels(prepared: Prepared, run: str) -> list[Channel] | None:
    """The channels of a run: None (the scenario graph, one protocol) without communities;
    else the communities for "communities" and none at all for "alone"."""
    if not prepared.scenario.communities:
        return None
    return prepared.communities if run == "communities" else []


class ShardedRun:
    """One run of a scenario split over ``shards`` shards (see the module docstring)."""

    def __init__(
        self,
        prepared: Prepared,
        run: str,
        shards: int,
        backend: str = "ray",
        address: str | None = None,
        vectorised: bool = True,
        threads: int = 1,
    ) -> None:
        if backend not in BACKENDS:
            raise ScenarioError(f"backend must be one of {', '.join(BACKENDS)}")
        scenario = prepared.scenario
        if scenario.network.latency <= 0:
            raise ScenarioError(
                "a sharded run needs network.latency > 0 (shards advance in windows of the "
                "minimum latency); set e.g. network.latency = 0.002 or run in one process"
            )
        self.scenario, self.run_name = scenario, run
        self.channels = run_channels(prepared, run) or []
        self.ranges = shard_ranges(scenario.nodes, shards)
        self.shard_of = [i for i, r in enumerate(self.ranges) for _ in r]
        self._local: list[Shard] = []
        if backend == "local":
            self._local = [Shard(prepared, run, r, vectorised, threads) for r in self.ranges]
            return
        ray = _ray(address)
        remote = ray.remote(num_cpus=1)(Shard)
        shared = ray.put(prepared)
        self._actors = [remote.remote(shared, run, r, vectorised, threads) for r in self.ranges]
        self._ray = ray

    def _call(self, method: str, per_shard: Sequence[tuple[Any, ...]]) -> list[Any]:
        if self._local:
            return [getattr(s, method)(*a) for s, a in zip(self._local, per_shard, strict=True)]
        futures = [
            getattr(actor, method).remote(*a)
            for actor, a in zip(self._actors, per_shard, strict=True)
        ]
        return self._ray.get(futures)

    def _call_first(self, method: str, args: tuple[Any, ...]) -> Any:
        if self._local:
            return getattr(self._local[0], method)(*args)
        return self._ray.get(getattr(self._actors[0], method).remote(*args))

    def run(self, on_tick: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Run all steps; the same summary as ``Simulation.run`` in one process."""
        s = self.scenario
        lookahead = s.network.latency
        count = len(self.ranges)
        inbound: list[list[Event]] = [[] for _ in range(count)]
        pending = [math.inf] * count
        metrics: list[dict[str, Any]] = []
        started = time.perf_counter()
        self.windows = 0
        for t in range(1, s.steps + 1):
            now = t * s.network.step_time
            begin = True
            while True:
                earliest = min(min(pending), *(e[0] for box in inbound for e in box), now)
                horizon = earliest + lookahead
                results = self._call("advance", [(t, box, horizon, begin) for box in inbound])
                self.windows += 1
                begin = False
                inbound = [[] for _ in range(count)]
                for outbox, _, _ in results:
                    for event in outbox:
                        inbound[self.shard_of[event[4][2]]].append(event)
                pending = [nxt for _, nxt, _ in results]
                if horizon > now:
                    break
            parts = [part for _, _, part in results]
            if parts[0] is not None:  # shard 0 scores the average model
                metrics.append(self._call_first("measure", (parts, t, now)))
            if on_tick is not None:
                on_tick(t)
        wall = time.perf_counter() - started
        totals = self._call("totals", [()] * count)
        drifts = self._call_first("drift_events", ())
        return summarize(s, self.run_name, self.channels, metrics, totals, wall, drifts)

    def close(self) -> None:
        """Stop the shards' actors (a local Ray cluster started for the run stops when this
        process ends)."""
        if self._local:
            return
        for actor in self._actors:
            self._ray.kill(actor)
        self._actors = []

    def shard_stats(self, method: str) -> list[Any]:
        """``Shard.peak_mb`` or ``cpu_seconds`` of every shard."""
        return self._call(method, [()] * len(self.ranges))


def _ray(address: str | None) -> Any:
    """The ``ray`` module, connected to ``address`` (or a local cluster) if not yet."""
    try:
        import ray
    except ImportError:
        raise ScenarioError(
            "sharding over Ray needs the ray package: pip install 'p2pfl[ray]'"
        ) from None
    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ScenarioError(
                f"cannot connect to the Ray cluster at {address!r}: {exc}; give --ray-address "
                "as the cluster's address (e.g. auto on a cluster node, or ray://head:10001)"
            ) from None
    return ray
