"""The batched protocol path: each core class's vectorised local-step condition (``which_act``)
equals calling its cores one by one, and a simulation with the vectorised path ends exactly
as one that calls every core on every step (every protocol, churn and loss on)."""

from __future__ import annotations

import copy
import dataclasses
import random

import pytest
import torch

from p2pfl.protocol.config import parse_protocol
from p2pfl.protocol.core import make_core
from p2pfl.protocol.dynamic import (
    BLOCKS,
    DISTANCE_BLOCK,
    UNCALIBRATED,
    DynamicCore,
    squared_distances,
)
from p2pfl.simulator.batched_protocol import StackedCores
from p2pfl.simulator.engine import Simulation, prepare
from p2pfl.simulator.scenario import ScenarioError, load_scenario
from p2pfl.simulator.sharding import ShardedRun

PROTOCOLS = (
    "none",
    "continuous",
    "periodic:b=3",
    "gossip:b=2",
    "dynamic:rel=0.0005,b=2",
    "dynamic:rel=0.0005,b=2,condition=coherent",
    "dynamic:rel=0.0005,b=2,condition=growth,window=4",
    "dynamic:rel=0.0005,b=2,condition=distance",
)


class Row:
    """A node's model as the cores read it."""

    def __init__(self, w: torch.Tensor) -> None:
        self.w = w

    def read(self) -> torch.Tensor:
        return self.w

    @property
    def samples(self) -> int:
        return 10


def random_cores(spec: str, count: int, seed: int) -> list:
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    cores = []
    for i in range(count):
        base = torch.randn(40, generator=gen)
        core = make_core(str(i), parse_protocol(spec), Row(base.clone()), ["a", "b"], seed=i)
        core.step = rng.randrange(0, 12)
        if rng.random() < 0.3:
            core.down = {"a", "b"}
        if isinstance(core, DynamicCore):
            core.steps_since_sync = rng.randrange(0, 9)
            core.quiet_until = rng.choice([0, 0, core.step + rng.randrange(0, 4)])
            if rng.random() < 0.2:
                core.membership = object()  # type: ignore[assignment]
            scale = rng.choice([0.0, 0.01, 0.03, 0.1, 1.0])
            core.model.w = base + scale * torch.randn(40, generator=gen)
        cores.append(core)
    return cores


def rows_of(cores: list):
    """``read(rows)`` of the cores' models."""
    return lambda rows: torch.stack([cores[r].model.read() for r in rows])


def acts(core) -> bool:
    """Whether ``on_local_step`` does more than count: actions, or any other state change."""
    probe = copy.deepcopy(core)
    clocks = type(probe).step_counters + ("_first_step_at", "_last_step_at")
    before = {k: v for k, v in vars(probe).items() if k not in clocks}
    before_stats = dataclasses.asdict(probe.stats)
    actions = probe.on_local_step(0.0)
    after = {k: v for k, v in vars(probe).items() if k not in clocks}
    changed = any(
        not (after[k] is before[k] or _same(after[k], before[k])) for k in before if k != "stats"
    )
    return bool(actions) or changed or dataclasses.asdict(probe.stats) != before_stats


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return torch.equal(a, b)
    try:
        return bool(a == b)
    except (TypeError, RuntimeError):
        return False


@pytest.mark.parametrize("spec", ["none", "continuous", "periodic:b=3", "gossip:b=2"])
@pytest.mark.parametrize("seed", [0, 1])
def test_which_act_equals_calling_each_core(spec, seed):
    cores = random_cores(spec, 60, seed)
    stacked = StackedCores(cores, lambda rows: torch.stack([cores[r].model.read() for r in rows]))
    rows = torch.arange(len(cores))
    mask = type(cores[0]).which_act(cores[0].config, stacked.state, rows, stacked.read)
    assert mask.tolist() == [acts(core) for core in cores]


def with_check_state(cores: list, seed: int) -> list:
    """Dynamic cores whose smoothed model / coherent sum / growth's noise rate and CUSUM are
    somewhere between checks."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    for core in cores:
        if core._checked is not None:
            core._checked = core.reference + rng.choice([0.0, 0.02, 0.2]) * torch.randn(
                40, generator=gen
            )
        if core._noise_rate is not None:
            core._noise_rate = rng.choice([UNCALIBRATED, 0.0, 0.0005, 0.005, 0.05])
            core._excess = rng.choice([0.0, -0.05, 0.01])
        core._coherence = rng.choice([0.0, 0.005, 0.05, 0.5])
    return cores


def check_state(core) -> tuple:
    """The state a dynamic condition keeps from check to check."""
    return (copy.deepcopy(core._checked), core._coherence, core._noise_rate, core._excess)


def same_check_state(a: tuple, b: tuple) -> bool:
    return all(_same(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("condition", ["distance", "smoothed", "coherent", "growth,window=4"])
@pytest.mark.parametrize(
    "spec", ["dynamic:rel=0.0005,b=2", "dynamic:delta=0.05,b=1", "dynamic:b=3"]
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dynamic_condition_vectorised_equals_per_node(spec, condition, seed):
    """Which cores violate, and the condition's state (smoothed model, coherent sum) of those
    that do not, exactly as calling each core; the state of those that act is left for them."""
    for rows in (torch.arange(80), torch.arange(0, 80, 3)):
        cores = with_check_state(random_cores(f"{spec},condition={condition}", 80, seed), seed)
        probes = [copy.deepcopy(core) for core in cores]
        before = [check_state(c) for c in cores]
        violated = []
        for r in rows.tolist():
            count = probes[r].stats.violations
            probes[r].on_local_step(0.0)
            violated.append(probes[r].stats.violations > count)
        stacked = StackedCores(cores, rows_of(cores))
        mask = DynamicCore.which_act(cores[0].config, stacked.state, rows, stacked.read)
        assert mask.tolist() == violated
        if len(rows) == len(cores):
            assert any(violated) and not all(violated)  # both outcomes are exercised
        for r, acted in zip(rows.tolist(), violated, strict=True):
            core = stacked.core(r)
            assert same_check_state(
                check_state(core), before[r] if acted else check_state(probes[r])
            )


def test_dynamic_threshold_exactly_at_delta_agrees():
    """At ``||w - r||² == Δ`` both forms say "no violation": the drift is the same number."""
    cores = random_cores("dynamic:b=1,condition=distance", 20, 3)
    for core in cores:
        core.quiet_until, core.membership = 0, None
        core._delta = core.drift()  # exactly on the threshold
    stacked = StackedCores(cores, lambda rows: torch.stack([cores[r].model.read() for r in rows]))
    rows = torch.arange(len(cores))
    mask = DynamicCore.which_act(cores[0].config, stacked.state, rows, stacked.read)
    assert not mask.any() and not any(acts(c) for c in cores)
    for core in cores:
        core._delta = float(torch.tensor(core.drift()).nextafter(torch.tensor(-1.0)))
    stacked = StackedCores(cores, stacked.read)
    assert DynamicCore.which_act(cores[0].config, stacked.state, rows, stacked.read).all()


def test_squared_distances_one_row_equals_many():
    w, r = torch.randn(300, 513), torch.randn(300, 513)
    many = squared_distances(w, r)
    assert torch.equal(
        many, torch.stack([squared_distances(w[i : i + 1], r[i : i + 1])[0] for i in range(300)])
    )


def scenario(**extra):
    settings = {
        "nodes": 14,
        "steps": 160,
        "seed": 3,
        "eval_every": 40,
        "partition": "dirichlet:alpha=0.5",
        "network": {
            "loss": 0.05,
            "churn": 0.01,
            "rejoin": 0.2,
            "jitter": 0.002,
            "speed_spread": 0.3,
        },
    }
    return load_scenario(None, settings | extra)


def comparable(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k != "wall_seconds"}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_vectorised_path_equals_per_node_path(protocol):
    prepared = prepare(scenario(protocols=(protocol,)))
    fast = Simulation(prepared, protocol, vectorised=True)
    slow = Simulation(prepared, protocol, vectorised=False)
    a, b = fast.run(), slow.run()
    assert comparable(a) == comparable(b)
    assert a["node_steps"] < 14 * 160  # churn did happen
    if protocol != "none":
        assert a["syncs"] > 0 and a["messages_lost"] > 0
    assert torch.equal(fast.learner.stacked(), slow.learner.stacked())
    for x, y in zip(fast.cores, slow.cores, strict=True):
        assert x.state_dict().keys() == y.state_dict().keys()
        assert x.step == y.step and x.stats == y.stats


def test_vectorised_path_equals_per_node_path_with_communities():
    communities = [
        {"name": "body", "members": "0-9", "shared": ["fc1.*"], "protocol": "dynamic:rel=0.0005"},
        {"name": "heads", "members": "4-13", "shared": ["head.*"], "protocol": "periodic:b=4"},
    ]
    s = scenario(communities=communities, partition="labels:k=4,min=6,max=60")
    prepared = prepare(s)
    a = Simulation(prepared, "communities", prepared.communities, vectorised=True).run()
    b = Simulation(prepared, "communities", prepared.communities, vectorised=False).run()
    assert comparable(a) == comparable(b)
    assert all(c["syncs"] > 0 for c in a["channels"])


# Sums of floats that a sharded run adds in another order: the divergence and the average
# model (float64 parameter sums), and the prequential scores (float32 sums per step).
REORDERED = (
    "divergence",
    "average_model_accuracy",
    "average_model_loss",
    "prequential_accuracy",
    "prequential_loss",
)


def assert_same_run(a: dict, b: dict) -> None:
    """Equal summaries: every count, the accuracies and the losses of the nodes exactly; sums
    in another order (``REORDERED``) to 1e-6."""
    rows = list(zip(a["metrics"], b["metrics"], strict=True))
    for x, y in [(a, b), *rows]:
        assert {k: v for k, v in x.items() if k not in REORDERED + ("metrics", "wall_seconds")} == {
            k: v for k, v in y.items() if k not in REORDERED + ("metrics", "wall_seconds")
        }
        for key in set(REORDERED) & set(x):
            assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-12), key


@pytest.mark.parametrize("protocol", ["dynamic:rel=0.0005,b=2", "gossip:b=2", "continuous"])
def test_sharded_run_equals_one_process(protocol):
    s = scenario(protocols=(protocol,))
    one = Simulation(prepare(s), protocol).run()
    sharded = ShardedRun(prepare(s), protocol, 3, backend="local")
    assert_same_run(sharded.run(), one)
    assert sharded.windows > s.steps  # messages did cross shards within ticks


def test_sharded_run_equals_one_process_under_gradual_drift_and_lr_schedule():
    protocol = "dynamic:rel=0.0005,b=2"
    s = scenario(
        protocols=(protocol,),
        dataset="digits:drift_every=50,transition=gradual,drift_width=20",
        lr_schedule="cosine:min=0.1,warmup=10",
    )
    one = Simulation(prepare(s), protocol).run()
    assert len({m["concept"] for m in one["metrics"]}) > 1
    assert_same_run(ShardedRun(prepare(s), protocol, 2, backend="local").run(), one)


def test_sharded_communities_equal_one_process():
    communities = [
        {"name": "body", "members": "0-9", "shared": ["fc1.*"], "protocol": "dynamic:rel=0.0005"},
        {"name": "heads", "members": "4-13", "shared": ["head.*"], "protocol": "gossip:b=3"},
    ]
    s = scenario(communities=communities, partition="labels:k=4,min=6,max=60", steps=100)
    prepared = prepare(s)
    one = Simulation(prepared, "communities", prepared.communities).run()
    assert_same_run(ShardedRun(prepared, "communities", 2, backend="local").run(), one)


def test_sharding_refuses_zero_latency():
    s = scenario(network={"latency": 0.0})
    with pytest.raises(ScenarioError, match="network.latency > 0"):
        ShardedRun(prepare(s), "dynamic", 2, backend="local")


@pytest.mark.slow
def test_ray_sharded_run_equals_one_process():
    """Two Ray workers on a local cluster this test starts (and shuts down)."""
    ray = pytest.importorskip("ray")
    protocol = "dynamic:rel=0.0005,b=2"
    s = scenario(protocols=(protocol,), steps=100)
    one = Simulation(prepare(s), protocol).run()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert_same_run(ShardedRun(prepare(s), protocol, 2, backend="ray").run(), one)
    finally:
        ray.shutdown()


@pytest.mark.parametrize("condition", ["smoothed", "coherent"])
def test_the_vectorised_check_reuses_its_block_buffers(condition):
    """The check's temporaries (megabytes a block at the benchmark's model size) are taken
    from ``BLOCKS``: the same storage from block to block and call to call, not allocated
    afresh (which cost page faults); with three blocks a call, it still equals each core."""
    spec = f"dynamic:rel=0.0005,b=1,condition={condition}"
    cores = with_check_state(random_cores(spec, 2 * DISTANCE_BLOCK + 12, 4), 4)
    violated = []
    for probe in map(copy.deepcopy, cores):
        count = probe.stats.violations
        probe.on_local_step(0.0)
        violated.append(probe.stats.violations > count)
    stacked = StackedCores(cores, rows_of(cores))
    rows = torch.arange(len(cores))
    assert DynamicCore.which_act(cores[0].config, stacked.state, rows, stacked.read).tolist() == (
        violated
    )
    held = {name: buf.data_ptr() for name, buf in BLOCKS._store.items()}
    assert {"reference", "checked", "move", "scratch"} <= set(held)
    DynamicCore.which_act(cores[0].config, stacked.state, rows, stacked.read)
    assert {name: buf.data_ptr() for name, buf in BLOCKS._store.items()} == held
