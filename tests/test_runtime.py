"""The runtime: a core's model actions applied to its part of the node's model, sends and
timers handed to the driver, the liveness rules (a message proves life, a failed send is an
event), restore through actions, and the step-size and seed rules."""

from __future__ import annotations

import pytest
import torch
from kit import FakeLearner, FakeModel, Recorder, VirtualNet, line, recorded_runtime
from torch import nn

from p2pfl.community.sharing import shared_part
from p2pfl.learning.batched import BatchedLearner
from p2pfl.learning.learner import PerNodeLearner, SGDConfig
from p2pfl.learning.sampler import NodeDataBank
from p2pfl.protocol.actions import ReplaceModel, Send, SetCorrection, SetTimer
from p2pfl.protocol.dynamic import DynamicCore
from p2pfl.runtime import CoreRuntime, NodeModel, core_seed, derive_seed, step_size
from p2pfl.wire.messages import Pull, Push


def two_layer_learner(nodes: int = 1, batched: bool = False) -> PerNodeLearner | BatchedLearner:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    xs = [torch.randn(8, 4) for _ in range(nodes)]
    ys = [torch.randint(0, 2, (8,)) for _ in range(nodes)]
    bank = NodeDataBank(xs, ys, 4, 0)
    cls = BatchedLearner if batched else PerNodeLearner
    return cls(model, bank, SGDConfig(lr=0.1, momentum=0.5))


def scripted(actions_by_event: list[list]) -> CoreRuntime:
    """A runtime whose core returns the given action lists, one per local step."""
    runtime = recorded_runtime(FakeLearner([FakeModel(torch.zeros(4))]), "none")
    script = iter(actions_by_event)
    runtime.core.on_local_step = lambda now: next(script)  # type: ignore[method-assign]
    return runtime


# -- actions ------------------------------------------------------------------------------------
@pytest.mark.parametrize("batched", [False, True])
def test_model_actions_touch_only_their_part(batched):
    learner = two_layer_learner(batched=batched)
    before = learner.get(0).clone()
    model = NodeModel(learner, 0, 8)
    runtimes = [recorded_runtime(learner, "none", [globs], model=model) for globs in ("0.*", "2.*")]
    first, second = runtimes[0].part, runtimes[1].part
    script = [
        [ReplaceModel(torch.full((first.schema.numel,), 7.0))],
        [SetCorrection(torch.full((first.schema.numel,), 1.0))],
    ]
    runtimes[0].core.on_local_step = lambda now: script.pop(0)  # type: ignore[method-assign]
    runtimes[0].local_step(0.0)
    runtimes[0].local_step(0.0)
    after = learner.get(0)
    assert torch.equal(first.take(after), torch.full((first.schema.numel,), 7.0))
    assert torch.equal(second.take(after), second.take(before))
    correction = torch.zeros(learner.schema.numel)
    correction[first.span] = 1.0
    assert torch.equal(learner.correction(0), correction)
    # the second part's correction sits beside the first one; closing the first clears only it
    runtimes[1].core.on_local_step = lambda now: [  # type: ignore[method-assign]
        SetCorrection(torch.full((second.schema.numel,), -2.0))
    ]
    runtimes[1].local_step(0.0)
    correction[second.span] = -2.0
    assert torch.equal(learner.correction(0), correction)
    runtimes[0].close()
    correction[first.span] = 0.0
    assert torch.equal(learner.correction(0), correction)


def test_sends_and_timers_go_to_the_driver_in_order():
    push = Push(1, torch.ones(4), 3)
    runtime = scripted([[Send("b", push), SetTimer(2.0, "k"), Send("c", push)]])
    runtime.local_step(1.5)
    driver = runtime.driver
    assert isinstance(driver, Recorder)
    assert [(t, to) for t, to, _ in driver.sent] == [(1.5, "b"), (1.5, "c")]
    assert driver.timers == [(2.0, "k")]


def test_an_unknown_action_is_a_type_error():
    runtime = scripted([["not an action"]])
    with pytest.raises(TypeError, match="unknown action"):
        runtime.local_step(0.0)


def test_a_closed_runtime_ignores_every_event():
    runtime = scripted([[ReplaceModel(torch.ones(4))]])
    runtime.close()
    runtime.local_step(0.0)
    runtime.timer(1.0, "k")
    runtime.send_failed(1.0, "b")
    assert torch.equal(runtime.model.read(), torch.zeros(4))


# -- liveness -----------------------------------------------------------------------------------
def test_a_message_from_a_peer_that_is_down_brings_it_back():
    net = VirtualNet("dynamic:delta=0,b=1", line(2), seed=0)
    net.peer_down("0", "1")
    assert net.cores["0"].live_neighbors == []
    net.step("1")  # 1 violates and pulls 0: the pull proves 1 is alive
    net.settle()
    assert net.cores["0"].live_neighbors == ["1"]
    assert net.stat("syncs") == 2


def test_failed_sends_are_handled_after_the_actions_that_caused_them():
    learner = FakeLearner([FakeModel(torch.zeros(4))])
    runtime = recorded_runtime(learner, "dynamic:delta=0,b=1", neighbors=["b", "c"], fail="bc")
    driver = runtime.driver
    assert isinstance(driver, Recorder)
    learner.models[0].w += 1.0
    runtime.local_step(0.0)
    core = runtime.core
    assert isinstance(core, DynamicCore)
    # both pulls went out, the timer was set, then both failures ended the session
    assert [type(m) for _, _, m in driver.sent] == [Pull, Pull]
    assert len(driver.timers) == 1
    assert not core.busy and core.down == {"b", "c"}
    assert core.live_neighbors == []


def test_a_failed_send_to_a_peer_outside_the_neighbourhood_marks_only_it_down():
    net = VirtualNet("dynamic:delta=0,b=1", line(3), seed=0)
    net.unreachable.add("2")
    core = net.cores["0"]
    net.runtimes["0"].send_failed(0.0, "2")
    assert core.down == {"2"} and core.live_neighbors == ["1"]


def test_widening_again_to_a_peer_already_down_does_not_wait_for_it():
    """A coordinator keeps widening to a peer it cannot reach (named by its neighbour, e.g.
    not admitted to the community): each failed send counts as that peer's refusal, also
    once the peer is marked down, so no session waits for it until the timeout."""
    net = VirtualNet("dynamic:delta=0,b=1", line(3), seed=0)
    net.unreachable.add("2")
    for _ in range(4):
        net.step("0")
        net.settle()
    core = net.cores["0"]
    assert core.stats.syncs == 4 and core.stats.timeouts == 0
    assert sum(1 for _, src, dst, _ in net.log if (src, dst) == ("0", "2")) >= 2


# -- restore ------------------------------------------------------------------------------------
def test_restore_re_applies_the_drift_correction_to_the_part():
    learner = two_layer_learner()
    part = shared_part(learner.schema, ["2.*"])
    first = recorded_runtime(learner, "dynamic", ["2.*"])
    state = first.core.state_dict()
    state["correction"] = torch.arange(part.schema.numel, dtype=torch.float32)
    fresh = two_layer_learner()
    second = recorded_runtime(fresh, "dynamic", ["2.*"])
    second.restore(state)
    correction = fresh.correction(0)
    assert torch.equal(part.take(correction), state["correction"])
    assert float(correction.abs().sum()) == float(state["correction"].sum())


def test_restore_of_a_core_without_learner_state_changes_nothing():
    runtime = scripted([])
    runtime.restore(runtime.core.state_dict())
    assert runtime.driver.sent == [] and runtime.driver.timers == []  # type: ignore[attr-defined]


# -- rules --------------------------------------------------------------------------------------
def test_the_step_size_is_the_effective_step_of_sgd_with_momentum():
    assert step_size(SGDConfig(lr=0.1)) == pytest.approx(0.1)
    assert step_size(SGDConfig(lr=0.1, momentum=0.9)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="momentum"):
        step_size(SGDConfig(lr=0.1, momentum=1.0))
    learner = two_layer_learner()  # momentum 0.5
    runtime = recorded_runtime(learner, "dynamic")
    assert runtime.core.step_size == pytest.approx(0.2)


def test_core_seeds_are_stable_and_differ_by_node_and_channel():
    assert core_seed(1, "a", "all") == derive_seed(1, "core", "a", "all")
    assert core_seed(1, "a", "all") == 5639812850076002106
    seeds = {core_seed(s, n, c) for s in (0, 1) for n in ("a", "b", "0") for c in ("all", "x")}
    assert len(seeds) == 12
    assert all(0 <= s < 2**63 for s in seeds)
