"""Sans-I/O protocol cores: spec parsing, merge invariants, balancing sessions under delays,
drops, busy, slow and vanished peers, periodic rounds and gossip.

Unit tests call a core's event methods on a fake model and read the actions it returns; network
tests run cores in the kit's ``VirtualNet`` (the runtime on a virtual clock, messages through
the real wire codec).
"""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kit import DIM, GRAPHS, SEEDS, FakeModel, VirtualNet, complete, line, ring, unclipped

from p2pfl.learning.merge import merge
from p2pfl.protocol.actions import ReplaceModel, Send, SetTimer
from p2pfl.protocol.config import parse_protocol
from p2pfl.protocol.core import NodeCore, make_core
from p2pfl.protocol.dynamic import MAX_WIDENING_ROUNDS, DynamicCore
from p2pfl.protocol.round_trip import STRAGGLER_FACTOR
from p2pfl.protocol.scheduled import GossipCore, PeriodicCore
from p2pfl.spec import SpecError
from p2pfl.wire.messages import Average, Busy, ModelReply, Pull, Push

TICK = 0.01


def classic(spec):
    """``spec`` with the paper's condition ``||w − r||² > Δ`` and plain averaging unless it
    says otherwise: the session mechanics below are tested on those (dynamic's defaults, the
    coherent condition and an outer step, have their own tests)."""
    if not spec.startswith("dynamic"):
        return spec
    keys = ("condition=distance", "outer_lr=1", "outer_momentum=0")
    extra = [k for k in keys if k.split("=")[0] not in spec]
    return spec + ("," if ":" in spec else ":") + ",".join(extra)


def classic_net(spec, *args, **kwargs):
    """A ``VirtualNet`` of ``classic(spec)``."""
    return VirtualNet(classic(spec), *args, **kwargs)


def sends_of(actions, kind=None):
    return [
        a for a in actions if isinstance(a, Send) and (kind is None or isinstance(a.message, kind))
    ]


def replaced(actions):
    out = [a.params for a in actions if isinstance(a, ReplaceModel)]
    assert len(out) <= 1
    return out[0] if out else None


def vec(*values):
    return torch.tensor(values + (0.0,) * (DIM - len(values)), dtype=torch.float32)


# -- parse_protocol --
def test_defaults_of_each_kind():
    none = parse_protocol("none")
    assert (none.kind, none.b, none.merge.rule, none.label) == ("none", 1, "uniform", "none")
    periodic = parse_protocol("periodic")
    assert (periodic.kind, periodic.b, periodic.timeout) == ("periodic", 1, 0.5)
    assert parse_protocol("periodic:b=10").b == 10
    gossip = parse_protocol("gossip")
    assert (gossip.kind, gossip.b, gossip.merge.rule) == ("gossip", 1, "uniform")
    dyn = parse_protocol("dynamic")
    assert (dyn.kind, dyn.b, dyn.delta, dyn.rel) == ("dynamic", 2, None, 0.002)
    assert (dyn.condition, dyn.outer) == ("smoothed", None)
    assert parse_protocol("dynamic:outer_momentum=0.9").outer == (1.0, 0.9)
    assert parse_protocol("periodic:outer_lr=0.5").outer == (0.5, 0.0)
    assert parse_protocol("periodic").outer is None
    assert (dyn.group, dyn.cap, dyn.correction, dyn.merge.rule, dyn.timeout) == (
        0,
        0,
        0.1,
        "uniform",
        0.5,
    )
    absolute = parse_protocol("dynamic:delta=0.5,b=3,merge=samples,timeout=0.5")
    assert (absolute.delta, absolute.rel, absolute.b) == (0.5, 0.0, 3)
    assert (absolute.merge.rule, absolute.timeout) == ("samples", 0.5)
    assert parse_protocol("dynamic:delta=inf").delta == math.inf
    assert parse_protocol(" Dynamic:rel=0.01 ").rel == 0.01


def test_continuous_is_periodic_every_step():
    cont = parse_protocol("continuous")
    assert cont.label == "continuous"
    assert dataclasses.replace(cont, text="") == dataclasses.replace(
        parse_protocol("periodic:b=1"), text=""
    )
    assert dataclasses.replace(parse_protocol("continuous:merge=samples"), text="") == (
        dataclasses.replace(parse_protocol("periodic:b=1,merge=samples"), text="")
    )


@pytest.mark.parametrize(
    ("spec", "cls"),
    [
        ("none", NodeCore),
        ("continuous", PeriodicCore),
        ("periodic:b=4", PeriodicCore),
        ("gossip", GossipCore),
        ("dynamic", DynamicCore),
    ],
)
def test_make_core_builds_the_right_policy(spec, cls):
    core = make_core("a", parse_protocol(spec), FakeModel(torch.zeros(DIM)), ["b", "a"])
    assert type(core) is cls
    assert core.neighbors == {"b"}  # never its own neighbour


@pytest.mark.parametrize(
    ("spec", "fragments"),
    [
        ("foo", ["'foo'", "unknown kind", "none, continuous, periodic, gossip, dynamic"]),
        ("dynamic:x=1", ["unknown argument(s) ['x']", "dynamic accepts:", "delta", "rel"]),
        (
            "periodic:c=2",
            [
                "unknown argument(s) ['c']",
                "periodic accepts: against, agreement, b, base, block, boost, clip, codec, "
                "correction, f, floor, key, local, merge, mix, outer_lr, outer_momentum, pace, "
                "scale, "
                "timeout, topk, trim",
            ],
        ),
        ("gossip:outer_momentum=1", ["'outer_momentum'", "must be in [0, 1)"]),
        ("continuous:outer_lr=0", ["'outer_lr'", "positive"]),
        ("periodic:correction=-0.1", ["correction is a damping factor between 0 and 1"]),
        ("none:b=2", ["unknown argument(s) ['b']", "none accepts: none"]),
        ("periodic:b=0", ["'periodic:b=0'", "'b'", "must be >= 1"]),
        ("dynamic:b=0", ["'b'", "must be >= 1"]),
        ("gossip:b=two", ["bad value 'two' for 'b'"]),
        ("dynamic:delta=-1", ["'dynamic:delta=-1'", "'delta'", "must be >= 0"]),
        ("dynamic:rel=-0.1", ["'rel'", "must be >= 0"]),
        ("dynamic:delta=1,rel=0.1", ["either delta (absolute) or rel (relative), not both"]),
        ("periodic:merge=foo", ["merge must be one of uniform, samples, median, trimmed"]),
        ("dynamic:trim=0.5", ["trim is the fraction cut at EACH end"]),
        ("dynamic:clip=-1", ["'clip'", "must be >= 0"]),
        ("gossip:f=x", ["bad value 'x' for 'f'"]),
        ("dynamic:correction=2", ["correction is a damping factor between 0 and 1"]),
        ("dynamic:smoothing=0", ["'smoothing'", "must be >= 1"]),
        ("dynamic:lr_power=5", ["'lr_power'", "between -4 and 4"]),
        ("periodic:lr_power=2", ["unknown argument(s) ['lr_power']"]),
        ("periodic:timeout=0", ["'timeout'", "positive"]),
        ("dynamic:timeout=nan", ["'timeout'", "positive"]),
        ("dynamic:b", ["expected key=value"]),
        ("periodic:b=1,b=2", ["given twice"]),
        ("", ["empty spec"]),
    ],
)
def test_bad_specs_raise_a_helpful_spec_error(spec, fragments):
    with pytest.raises(SpecError) as info:
        parse_protocol(spec)
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize(("smoothing", "violates"), [(1, True), (16, False)])
def test_smoothing_sets_how_much_of_a_jump_the_smoothed_condition_sees(smoothing, violates):
    """A jump of 1 per entry (||w − r||² = DIM) against Δ = DIM/4: with smoothing=1 the
    moving average is the model (the paper's condition), with 16 it moves 1/16 of the way
    (DIM/256) and does not violate yet."""
    model = FakeModel(torch.zeros(DIM))
    spec = f"dynamic:b=1,delta={DIM / 4},smoothing={smoothing}"
    core = make_core("a", parse_protocol(spec), model, ["b"])
    model.w = torch.ones(DIM)
    core.on_local_step(0.0)
    assert core.stats.violations == int(violates)


# -- merge rules --
def test_merge_rules():
    a, b, c = vec(1.0, 0.0), vec(3.0, 6.0), vec(8.0, 3.0)
    torch.testing.assert_close(merge([a, b, c], [1, 1, 1], "uniform"), vec(4.0, 3.0))
    torch.testing.assert_close(merge([a, b, c], [100, 1, 7]), vec(4.0, 3.0))  # default uniform
    weighted = merge([a, b, c], [2, 1, 1], "samples")
    torch.testing.assert_close(weighted, (2 * a + b + c) / 4)
    # a node without samples still counts once, never divides by zero
    torch.testing.assert_close(merge([a, b], [0, 0], "samples"), (a + b) / 2)
    with pytest.raises(ValueError, match="unknown merge rule 'mode'"):
        merge([a, b], [1, 1], "mode")


def run_dynamic(driver, ticks, p_step, rng):
    """``ticks`` ticks of the clock: deliver what is due, then random nodes take a step."""
    nodes = list(driver.cores)
    for _ in range(ticks):
        driver.advance(driver.now + TICK)
        for node in nodes:
            if rng.random() < p_step:
                driver.step(node)
    driver.settle()


# -- uniform merges keep the global mean --
def test_dynamic_sessions_keep_the_global_mean():
    graph = ring(6)
    graph["0"].add("3")
    graph["3"].add("0")
    driver = classic_net("dynamic:delta=0.05,b=1", graph, seed=3, latency=0.004, jitter=0.03)
    before = driver.mean()
    run_dynamic(driver, 80, 0.7, random.Random(3))
    alone = classic_net("none", graph, seed=3)  # the same initial models and local steps
    run_dynamic(alone, 80, 0.7, random.Random(3))
    torch.testing.assert_close(alone.added, driver.added)
    # real sessions happened, overlapping with local steps and with each other
    assert driver.stat("sessions") >= 20
    assert driver.stat("syncs") >= 20
    assert driver.stat("refused_busy") + driver.stat("gave_way") > 0
    assert not any(c.busy for c in driver.cores.values())
    torch.testing.assert_close(driver.mean(), before + driver.added / 6, atol=1e-5, rtol=0)
    # and merging really pulled the models together
    assert driver.stacked().var(0).sum() < 0.5 * alone.stacked().var(0).sum()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=SEEDS,
    n=st.integers(2, 7),
    shape=st.sampled_from(sorted(GRAPHS)),
    delta=st.sampled_from([0.0, 0.01, 0.1, 1.0]),
    b=st.integers(1, 3),
    extra=st.sampled_from(["", ",group=1", ",cap=3", ",cap=2,group=2"]),
    jitter=st.sampled_from([0.0, 0.005, 0.05, 3.0]),  # 3 s: beyond the 2 s timeout
    p_step=st.floats(0.2, 1.0),
    ticks=st.integers(1, 40),
)
def test_mean_is_preserved_over_random_session_interleavings(
    seed, n, shape, delta, b, extra, jitter, p_step, ticks
):
    graph = GRAPHS[shape](n) if n >= 3 or shape != "ring" else line(n)
    driver = classic_net(f"dynamic:delta={delta},b={b}{extra}", graph, seed=seed, jitter=jitter)
    before = driver.mean()
    run_dynamic(driver, ticks, p_step, random.Random(seed))
    assert not any(c.busy for c in driver.cores.values())
    torch.testing.assert_close(driver.mean(), before + driver.added / n, atol=1e-5, rtol=0)
    # every Average went to a node that answered the same session with its model
    for _, src, dst, msg in driver.sends(Average):
        assert any(
            isinstance(m, ModelReply) and m.session == msg.session and s == dst and d == src
            for _, s, d, m in driver.log
        )


def test_slow_links_beyond_the_timeout_still_keep_the_mean():
    driver = classic_net("dynamic:delta=0.01,b=1,timeout=2", ring(6), seed=1, jitter=3.0)
    before = driver.mean()
    run_dynamic(driver, 40, 0.7, random.Random(1))
    assert driver.stat("timeouts") > 0 and driver.stat("ignored") > 0  # late replies refused
    assert driver.stat("syncs") > 0
    assert not any(c.busy for c in driver.cores.values())
    torch.testing.assert_close(driver.mean(), before + driver.added / 6, atol=1e-5, rtol=0)


def test_a_member_that_timed_out_still_adopts_the_average_that_counted_its_model():
    """An average slower than the member's wait still reaches a member that gave up but
    stayed idle: its group counted its model, so it adopts it and the mean is kept (found by
    the interleavings property above: node 5 kept its model, the mean moved by 0.14)."""
    driver = classic_net("dynamic:delta=0.0,b=1,group=1", complete(6), seed=1469970, jitter=3.0)
    before = driver.mean()
    run_dynamic(driver, 1, 1.0, random.Random(1469970))
    late = driver.cores["5"].stats
    assert (late.gave_way, late.timeouts, late.syncs, late.ignored) == (1, 1, 1, 0)
    torch.testing.assert_close(driver.mean(), before + driver.added / 6, atol=1e-5, rtol=0)


def test_periodic_on_a_ring_keeps_the_mean():
    driver = classic_net("periodic:b=2", ring(6), seed=1)
    before = driver.mean()
    for _ in range(20):
        driver.advance(driver.now + TICK)
        for node in driver.cores:
            driver.step(node)
    driver.settle()
    assert driver.stat("syncs") == 6 * 10
    assert len(driver.sends(Push)) == 6 * 2 * 10
    torch.testing.assert_close(driver.mean(), before + driver.added / 6, atol=1e-5, rtol=0)


def test_sample_weighted_merge_gives_the_weighted_mean():
    graph = complete(3)
    samples = {"0": 1, "1": 3, "2": 6}
    models = {"0": vec(1.0), "1": vec(2.0), "2": vec(4.0)}
    driver = classic_net("dynamic:delta=0.01,b=1,merge=samples", graph, models, samples=samples)
    driver.step("0", vec(0.0, 1.0))
    weights = torch.tensor([1.0, 3.0, 6.0])[:, None]
    weighted_before = (weights * driver.stacked()).sum(0) / 10
    plain_before = driver.mean()
    driver.settle()
    weighted = (1 * vec(1.0, 1.0) + 3 * vec(2.0) + 6 * vec(4.0)) / 10
    for node in graph:
        torch.testing.assert_close(driver.models[node].w, weighted)
    assert driver.stat("syncs") == 3
    # a sample-weighted merge keeps the weighted mean, not the plain one
    torch.testing.assert_close((weights * driver.stacked()).sum(0) / 10, weighted_before)
    assert (driver.mean() - plain_before).abs().max() > 0.5


def test_periodic_sample_weighted_round():
    cfg = unclipped(parse_protocol("periodic:b=1,merge=samples"))
    model = FakeModel(vec(0.0), samples=2)
    core = make_core("0", cfg, model, ["1"])
    core.on_local_step(0.0)
    got = replaced(core.on_message(0.001, "1", Push(1, vec(6.0), 4)))
    torch.testing.assert_close(got, vec(4.0))


# -- dynamic: the local condition --
def test_delta_zero_syncs_at_every_step():
    n, steps = 5, 12
    driver = classic_net("dynamic:delta=0,b=1", ring(n), seed=2)
    before = driver.mean()
    for _ in range(steps):
        for node in driver.cores:
            sent_before = len(driver.log)
            driver.step(node)
            assert len(driver.log) > sent_before  # this step produced traffic
            driver.advance(driver.now + 0.1)  # immediate delivery, well before any timeout
            assert not driver.cores[node].busy
    assert driver.stat("violations") == n * steps
    assert driver.stat("sessions") == n * steps
    assert driver.cores["0"].stats.syncs >= steps
    torch.testing.assert_close(driver.mean(), before + driver.added / n, atol=1e-5, rtol=0)


def test_delta_zero_with_everyone_stepping_together():
    n, steps = 6, 10
    driver = classic_net("dynamic:delta=0,b=1", ring(n), seed=5)
    for _ in range(steps):
        sent_before = len(driver.log)
        for node in driver.cores:
            driver.step(node)
        assert len(driver.log) > sent_before
        driver.advance(driver.now + TICK)
    assert driver.stat("sessions") >= steps
    assert driver.stat("syncs") >= steps


def test_delta_zero_needs_a_changed_model():
    driver = classic_net("dynamic:delta=0,b=1", ring(3), seed=0)
    for _ in range(5):
        driver.step("0", torch.zeros(DIM))
    assert driver.log == []
    assert driver.cores["0"].stats.violations == 0


def test_delta_inf_never_sends():
    driver = classic_net("dynamic:delta=inf,b=1", complete(6), seed=4, step_scale=10.0)
    for _ in range(100):
        driver.advance(driver.now + TICK)
        for node in driver.cores:
            driver.step(node)
    driver.settle()
    assert driver.log == []
    assert driver.stat("violations") == driver.stat("sessions") == driver.stat("syncs") == 0


def test_condition_is_checked_every_b_steps_only():
    driver = classic_net("dynamic:delta=0,b=3", line(2), seed=0)
    for step in range(1, 10):
        driver.step("0")
        driver.settle()
        assert driver.cores["0"].stats.violations == step // 3


def test_relative_delta_scales_with_the_reference():
    model = FakeModel(torch.full((DIM,), 2.0))
    core = make_core(
        "0", unclipped(parse_protocol(classic("dynamic:rel=0.015625,b=1"))), model, ["1"]
    )
    assert core.delta == 0.5  # rel * ||r||² = 1/64 * 4 * 8
    model.w = model.w + 0.25  # ||w - r||² = 0.0625 * 8 == Δ: not above it
    assert core.on_local_step(0.0) == []
    model.w = model.w + 0.125
    assert [type(a.message) for a in sends_of(core.on_local_step(0.0))] == [Pull]


def test_lr_power_scales_delta_by_the_step_size_against_its_peak():
    model = FakeModel(torch.full((DIM,), 2.0))
    spec = classic("dynamic:rel=0.015625,b=1,lr_power=2")
    core = make_core("0", unclipped(parse_protocol(spec)), model, ["1"], step_size=0.1)
    assert core.delta == 0.5  # at the peak step size: the default's Δ
    core.step_size = 0.05  # the schedule halved the rate; Δ follows at the next agreement
    assert core.delta == 0.5
    agreed = model.read().clone()
    core._adopt(agreed, model.read().clone(), 1, lesson=agreed)
    assert core.delta == pytest.approx(0.5 * 0.25)  # (0.05 / 0.1)²
    core.step_size = 0.2  # a restart above the old peak: that is the new peak
    agreed = model.read().clone()
    core._adopt(agreed, model.read().clone(), 1, lesson=agreed)
    assert core.delta == 0.5 and core.peak_step_size == 0.2
    core.step_size = 0.1
    again = make_core("0", unclipped(parse_protocol(spec)), FakeModel(model.read()), ["1"])
    again.load_state_dict(core.state_dict())  # the peak survives a restart
    assert again.peak_step_size == 0.2 and again.delta == pytest.approx(0.5 * 0.25)


def test_lr_power_changes_nothing_at_a_constant_rate():
    model = FakeModel(torch.full((DIM,), 2.0))
    cores = [
        make_core("0", unclipped(parse_protocol(classic(s))), model, ["1"], step_size=0.1)
        for s in ("dynamic:rel=0.01,b=1", "dynamic:rel=0.01,b=1,lr_power=2")
    ]
    for core in cores:
        agreed = model.read() + 1.0
        core._adopt(agreed, model.read().clone(), 1, lesson=agreed)
    assert cores[0].delta == cores[1].delta


def test_widening_doubles_the_group_through_members_neighbours():
    models = {str(i): vec(0.0) for i in range(4)}
    driver = classic_net("dynamic:delta=1,b=1,group=0,cap=0", line(4), models)
    driver.step("0", vec(10.0))
    driver.settle()
    # 0 asks 1; the mean of {0, 1} is still far from 0's reference, so it asks 2 (a
    # neighbour of 1, not of 0), then 3
    assert [d for _, _, d, _ in driver.sends(Pull, src="0")] == ["1", "2", "3"]
    for node in models:
        torch.testing.assert_close(driver.models[node].w, vec(2.5))
    assert driver.cores["0"].stats.sessions == 1
    assert driver.stat("syncs") == 4


@pytest.mark.parametrize("cap", [2, 3])
def test_cap_bounds_the_group(cap):
    models = {str(i): vec(0.0) for i in range(4)}
    driver = classic_net(f"dynamic:delta=1,b=1,cap={cap}", line(4), models)
    driver.step("0", vec(12.0))
    driver.settle()
    members = [str(i) for i in range(cap)]
    for node in members:
        torch.testing.assert_close(driver.models[node].w, vec(12.0 / cap))
    for node in set(models) - set(members):
        torch.testing.assert_close(driver.models[node].w, vec(0.0))


def test_group_limits_the_first_pull():
    driver = classic_net("dynamic:delta=0,b=1,group=2", complete(6), seed=1)
    driver.step("0")
    assert len(driver.sends(Pull, src="0")) == 2


def test_small_session_is_at_most_three_nodes():
    """With ``group=2,cap=3`` a coordinator pulls 2 of its neighbours and its group never
    grows past 3 nodes, even when the average is still far from its reference; a group
    short of 3 (a node with one live neighbour) is filled up through a member."""
    models = {str(i): vec(0.0) for i in range(6)}
    driver = classic_net("dynamic:delta=1,b=1,group=2,cap=3", complete(6), models, seed=1)
    driver.step("0", vec(12.0))
    driver.settle()
    asked = [d for _, _, d, _ in driver.sends(Pull, src="0")]
    assert len(asked) == 2
    for node in ["0", *asked]:
        torch.testing.assert_close(driver.models[node].w, vec(4.0))
    assert driver.stat("syncs") == 3
    models = {str(i): vec(0.0) for i in range(4)}
    driver = classic_net("dynamic:delta=1,b=1,group=2,cap=3", line(4), models)
    driver.step("0", vec(12.0))
    driver.settle()
    assert [d for _, _, d, _ in driver.sends(Pull, src="0")] == ["1", "2"]
    torch.testing.assert_close(driver.models["3"].w, vec(0.0))


def test_widening_stops_after_the_round_limit():
    n = MAX_WIDENING_ROUNDS + 4
    models = {str(i): vec(0.0) for i in range(n)}
    driver = classic_net("dynamic:delta=0.001,b=1,group=0,cap=0", line(n), models, wire=False)
    driver.step("0", vec(1000.0))
    driver.settle()
    # on a line the group grows by one per round: first pull plus MAX_WIDENING_ROUNDS rounds
    assert len(driver.sends(Pull, src="0")) == 1 + MAX_WIDENING_ROUNDS
    assert not driver.cores["0"].busy


# -- dynamic: busy, offline, slow and vanished peers --
def test_coordinator_resolves_without_a_silent_neighbour_once_it_is_a_straggler():
    """1 answers within a round trip of 2 ms; 2 never will: the session is resolved once 2
    is ``STRAGGLER_FACTOR`` round trips late, not at the timeout (1 s)."""
    models = {"0": vec(0.0), "1": vec(2.0), "2": vec(5.0)}
    graph = {"0": {"1", "2"}, "1": {"0"}, "2": {"0"}}
    driver = classic_net("dynamic:delta=0.01,b=1,timeout=1", graph, models)
    driver.offline.add("2")
    driver.step("0", vec(4.0))
    a = driver.cores["0"]
    driver.advance(0.005)
    assert a.busy and driver.cores["1"].busy  # 1 answered; 2 never will
    torch.testing.assert_close(driver.models["0"].w, vec(4.0))
    driver.advance(0.002 * STRAGGLER_FACTOR + 0.002)  # the cut-off, then the average reaches 1
    assert not a.busy and not driver.cores["1"].busy
    assert a.stats.timeouts == 0 and a.stats.stragglers == 1
    torch.testing.assert_close(driver.models["0"].w, vec(3.0))
    torch.testing.assert_close(driver.models["1"].w, vec(3.0))
    torch.testing.assert_close(driver.models["2"].w, vec(5.0))
    assert [d for _, _, d, _ in driver.sends(Average)] == ["1"]
    torch.testing.assert_close(a.reference, vec(3.0))


def test_coordinator_with_nobody_answering_backs_off():
    driver = classic_net(
        "dynamic:delta=0.01,b=1,timeout=1", line(2), {"0": vec(0.0), "1": vec(0.0)}
    )
    driver.offline.add("1")
    driver.step("0", vec(1.0))
    driver.advance(1.0)
    a = driver.cores["0"]
    assert not a.busy and a.stats.timeouts == 1 and a.stats.syncs == 0
    torch.testing.assert_close(driver.models["0"].w, vec(1.0))  # nothing was replaced
    assert a.quiet_until > a.step
    pulls = len(driver.sends(Pull))
    while a.step + 1 < a.quiet_until:
        driver.step("0", vec(0.1))
        assert len(driver.sends(Pull)) == pulls  # quiet: no new session
    driver.step("0", vec(0.1))
    assert len(driver.sends(Pull)) == pulls + 1  # the condition is checked again


def test_late_model_reply_after_resolution_gets_busy_back():
    models = {"0": vec(0.0), "1": vec(2.0), "2": vec(5.0)}
    graph = {"0": {"1", "2"}, "1": {"0"}, "2": {"0"}}
    driver = classic_net("dynamic:delta=0.01,b=1,timeout=1", graph, models)
    driver.delay = lambda src, dst, msg: 3.0 if src == "2" else None  # 2 is slow
    driver.step("0", vec(4.0))
    driver.advance(1.5)
    assert not driver.cores["0"].busy
    late = driver.cores["2"]
    assert not late.busy  # released by the coordinator when its session timed out
    driver.advance(4.0)  # its reply arrives at 3.001 and gets one more Busy back
    busy = driver.sends(Busy, src="0", dst="2")
    session = driver.sends(Pull, dst="2")[0][3].session
    assert len(busy) == 2 and all(b[3].session == session for b in busy)
    assert late.stats.timeouts == 0
    torch.testing.assert_close(driver.models["2"].w, vec(5.0))
    torch.testing.assert_close(driver.models["0"].w, vec(3.0))
    assert driver.cores["0"].stats.ignored == 1


def test_member_whose_coordinator_vanishes_keeps_its_own_model():
    driver = classic_net(
        "dynamic:delta=0.01,b=1,timeout=1", line(2), {"0": vec(0.0), "1": vec(7.0)}
    )
    driver.step("0", vec(1.0))
    driver.advance(0.0015)  # the pull reached 1, which answered
    member = driver.cores["1"]
    assert member.busy
    driver.offline.add("0")  # and the coordinator is gone before the reply arrives
    for _ in range(5):
        driver.step("1", vec(0.5))
    assert member.stats.violations == 0  # busy nodes do not check the condition
    driver.advance(1.0 * (MAX_WIDENING_ROUNDS + 2) - 0.01)
    assert member.busy  # waits as long as a full widening could take
    driver.advance(1.0 * (MAX_WIDENING_ROUNDS + 2) + 0.01)
    assert not member.busy and member.stats.timeouts == 1
    torch.testing.assert_close(driver.models["1"].w, vec(9.5))
    torch.testing.assert_close(member.reference, vec(7.0))
    driver.offline.clear()
    driver.step("1", vec(0.5))  # free again: it starts its own session
    assert member.session is not None


def test_member_drops_out_when_its_coordinator_goes_down():
    driver = classic_net(
        "dynamic:delta=0.01,b=1", line(3), {"0": vec(0.0), "1": vec(1.0), "2": vec(3.0)}
    )
    driver.drop = lambda src, dst, msg: isinstance(msg, ModelReply)
    driver.step("0", vec(1.0))
    driver.advance(0.01)
    member = driver.cores["1"]
    assert member.busy
    assert member.on_peer_down(driver.now, "0") == []
    assert not member.busy
    assert member.live_neighbors == ["2"]
    torch.testing.assert_close(driver.models["1"].w, vec(1.0))


def test_coordinator_stops_waiting_for_a_neighbour_that_goes_down():
    models = {"0": vec(0.0), "1": vec(2.0), "2": vec(5.0)}
    graph = {"0": {"1", "2"}, "1": {"0"}, "2": {"0"}}
    driver = classic_net("dynamic:delta=0.01,b=1", graph, models)
    driver.offline.add("2")
    driver.step("0", vec(4.0))
    driver.advance(0.005)  # 1 answered; 2 is not a straggler yet
    coordinator = driver.cores["0"]
    assert coordinator.busy
    driver.peer_down("0", "2")
    assert not coordinator.busy and coordinator.stats.timeouts == 0
    assert coordinator.stats.stragglers == 0
    driver.advance(driver.now + 0.01)
    torch.testing.assert_close(driver.models["1"].w, vec(3.0))
    # the next session does not ask the peer that is down
    driver.step("0", vec(1.0))
    assert [d for _, _, d, _ in driver.sends(Pull)][-1:] == ["1"]
    assert len(driver.sends(Pull, dst="2")) == 1


def test_busy_member_refuses_a_second_coordinator():
    # 1 is a member of 0's slow session when 2 asks it: 2 goes on without it
    models = {"0": vec(0.0), "1": vec(1.0), "2": vec(3.0), "3": vec(6.0)}
    graph = {"0": {"1"}, "1": {"0", "2"}, "2": {"1", "3"}, "3": {"2"}}
    driver = classic_net("dynamic:delta=0.01,b=1,cap=2", graph, models)
    driver.delay = lambda src, dst, msg: 0.5 if isinstance(msg, ModelReply) and src == "1" else None
    driver.step("0", vec(1.0))
    driver.advance(0.01)
    assert driver.cores["1"].busy
    driver.step("2", vec(1.0))
    driver.settle()
    assert driver.cores["1"].stats.refused_busy == 1
    torch.testing.assert_close(driver.models["2"].w, vec(5.0))  # (4 + 6) / 2
    torch.testing.assert_close(driver.models["3"].w, vec(5.0))
    torch.testing.assert_close(driver.models["0"].w, vec(1.0))  # (1 + 1) / 2
    torch.testing.assert_close(driver.models["1"].w, vec(1.0))


@pytest.mark.parametrize("seed", range(5))
def test_two_neighbours_violating_together_both_finish(seed):
    driver = classic_net(
        "dynamic:delta=0.01,b=1", line(2), {"0": vec(0.0), "1": vec(0.0)}, seed=seed
    )
    driver.step("0", vec(2.0))
    driver.step("1", vec(4.0))
    ids = {n: driver.cores[n].session.id for n in ("0", "1")}
    low, high = sorted(ids, key=ids.get)
    driver.settle()
    assert not driver.cores["0"].busy and not driver.cores["1"].busy
    for node in ("0", "1"):
        torch.testing.assert_close(driver.models[node].w, vec(3.0))
        torch.testing.assert_close(driver.cores[node].reference, vec(3.0))
    averages = driver.sends(Average)
    assert [(s, m.session) for _, s, _, m in averages] == [(low, ids[low])]
    assert driver.cores[high].stats.gave_way == 1
    assert driver.cores[low].stats.gave_way == 0


@pytest.mark.parametrize("seed", range(5))
def test_many_simultaneous_violations_never_deadlock(seed):
    n = 5
    driver = classic_net("dynamic:delta=0.01,b=1", complete(n), seed=seed, jitter=0.002)
    before = driver.mean()
    for node in driver.cores:
        driver.step(node, torch.randn(DIM, generator=driver.gen))
    assert all(c.session is not None for c in driver.cores.values())
    driver.advance(0.5)  # well before any timeout
    assert not any(c.busy for c in driver.cores.values())
    driver.settle()
    assert driver.stat("timeouts") == 0
    assert driver.stat("syncs") >= 2
    torch.testing.assert_close(driver.mean(), before + driver.added / n, atol=1e-5, rtol=0)


def test_stale_average_is_ignored():
    model = FakeModel(vec(1.0))
    core = make_core(
        "1", unclipped(parse_protocol(classic("dynamic:delta=0.01,b=1"))), model, ["0", "2"]
    )
    assert core.on_message(0.0, "0", Average(7, vec(9.0))) == []  # no session at all
    assert core.stats.ignored == 1
    core.on_message(0.0, "0", Pull(42))
    assert core.on_message(0.1, "2", Average(42, vec(9.0))) == []  # not our coordinator
    assert core.on_message(0.1, "0", Average(41, vec(9.0))) == []  # another session
    assert core.stats.ignored == 3 and core.busy
    torch.testing.assert_close(model.w, vec(1.0))
    torch.testing.assert_close(replaced(core.on_message(0.2, "0", Average(42, vec(9.0)))), vec(9.0))
    assert not core.busy and core.stats.syncs == 1
    assert core.on_message(0.3, "0", Average(42, vec(5.0))) == []  # a duplicate is stale too
    assert core.stats.ignored == 4


def test_busy_for_another_session_does_not_release_a_member():
    core = make_core(
        "1",
        unclipped(parse_protocol(classic("dynamic:delta=0.01,b=1"))),
        FakeModel(vec(1.0)),
        ["0", "2"],
    )
    core.on_message(0.0, "0", Pull(42))
    core.on_message(0.0, "2", Busy(42))  # wrong sender
    core.on_message(0.0, "0", Busy(43))  # wrong session
    assert core.busy
    core.on_message(0.0, "0", Busy(42))
    assert not core.busy


def test_local_steps_during_a_session_are_kept():
    cfg = unclipped(parse_protocol(classic("dynamic:delta=0.01,b=1")))
    ma, mb = FakeModel(vec(0.0)), FakeModel(vec(4.0, 1.0))
    a = make_core("A", cfg, ma, ["B"], seed=1)
    b = make_core("B", cfg, mb, ["A"], seed=2)
    ma.w = ma.w + vec(2.0)
    (pull,) = sends_of(a.on_local_step(0.0))
    a_sent = ma.w.clone()
    (reply,) = sends_of(b.on_message(0.01, "A", pull.message))
    b_sent = mb.w.clone()
    # both keep training while the session is in flight
    mb.w = mb.w + vec(0.0, 0.5, 0.25)
    assert b.on_local_step(0.02) == []
    mb.w = mb.w + vec(0.0, 0.5)
    assert b.on_local_step(0.03) == []
    ma.w = ma.w + vec(0.0, 0.0, 0.0, 1.0)
    assert a.on_local_step(0.03) == []
    actions = a.on_message(0.04, "B", reply.message)
    (avg,) = sends_of(actions, Average)
    average = (a_sent + b_sent) / 2
    torch.testing.assert_close(avg.message.params, average)
    ma.w = replaced(actions)
    torch.testing.assert_close(ma.w, average + vec(0.0, 0.0, 0.0, 1.0))
    mb.w = replaced(b.on_message(0.05, "A", avg.message))
    torch.testing.assert_close(mb.w, average + vec(0.0, 1.0, 0.25))
    torch.testing.assert_close(a.reference, average)
    torch.testing.assert_close(b.reference, average)


def test_pull_from_lower_session_makes_a_coordinator_give_way():
    cfg = unclipped(parse_protocol(classic("dynamic:delta=0.01,b=1")))
    model = FakeModel(vec(0.0))
    core = make_core("1", cfg, model, ["0", "2"], seed=0)
    model.w = vec(1.0)
    pulls = sends_of(core.on_local_step(0.0))
    assert sorted(p.to for p in pulls) == ["0", "2"]
    own = core.session.id
    # a higher id is refused...
    assert [type(a.message) for a in sends_of(core.on_message(0.0, "0", Pull(own + 1)))] == [Busy]
    assert core.session is not None and core.stats.refused_busy == 1
    # ...a lower one wins: we release the peers we asked and join
    actions = core.on_message(0.0, "2", Pull(own - 1))
    released = sorted(a.to for a in sends_of(actions, Busy) if a.message.session == own)
    assert released == ["0", "2"]
    (reply,) = sends_of(actions, ModelReply)
    assert reply.to == "2" and reply.message.session == own - 1
    assert reply.message.neighbors == ["0", "2"]
    assert core.session is None and core.membership is not None
    assert core.stats.gave_way == 1


def test_drift_correction_on_by_default_and_off_with_zero():
    zero = {"0": vec(0.0), "1": vec(0.0)}
    driver = classic_net("dynamic:delta=0.01,b=1,correction=0", line(2), zero)
    driver.step("0", vec(1.0))
    driver.settle()
    assert driver.stat("syncs") == 2 and driver.corrections == {}
    driver = classic_net("dynamic:delta=0.01,b=1", line(2), zero)  # default λ = 0.1, η = 0.1
    driver.step("1", vec(0.0, 0.05))
    driver.step("0", vec(1.0))
    driver.settle()
    # c += λ (w_sent - average) / (η K), K = 1 local step each
    torch.testing.assert_close(driver.corrections["0"], vec(0.5, -0.025))
    torch.testing.assert_close(driver.corrections["1"], vec(-0.5, 0.025))


def _corrections_after_one_session(steps_a, steps_b):
    zero = {"0": vec(0.0), "1": vec(0.0)}
    driver = classic_net("dynamic:delta=0.5,b=1,correction=1", line(2), zero, wire=False)
    for _ in range(steps_b):
        driver.step("1", vec(0.0, 0.1))
    for _ in range(steps_a - 1):
        driver.step("0", vec(0.0, 0.0, 0.1))
    driver.step("0", vec(2.0))
    driver.settle()
    assert driver.stat("syncs") == 2
    return driver.corrections["0"], driver.corrections["1"]


def test_drift_correction_sums_to_zero_for_equal_step_counts():
    c0, c1 = _corrections_after_one_session(3, 3)
    assert c0.abs().sum() > 0
    torch.testing.assert_close(c0 + c1, torch.zeros(DIM), atol=1e-6, rtol=0)


def test_drift_correction_sums_to_zero_over_the_group():
    c0, c1 = _corrections_after_one_session(3, 1)
    torch.testing.assert_close(c0 + c1, torch.zeros(DIM), atol=1e-6, rtol=0)


# -- periodic --
def periodic_core(spec="periodic:b=2", w=None, neighbors=("1", "2")):
    model = FakeModel(w if w is not None else vec(0.0))
    return make_core("0", unclipped(parse_protocol(spec)), model, neighbors), model


def test_periodic_round_completes_when_all_live_neighbours_arrived():
    core, model = periodic_core()
    assert core.on_local_step(0.0) == []  # step 1: not a round
    model.w = vec(3.0)
    actions = core.on_local_step(0.01)
    pushes = sends_of(actions, Push)
    assert sorted(p.to for p in pushes) == ["1", "2"]
    assert {p.message.round for p in pushes} == {1}
    assert [a.key for a in actions if isinstance(a, SetTimer)] == [("round", 1)]
    assert core.on_message(0.02, "1", Push(1, vec(6.0), 10)) == []
    model.w = model.w + vec(0.0, 1.0)  # a local step while the round is open is kept
    got = replaced(core.on_message(0.03, "2", Push(1, vec(0.0, 3.0), 10)))
    torch.testing.assert_close(got, vec(3.0, 2.0))
    assert core.stats.syncs == 1 and core.open_round is None


def test_periodic_skips_neighbours_that_are_down():
    core, model = periodic_core(w=vec(2.0))
    core.on_peer_down(0.0, "2")
    core.on_local_step(0.0)
    actions = core.on_local_step(0.01)
    assert [p.to for p in sends_of(actions, Push)] == ["1"]
    got = replaced(core.on_message(0.02, "1", Push(1, vec(4.0), 10)))
    torch.testing.assert_close(got, vec(3.0))
    core.on_peer_up(0.03, "2")
    assert core.live_neighbors == ["1", "2"]


def test_periodic_timer_completes_the_round_with_what_arrived():
    core, model = periodic_core(w=vec(2.0))
    core.on_local_step(0.0)
    core.on_local_step(0.01)
    core.on_message(0.02, "1", Push(1, vec(5.0), 10))
    assert core.on_timer(1.0, ("round", 0)) == []  # not this round's timer
    got = replaced(core.on_timer(2.01, ("round", 1)))
    torch.testing.assert_close(got, vec(3.5))
    assert core.stats.timeouts == 1
    # the straggler's model of a finished round changes nothing later
    assert core.on_message(2.5, "2", Push(1, vec(100.0), 10)) == []
    assert core.on_local_step(2.6) == []
    assert core.stats.syncs == 1
    core.on_local_step(2.7)
    core.on_message(2.8, "1", Push(2, vec(4.0), 10))
    got = replaced(core.on_message(2.8, "2", Push(2, vec(6.0), 10)))
    torch.testing.assert_close(got, vec(4.0))  # (2 + 4 + 6) / 3: the straggler is not used
    assert core.inbox == {}  # nothing old is kept around


def test_periodic_next_round_closes_an_open_one():
    core, model = periodic_core(w=vec(2.0))
    core.on_local_step(0.0)
    core.on_local_step(0.01)
    core.on_message(0.02, "1", Push(1, vec(4.0), 10))
    core.on_local_step(0.03)
    got = replaced(core.on_local_step(0.04))  # round 2 starts: round 1 finishes first
    torch.testing.assert_close(got, vec(3.0))
    assert core.open_round == 2


def test_periodic_keeps_unmatched_rounds_as_a_fallback_and_ignores_foreign_ones():
    core, model = periodic_core(w=vec(2.0))
    core.on_local_step(0.0)
    core.on_local_step(0.01)  # round 1 open
    for sender, msg in [
        ("1", Push(0, vec(50.0), 10)),  # past: a fallback
        ("1", Push(4, vec(50.0), 10)),  # too far ahead: a fallback
        ("1", Push(-1, vec(50.0), 10)),  # a gossip hop
        ("9", Push(1, vec(50.0), 10)),  # not a neighbour
    ]:
        assert core.on_message(0.02, sender, msg) == []
    assert core.stats.ignored == 2 and core.stats.unmatched == 2
    # an early model of the next round is kept for that round
    assert core.on_message(0.02, "2", Push(2, vec(8.0), 10)) == []
    core.on_message(0.02, "1", Push(1, vec(4.0), 10))
    got = replaced(core.on_message(0.02, "2", Push(1, vec(6.0), 10)))
    torch.testing.assert_close(got, vec(4.0))  # (2 + 4 + 6) / 3, no 50 anywhere
    core.on_local_step(0.03)
    model.w = vec(2.0)
    actions = core.on_local_step(0.04)  # round 2: 2's model is already here
    assert replaced(actions) is None
    got = replaced(core.on_message(0.05, "1", Push(2, vec(5.0), 10)))
    torch.testing.assert_close(got, vec(5.0))  # (2 + 5 + 8) / 3


def test_periodic_merges_a_late_push_when_its_peer_misses_the_next_round():
    core, model = periodic_core(w=vec(2.0))
    core.on_local_step(0.0)
    core.on_local_step(0.01)  # round 1
    core.on_message(0.02, "1", Push(1, vec(4.0), 10))
    core.on_local_step(0.03)
    torch.testing.assert_close(replaced(core.on_local_step(0.04)), vec(3.0))  # 2 was late
    model.w = vec(3.0)
    assert core.on_message(0.05, "2", Push(1, vec(9.0), 10)) == []  # round 1 came late
    core.on_message(0.06, "1", Push(2, vec(6.0), 10))
    core.on_local_step(0.07)
    # round 2 closes without 2's model of it: its late one stands in, (3 + 6 + 9) / 3
    got = replaced(core.on_local_step(0.08))
    torch.testing.assert_close(got, vec(6.0))
    assert core.fallback == {} and core.stats.unmatched == 1


@pytest.mark.parametrize("spec", ["periodic:b=2", "continuous"])
def test_periodic_nodes_started_apart_merge_every_round(spec):
    """Round numbers are local step counts: a node that started 1,000 steps earlier counts
    other rounds. Each merges the other's latest push (syncs: 0 and 0 when unmatched pushes
    were dropped)."""
    driver = classic_net(spec, line(2), seed=0)
    driver.cores["1"].step = 1000
    steps = 40
    for _ in range(steps):
        driver.advance(driver.now + TICK)
        for node in driver.cores:
            driver.step(node)
    driver.settle()
    rounds = steps // driver.config.b
    for core in driver.cores.values():
        assert core.stats.syncs >= rounds - 2, core.stats
        assert core.stats.unmatched >= rounds - 2, core.stats


STALE_PUSH = (
    "PeriodicCore._after_step: when the previous round is still open at the next round "
    "boundary it returns ReplaceModel(merged) but then reads model.read(), which the driver "
    "has not updated yet, so the new round pushes (and keeps as `sent`) the pre-merge model"
)


def test_round_closed_by_the_next_one_pushes_the_merged_model():
    core, model = periodic_core(w=vec(2.0))
    core.on_local_step(0.0)
    core.on_local_step(0.01)
    core.on_message(0.02, "1", Push(1, vec(4.0), 10))  # 2's round-1 model is late
    core.on_local_step(0.03)
    actions = core.on_local_step(0.04)
    torch.testing.assert_close(replaced(actions), vec(3.0))
    for push in sends_of(actions, Push):
        torch.testing.assert_close(push.message.params, vec(3.0))  # neighbours get 2.0


def test_two_rounds_closing_in_one_step_keep_both_merges():
    core, model = periodic_core(w=vec(2.0))
    core.on_local_step(0.0)
    core.on_local_step(0.01)
    core.on_message(0.02, "1", Push(1, vec(4.0), 10))  # 2's round-1 model is late
    core.on_message(0.02, "1", Push(2, vec(6.0), 10))  # both are ahead in round 2
    core.on_message(0.02, "2", Push(2, vec(6.0), 10))
    core.on_local_step(0.03)
    # both rounds close in this step: the second replacement is the model to keep
    model.w = [a.params for a in core.on_local_step(0.04) if isinstance(a, ReplaceModel)][-1]
    # round 1: (2 + 4) / 2 = 3; round 2: (3 + 6 + 6) / 3 = 5 (got 14/3: round 1 is lost)
    torch.testing.assert_close(model.w, vec(5.0))


def test_continuous_on_a_ring_sends_two_pushes_per_node_and_step():
    driver = classic_net("continuous", ring(5), seed=0)
    for _ in range(7):
        driver.advance(driver.now + TICK)
        for node in driver.cores:
            driver.step(node)
    driver.settle()
    assert len(driver.log) == 5 * 2 * 7
    assert all(isinstance(m, Push) for _, _, _, m in driver.log)
    assert driver.stat("syncs") == 5 * 7


def test_periodic_ring_with_an_offline_node_completes_on_timers():
    driver = classic_net("periodic:b=1,timeout=0.5", ring(4), seed=0)
    driver.offline.add("2")
    driver.step("1")
    driver.step("3")
    driver.step("0")
    driver.advance(0.1)
    assert driver.cores["0"].stats.syncs == 1  # got both 1 and 3
    assert driver.cores["1"].stats.syncs == 0  # waits for 2
    driver.advance(0.6)
    assert driver.cores["1"].stats.syncs == driver.cores["3"].stats.syncs == 1
    assert driver.cores["1"].stats.timeouts == 1


def test_periodic_neighbour_that_missed_a_round_is_then_cut_off_as_a_straggler():
    """A push comes on its sender's schedule (a slower node pushes later): a neighbour is
    waited for until it lets a round go by; then it sits out a round and, waited for
    again, is a straggler ``STRAGGLER_FACTOR`` times the lag of the models in hand."""
    core, model = periodic_core("periodic:b=1")
    core.on_local_step(0.0)  # round 1
    core.on_message(0.002, "1", Push(1, vec(1.0), 10))  # 2 never pushes
    core.on_local_step(0.01)  # round 2 closes round 1 without 2: it missed one
    assert core.stats.syncs == 1 and core.stats.stragglers == 0
    replaced(core.on_message(0.012, "1", Push(2, vec(1.0), 10)))  # 2 sits round 2 out
    assert core.stats.syncs == 2 and core.open_round is None
    core.on_local_step(0.02)  # round 3 waits for 2 again, but only so long
    actions = core.on_message(0.022, "1", Push(3, vec(1.0), 10))
    (timer,) = [a for a in actions if isinstance(a, SetTimer)]
    cut = 0.02 + STRAGGLER_FACTOR * 0.002
    assert timer.key == ("straggler", 3) and timer.at == pytest.approx(cut)
    assert core.on_timer(cut - 0.001, ("straggler", 3)) == []  # not yet
    cut = timer.at
    assert core.on_timer(cut, ("straggler", 3)) and core.stats.stragglers == 1
    assert core.stats.syncs == 3 and core.stats.timeouts == 0
    # a model from 2 again (even a late one) restores it: waited for in full
    core.on_message(0.025, "2", Push(3, vec(1.0), 10))
    core.on_local_step(0.03)
    core.on_message(0.032, "1", Push(4, vec(1.0), 10))
    assert core.open_round == 4  # waits for 2


def test_periodic_round_nobody_answers_ends_at_the_timeout():
    driver = classic_net("periodic:b=1,timeout=0.5", line(2), seed=0)
    driver.offline.add("1")
    driver.step("0")
    driver.advance(0.49)
    assert driver.cores["0"].open_round is not None  # no answer in hand: nothing to time
    driver.advance(0.51)
    core = driver.cores["0"]
    assert core.open_round is None and core.stats.timeouts == 1 and core.stats.syncs == 0
    assert core.round_trip.wait == 1.0  # nobody answered: the links may be slow


# -- gossip and none --
def test_gossip_pushes_to_one_live_neighbour_every_b_steps():
    model = FakeModel(vec(1.0), samples=3)
    core = make_core("0", unclipped(parse_protocol("gossip:b=2")), model, ["1", "2"], seed=0)
    targets, exchanges = [], set()
    for step in range(1, 41):
        sends = sends_of(core.on_local_step(0.0))
        assert len(sends) == (step % 2 == 0)
        for s in sends:
            assert s.message.round < 0 and s.message.samples == 3  # -exchange id
            exchanges.add(s.message.round)
            torch.testing.assert_close(s.message.params, vec(1.0))
            targets.append(s.to)
    assert set(targets) == {"1", "2"} and len(exchanges) == 20
    core.on_peer_down(0.0, "1")
    for _ in range(10):
        assert {s.to for s in sends_of(core.on_local_step(0.0))} <= {"2"}
    core.on_peer_down(0.0, "2")
    assert all(core.on_local_step(0.0) == [] for _ in range(4))


@pytest.mark.parametrize(
    ("spec", "expected"), [("gossip:correction=0", 3.0), ("gossip:merge=samples,correction=0", 3.5)]
)
def test_gossip_receiver_merges_and_answers_with_the_model_it_merged_with(spec, expected):
    model = FakeModel(vec(2.0), samples=1)
    core = make_core("1", unclipped(parse_protocol(spec)), model, ["0"])
    actions = core.on_message(0.0, "0", Push(-7, vec(4.0), 3))
    torch.testing.assert_close(replaced(actions), vec(expected))
    (reply,) = sends_of(actions, ModelReply)
    assert reply.to == "0" and reply.message.session == 7 and reply.message.samples == 1
    torch.testing.assert_close(reply.message.params, vec(2.0))
    assert core.stats.syncs == 1
    assert core.on_message(0.0, "0", Push(3, vec(4.0), 3)) == []  # a periodic round
    assert core.on_message(0.0, "5", Push(-1, vec(4.0), 3)) == []  # not a neighbour
    assert core.on_message(0.0, "0", ModelReply(7, vec(4.0), 3)) == []  # no such exchange
    assert core.stats.ignored == 3


def test_gossip_initiator_merges_the_reply_and_drops_late_ones():
    model = FakeModel(vec(2.0), samples=1)
    core = make_core("0", unclipped(parse_protocol("gossip:correction=0")), model, ["1"])
    first = sends_of(core.on_local_step(0.0))[0].message
    second = sends_of(core.on_local_step(0.0))[0].message
    model.w = vec(3.0)  # a local step after offering
    got = replaced(core.on_message(0.1, "1", ModelReply(-second.round, vec(6.0), 1)))
    torch.testing.assert_close(got, vec(5.0))  # (2 + 6) / 2 plus the step taken since
    assert core.on_message(0.1, "1", ModelReply(-second.round, vec(6.0), 1)) == []  # done
    assert core.on_timer(0.6, ("exchange", -first.round)) == []
    assert core.on_message(0.7, "1", ModelReply(-first.round, vec(6.0), 1)) == []  # too late
    assert (core.stats.syncs, core.stats.timeouts, core.stats.ignored) == (1, 1, 2)


def test_gossip_over_a_network_keeps_models_between_min_and_max():
    driver = classic_net("gossip", complete(5), seed=7, step_scale=0.0)
    low, high = driver.stacked().min(0).values, driver.stacked().max(0).values
    for _ in range(30):
        driver.advance(driver.now + TICK)
        for node in driver.cores:
            driver.step(node, torch.zeros(DIM))
    driver.settle()
    assert driver.stat("syncs") == 2 * 5 * 30  # both ends of every exchange merge
    w = driver.stacked()
    assert (w >= low - 1e-6).all() and (w <= high + 1e-6).all()
    assert w.var(0).sum() < 0.05 * (high - low).square().sum()  # they mixed


def test_none_trains_alone():
    driver = classic_net("none", complete(4), seed=0)
    for _ in range(10):
        for node in driver.cores:
            driver.step(node)
    core = driver.cores["0"]
    assert core.on_message(0.0, "1", Push(1, vec(1.0), 1)) == []
    assert core.on_timer(0.0, ("round", 1)) == []
    assert driver.log == [] and core.stats.ignored == 1


# -- a round's wait and its stragglers' cut-off at the same instant --
WAIT = 0.5
"""The round's wait (``timeout``: the floor of the wait while round trips are short)."""


def _timers_at_one_instant(spec, open_round, answer, keys):
    """Two identical cores: a round opened by ``open_round`` (which returns when), one answer
    ``WAIT / STRAGGLER_FACTOR`` later from 1 (2 is pending and judged a straggler
    ``STRAGGLER_FACTOR`` times that later: when the round's wait runs out too); then the two
    timers due at that instant, fired in both orders. Returns each order's outcome."""
    outcomes = []
    for order in (keys, keys[::-1]):
        model = FakeModel(vec(0.0))
        core = make_core("0", unclipped(parse_protocol(classic(spec))), model, ("1", "2"))
        opened = open_round(core, model)
        core.on_message(opened + WAIT / STRAGGLER_FACTOR, "1", answer(core))
        due = [key(core) for key in order]  # both set while the round is open
        fired = [sends_of(core.on_timer(opened + WAIT, key)) for key in due]
        stats = (core.stats.timeouts, core.stats.stragglers, core.round_trip.wait)
        outcomes.append((sorted(len(f) for f in fired), stats))
    return outcomes


def test_a_tie_between_a_rounds_wait_and_its_cut_off_does_not_depend_on_the_timers_order():
    """Drivers fire two timers due at the same instant in either order (the simulator in the
    order they were set, trio as it likes); the core counts the tie as the wait's timeout
    (the answers were not quick enough for a cut-off before it) whichever comes first."""

    def pull(core, model):
        model.w = vec(5.0)
        core.on_local_step(0.0)
        return 0.0

    def session(kind):
        return lambda core: (kind, core.session.id, core.session.round)

    first, second = _timers_at_one_instant(
        f"dynamic:delta=0.01,b=1,timeout={WAIT}",
        pull,
        lambda core: ModelReply(core.session.id, vec(1.0), 10, ["1"], 1),
        [session("session"), session("straggler")],
    )
    assert first == second and first[1][:2] == (1, 0)

    def third_round(core, model):
        """2 misses round 1 and sits round 2 out; round 3 waits for it again, but only
        ``STRAGGLER_FACTOR`` times the lag of 1's push (see the test above)."""
        core.on_local_step(0.0)
        core.on_message(0.002, "1", Push(1, vec(1.0), 10))
        core.on_local_step(0.25)
        core.on_message(0.252, "1", Push(2, vec(1.0), 10))
        core.on_local_step(1.0)
        return 1.0

    first, second = _timers_at_one_instant(
        f"periodic:b=1,timeout={WAIT}",
        third_round,
        lambda core: Push(3, vec(1.0), 10),
        [lambda core: ("round", 3), lambda core: ("straggler", 3)],
    )
    assert first == second and first[1][:2] == (1, 0)
