"""The simulated network: per-link latency and bandwidth, per-sender uplink queueing, loss,
and nodes going offline and back. Deterministic for a seed."""

from __future__ import annotations

import random

import networkx as nx

from p2pfl.simulator.scenario import NetworkConfig


class SimNetwork:
    """Decides when (and whether) a message of ``size`` bytes from ``src`` reaches ``dst``."""

    def __init__(self, graph: nx.Graph, config: NetworkConfig, seed: int) -> None:
        self.config = config
        self.rng = random.Random(seed)
        self.latency = {}
        for u, v in graph.edges:
            base = config.latency + self.rng.uniform(0, config.jitter)
            self.latency[(u, v)] = self.latency[(v, u)] = base
        self.uplink_free = [0.0] * graph.number_of_nodes()
        self.online = [True] * graph.number_of_nodes()
        self.bytes_sent = 0
        self.messages = 0
        self.lost = 0

    def transmit(self, now: float, src: int, dst: int, size: int) -> float | None:
        """Account a message; return its arrival time, or None if it is lost."""
        self.bytes_sent += size
        self.messages += 1
        start = max(now, self.uplink_free[src])
        self.uplink_free[src] = start + size / self.config.bandwidth
        if self.config.loss and self.rng.random() < self.config.loss:
            self.lost += 1
            return None
        latency = self.latency.get((src, dst), self.config.latency + self.config.jitter)
        return self.uplink_free[src] + latency

    def churn(self) -> tuple[list[int], list[int]]:
        """One step of churn: which nodes go offline and which come back."""
        gone, back = [], []
        if not self.config.churn:
            return gone, back
        for node, up in enumerate(self.online):
            if up and self.rng.random() < self.config.churn:
                gone.append(node)
            elif not up and self.rng.random() < self.config.rejoin:
                back.append(node)
        for node in gone:
            self.online[node] = False
        for node in back:
            self.online[node] = True
        return gone, back
