"""The simulated network: per-link latency and bandwidth, per-sender uplink queueing, loss,
and nodes going offline and back. Deterministic for a seed.

Every random decision is tied to who makes it, not to the order in which the simulation
happens to make it: a message is lost by a draw of its sender's own stream (seed, sender,
how many messages that sender sent before), and churn draws one number per node per step in
one vectorised call. So a simulation split into shards by node ranges takes exactly the same
decisions as one process (``sharding.py``)."""

from __future__ import annotations

import random

import networkx as nx
import torch

from p2pfl.simulator.scenario import NetworkConfig

_MASK = (1 << 64) - 1
CHURN_STREAM = 0x5EED_C4A2


def unit_draw(seed: int, who: int, count: int) -> float:
    """A uniform number in [0, 1) fixed by ``(seed, who, count)`` (splitmix64 finaliser)."""
    x = (seed * 0x9E3779B97F4A7C15 + (who + 1) * 0xBF58476D1CE4E5B9 + count) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return ((x ^ (x >> 31)) >> 11) * 2.0**-53


class SimNetwork:
    """Decides when (and whether) a message of ``size`` bytes from ``src`` reaches ``dst``."""

    def __init__(self, graph: nx.Graph, config: NetworkConfig, seed: int) -> None:
        self.config = config
        self.seed = seed
        rng = random.Random(seed)
        self.latency = {}
        for u, v in graph.edges:
            base = config.latency + rng.uniform(0, config.jitter)
            self.latency[(u, v)] = self.latency[(v, u)] = base
        nodes = graph.number_of_nodes()
        self.uplink_free = [0.0] * nodes
        self.sent_by = [0] * nodes
        self.online = [True] * nodes
        self.online_mask = torch.ones(nodes, dtype=torch.bool)
        self.churn_draws = torch.Generator().manual_seed(seed ^ CHURN_STREAM)
        self.bytes_sent = 0
        self.messages = 0
        self.lost = 0

    @property
    def lookahead(self) -> float:
        """No message arrives sooner than this after it is sent (every link's latency is at
        least ``config.latency``)."""
        return self.config.latency

    def transmit(self, now: float, src: int, dst: int, size: int) -> float | None:
        """Account a message; return its arrival time, or None if it is lost."""
        self.bytes_sent += size
        self.messages += 1
        count = self.sent_by[src]
        self.sent_by[src] = count + 1
        start = max(now, self.uplink_free[src])
        self.uplink_free[src] = start + size / self.config.bandwidth
        if self.config.loss and unit_draw(self.seed, src, count) < self.config.loss:
            self.lost += 1
            return None
        latency = self.latency.get((src, dst), self.config.latency + self.config.jitter)
        return self.uplink_free[src] + latency

    def churn(self) -> tuple[list[int], list[int]]:
        """One step of churn: which nodes go offline and which come back (one draw per node,
        all nodes at once)."""
        if not self.config.churn:
            return [], []
        draw = torch.rand(len(self.online_mask), generator=self.churn_draws)
        up = self.online_mask
        gone = (up & (draw < self.config.churn)).nonzero().flatten().tolist()
        back = (~up & (draw < self.config.rejoin)).nonzero().flatten().tolist()
        for node in gone:
            self.online[node] = False
        for node in back:
            self.online[node] = True
        up[gone] = False
        up[back] = True
        return gone, back
