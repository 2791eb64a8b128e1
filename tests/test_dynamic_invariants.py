"""Invariants of the default ``dynamic`` protocol: uniform merges keep the global mean over
many overlapping sessions on a random graph; a node whose drift stays within Δ never starts
a session (a network that stays within Δ is silent); traffic resumes after concept drift.

The first ones run the cores in the kit's ``VirtualNet`` (the runtime over fake models, the
real wire codec, a virtual clock with latency and jitter, and timers); the last one runs the
simulator on digits.
"""

from __future__ import annotations

import random

import networkx as nx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kit import SEEDS, FakeModel, VirtualNet

from p2pfl.protocol.config import parse_protocol
from p2pfl.protocol.core import make_core
from p2pfl.protocol.correction import CORRECTION_STEPS, correction_gain
from p2pfl.protocol.dynamic import DynamicCore
from p2pfl.simulator.engine import Simulation, prepare
from p2pfl.simulator.scenario import load_scenario
from p2pfl.wire.messages import Busy, ModelReply, Pull

DIM = 32
TICK = 0.01
CLASSIC = "dynamic:condition=distance"  # the paper's condition ||w − r||² > Δ


def network(
    graph: nx.Graph,
    models: list[torch.Tensor],
    seed: int,
    jitter: float,
    spec: str = "dynamic",
) -> VirtualNet:
    """``spec`` cores on ``graph``; messages arrive after 2 ms plus uniform ``jitter``."""
    adjacency = {str(i): {str(j) for j in graph[i]} for i in graph}
    start = {str(i): w for i, w in enumerate(models)}
    return VirtualNet(spec, adjacency, start, seed=seed, latency=0.002, jitter=jitter, dim=DIM)


def sent(net: VirtualNet) -> list[tuple[str, str, object]]:
    """(src, dst, message) of every send."""
    return [(src, dst, m) for _, src, dst, m in net.log]


def random_graph(n: int, seed: int) -> nx.Graph:
    """A connected Erdős–Rényi graph (redrawn until connected)."""
    for attempt in range(100):
        graph = nx.erdos_renyi_graph(n, 0.3, seed=seed * 100 + attempt)
        if nx.is_connected(graph):
            return graph
    raise AssertionError("no connected graph drawn")


def start_models(n: int, gen: torch.Generator) -> list[torch.Tensor]:
    """A common start plus a little noise: ||w||² ≈ DIM, so the default Δ = rel·||r||²."""
    base = torch.randn(DIM, generator=gen)
    return [base + 0.01 * torch.randn(DIM, generator=gen) for _ in range(n)]


# -- uniform merges keep the global mean --
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dynamic_without_outer_step_keeps_the_global_mean_on_a_random_graph(seed):
    """(The outer step moves each member beyond the average, by design.)"""
    n, ticks = 12, 400
    gen = torch.Generator().manual_seed(seed)
    net = network(random_graph(n, seed), start_models(n, gen), seed, jitter=0.03, spec=CLASSIC)
    before = net.mean()
    rng = random.Random(seed)
    for _ in range(ticks):
        net.advance(net.now + TICK)
        for node in net.cores:
            if rng.random() < 0.8:
                # a steady per-node pull (non-IID-like drift) plus noise
                change = 0.01 * torch.randn(DIM, generator=gen) + 0.002 * (int(node) - n / 2)
                net.step(node, change)
    net.settle()
    # many real sessions, overlapping each other (busy refusals or coordinators giving way)
    assert net.stat("sessions") >= 100
    assert net.stat("syncs") >= 300
    assert net.stat("refused_busy") + net.stat("gave_way") > 0
    assert not any(c.busy for c in net.cores.values())
    # the mean moved by exactly the local steps: merging added or lost nothing
    torch.testing.assert_close(net.mean(), before + net.added / n, atol=1e-4, rtol=0)
    # and merging really kept the models together (alone the pulls would spread them)
    assert net.spread() < 0.01 * net.spread(alone=True)


# -- drift corrections: zero-sum over a group, gain compounding for rare syncs --
@pytest.mark.parametrize("steps", [2, 8, 16, 40, 200])
def test_drift_corrections_sum_to_zero_and_compound_for_rare_syncs(steps):
    base = torch.ones(DIM)  # ||r||² = DIM: the default Δ = rel · DIM
    net = network(nx.path_graph(2), [base, base], seed=0, jitter=0.0, spec=CLASSIC)
    lam, eta = net.config.correction, net.cores["0"].step_size
    one = torch.zeros(DIM)
    one[0] = 1e-4
    for _ in range(steps - 1):  # tiny steps: both stay within Δ, nothing is sent
        net.step("0", one)
        net.step("1", -one)
    assert net.log == []
    net.step("1", -one)
    net.step("0", torch.ones(DIM))  # an even step (b=2) far beyond Δ: a session of two
    net.settle()
    assert net.stat("syncs") == 2
    c0, c1 = net.corrections["0"], net.corrections["1"]
    torch.testing.assert_close(c0 + c1, torch.zeros(DIM), atol=1e-6, rtol=0)
    gain = lam if steps <= CORRECTION_STEPS else 1 - (1 - lam) ** (steps / CORRECTION_STEPS)
    assert correction_gain(lam, steps) == pytest.approx(gain)
    sent0, sent1 = base + torch.ones(DIM) + one * (steps - 1), base - one * steps
    average = (sent0 + sent1) / 2
    torch.testing.assert_close(c0, gain * (sent0 - average) / (eta * steps))


# -- no traffic within Δ --
def within(reference: torch.Tensor, target: torch.Tensor, delta: float) -> torch.Tensor:
    """``target`` pulled back into the ball ``||w - r||² <= 0.99 Δ``."""
    offset = target - reference
    limit = (0.99 * delta) ** 0.5
    norm = float(offset.norm())
    return reference + offset * min(1.0, limit / norm) if norm > 0 else target


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=SEEDS, scale=st.sampled_from([0.01, 0.1, 1.0, 10.0]))
def test_a_network_that_stays_within_delta_is_silent(seed, scale):
    n = 6
    gen = torch.Generator().manual_seed(seed)
    net = network(random_graph(n, seed % 1000), start_models(n, gen), seed, jitter=0.01)
    for _ in range(60):
        net.advance(net.now + TICK)
        for node, core in net.cores.items():
            assert isinstance(core, DynamicCore)
            w = net.models[node].w
            target = within(core.reference, w + scale * torch.randn(DIM, generator=gen), core.delta)
            net.step(node, target - w)
    net.settle()
    assert net.log == []
    assert net.stat("violations") == net.stat("sessions") == net.stat("syncs") == 0


def test_a_node_within_delta_never_coordinates_while_its_neighbours_do():
    n = 8
    gen = torch.Generator().manual_seed(7)
    graph = nx.complete_graph(n)
    net = network(graph, start_models(n, gen), seed=7, jitter=0.01, spec=CLASSIC)
    quiet = net.cores["0"]
    assert isinstance(quiet, DynamicCore)
    for _ in range(200):
        net.advance(net.now + TICK)
        for node in net.cores:
            w = net.models[node].w
            if node != "0":
                net.step(node, 0.05 * torch.randn(DIM, generator=gen))
            elif not quiet.busy:  # steps only between sessions, so w - r never exceeds Δ
                target = within(quiet.reference, w + torch.randn(DIM, generator=gen), quiet.delta)
                net.step(node, target - w)
    net.settle()
    assert quiet.stats.syncs > 10  # it took part in its neighbours' sessions...
    own = [type(m) for src, _, m in sent(net) if src == "0"]
    assert ModelReply in own and set(own) <= {ModelReply, Busy}  # ...but only answered pulls
    assert quiet.stats.violations == quiet.stats.sessions == 0
    # control: one step beyond Δ on a check step starts a session at once
    while quiet.busy or (quiet.step + 1) % quiet.config.b:
        net.settle()
        net.step("0", torch.zeros(DIM))
    w = net.models["0"].w
    offset = torch.randn(DIM, generator=gen)
    beyond = quiet.reference + offset * (1.01 * quiet.delta) ** 0.5 / offset.norm()
    before = len(net.log)
    net.step("0", beyond - w)
    assert any(src == "0" and isinstance(m, Pull) for src, _, m in sent(net)[before:])


# -- traffic resumes after concept drift --
def test_default_dynamic_traffic_rises_after_concept_drift():
    drift_at, window = 800, 100
    scenario = load_scenario(
        None,
        {
            "nodes": 8,
            "topology": "small-world:k=4,p=0.2",
            "dataset": f"digits:drift_at={drift_at}",
            "partition": "dirichlet:alpha=0.5",
            "model": "mlp",
            "protocols": ("dynamic",),
            "steps": drift_at + window,
            "eval_every": window,
            "seed": 1,
        },
    )
    rows = Simulation(prepare(scenario), "dynamic").run()["metrics"]
    sent = {r["step"]: r["bytes"] for r in rows}
    before = sent[drift_at] - sent[drift_at - window]
    after = sent[drift_at + window] - sent[drift_at]
    assert after > 3 * before, (before, after)


# -- the coherent condition: SGD noise alone is not a violation, a moving optimum is --
@pytest.mark.parametrize(
    ("condition", "noise_violations"),
    [("distance", True), ("coherent", False), ("growth", False)],
)
def test_coherent_condition_ignores_noise_but_not_drift(condition, noise_violations):
    """A model jittering around its optimum (SGD at a constant rate: pulled back by 10 % per
    step, noise 0.1 per entry; ``E||w − r||² ≈ 1.6 > Δ``) and one whose optimum moves."""
    gen = torch.Generator().manual_seed(4)
    start = torch.randn(DIM, generator=gen)
    spec = f"dynamic:delta=0.5,b=2,condition={condition}"

    def violations(speed: float) -> int:
        model = FakeModel(start)
        core = make_core("0", parse_protocol(spec), model, ["1"], seed=0)
        optimum, direction = start.clone(), torch.randn(DIM, generator=gen)
        for _ in range(1000):
            optimum += speed * direction
            noise = 0.1 * torch.randn(DIM, generator=gen)
            model.w = model.w - 0.1 * (model.w - optimum) + noise
            if core.on_local_step(0.0):  # a violation starts a session: let it go
                core.session = None
        return core.stats.violations

    assert (violations(0.0) > 0) == noise_violations
    assert violations(0.01) > 0
