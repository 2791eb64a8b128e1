"""The simulator end to end: the results contract (summary.json, metrics.jsonl, report.png),
traffic ordering and exact byte accounting, determinism, fair evaluation steps, concept drift,
churn and loss, and scenario validation."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from p2pfl.learning.params import ParamSchema
from p2pfl.simulator.engine import Simulation, final_eval_steps, prepare
from p2pfl.simulator.results import run_scenario
from p2pfl.simulator.scenario import ScenarioError, load_scenario
from p2pfl.wire.codec import encoded_size
from p2pfl.wire.messages import Push

NODES, STEPS = 8, 150
PROTOCOLS = ("none", "continuous", "periodic:b=10", "dynamic")
RUN_KEYS = {
    "protocol",
    "final_accuracy",
    "bytes_sent",
    "messages",
    "syncs",
    "steps",
    "wall_seconds",
    "prequential_accuracy",
    "prequential_loss",
    "average_model_accuracy",
}
ROW_KEYS = {
    "protocol",
    "step",
    "accuracy",
    "loss",
    "bytes",
    "divergence",
    "messages",
    "syncs",
    "prequential_accuracy",
    "average_model_accuracy",
    "concept",
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small models: one thread is much faster, above all on a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small(**overrides):
    settings = {
        "nodes": NODES,
        "steps": STEPS,
        "topology": "ring",
        "dataset": "digits",
        "model": "mlp",
        "protocols": PROTOCOLS,
        "eval_every": 25,
    }
    settings.update(overrides)
    return load_scenario(None, settings)


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    """One run of the four standard protocols on a ring, with its files."""
    out = tmp_path_factory.mktemp("four")
    summary = run_scenario(small(), out, progress=False)
    return summary, out, {r["protocol"]: r for r in summary["runs"]}


def read_rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_summary_contract(four):
    summary, out, runs = four
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert on_disk["scenario"]["nodes"] == NODES and on_disk["scenario"]["topology"] == "ring"
    assert on_disk["scenario"]["protocols"] == list(PROTOCOLS)
    assert [r["protocol"] for r in on_disk["runs"]] == list(PROTOCOLS)
    for run in on_disk["runs"]:
        assert set(run) >= RUN_KEYS, RUN_KEYS - set(run)
        assert 0.0 <= run["final_accuracy"] <= 1.0
        assert run["steps"] == STEPS and run["node_steps"] == NODES * STEPS
        assert isinstance(run["bytes_sent"], int) and isinstance(run["messages"], int)
        assert isinstance(run["wall_seconds"], float) and run["wall_seconds"] >= 0
        assert run["final_eval_steps"] == final_eval_steps(STEPS)
    # every protocol learns something on digits in 150 steps (chance is 0.1)
    assert min(r["final_accuracy"] for r in on_disk["runs"]) > 0.5
    # prequential scores include the early steps, before the models learned
    assert all(0.2 < r["prequential_accuracy"] < r["final_accuracy"] for r in on_disk["runs"])
    assert on_disk["drift_events"] == []
    runs = {r["protocol"]: r for r in on_disk["runs"]}
    # averaging every step keeps the models equal: the average model is each model
    assert runs["continuous"]["average_model_accuracy"] == pytest.approx(
        runs["continuous"]["final_accuracy"], abs=0.02
    )


def test_metrics_rows(four):
    summary, out, runs = four
    rows = read_rows(out)
    evals = sorted({*range(25, STEPS + 1, 25), *final_eval_steps(STEPS)})
    for protocol in PROTOCOLS:
        mine = [r for r in rows if r["protocol"] == protocol]
        assert [r["step"] for r in mine] == evals
        for row in mine:
            assert set(row) >= ROW_KEYS, ROW_KEYS - set(row)
            assert 0.0 <= row["accuracy"] <= 1.0 and row["loss"] > 0
            assert row["divergence"] >= 0
        byte_counts = [r["bytes"] for r in mine]
        assert byte_counts == sorted(byte_counts)  # cumulative
        assert byte_counts[-1] == runs[protocol]["bytes_sent"]
        # final accuracy is the mean over the final evaluation steps
        finals = [r["accuracy"] for r in mine if r["step"] in final_eval_steps(STEPS)]
        assert runs[protocol]["final_accuracy"] == pytest.approx(sum(finals) / len(finals))
    last = {r["protocol"]: r for r in rows if r["step"] == STEPS}
    # averaging keeps the models together; alone they drift apart
    assert last["continuous"]["divergence"] < 0.2 * last["none"]["divergence"]
    assert last["periodic:b=10"]["divergence"] < last["none"]["divergence"]


def test_report_png(four):
    _, out, _ = four
    data = (out / "report.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000


def test_traffic_order(four):
    _, _, runs = four
    none, cont, per = runs["none"], runs["continuous"], runs["periodic:b=10"]
    assert none["bytes_sent"] == none["messages"] == none["syncs"] == 0
    assert cont["bytes_sent"] > per["bytes_sent"] > none["bytes_sent"]
    assert cont["messages"] == NODES * 2 * STEPS  # ring: two neighbours, every step
    assert per["messages"] == NODES * 2 * (STEPS // 10)
    # every round completes, but the last one (its models still in flight at the end)
    assert cont["syncs"] == NODES * (STEPS - 1)
    assert per["syncs"] == NODES * (STEPS // 10 - 1)
    dyn = runs["dynamic"]
    assert dyn["bytes_sent"] > 0 and dyn["sessions"] > 0 and dyn["syncs"] > 0
    assert dyn["messages_lost"] == dyn["messages_rejected"] == 0


@pytest.mark.parametrize(("protocol", "b"), [("continuous", 1), ("periodic:b=10", 10)])
def test_bytes_are_the_real_encoded_sizes(four, protocol, b):
    _, _, runs = four
    prepared = prepare(small())
    schema = ParamSchema.from_module(prepared.model)
    params = torch.zeros(schema.numel)
    expected = sum(
        2 * encoded_size(Push(step // b, params, len(node.y_train)), schema)
        for node in prepared.nodes
        for step in range(b, STEPS + 1, b)
    )
    assert runs[protocol]["bytes_sent"] == expected
    assert expected > runs[protocol]["messages"] * schema.numel * 4  # a float32 each, at least


def test_same_seed_same_results(tmp_path):
    def run(name, seed):
        scenario = small(
            protocols=("dynamic", "gossip"),
            steps=80,
            seed=seed,
            eval_every=20,
            network={"jitter": 0.003, "speed_spread": 0.5},
        )
        summary = run_scenario(scenario, tmp_path / name, progress=False)
        for r in summary["runs"]:
            r.pop("wall_seconds")
        return summary, (tmp_path / name / "metrics.jsonl").read_text()

    first, second, other = run("a", 3), run("b", 3), run("c", 4)
    assert first == second
    assert first[0]["runs"][0]["messages"] > 0
    assert other[0]["runs"] != first[0]["runs"]


@pytest.mark.parametrize("steps", [1, 2, 10, 150, 1000, 4000])
def test_final_eval_steps_are_primes_at_the_end(steps):
    picked = final_eval_steps(steps)
    assert picked == sorted(set(picked)) and 1 <= len(picked) <= 5
    assert all(1 <= s <= steps for s in picked)
    if steps >= 3:
        assert all(s > 1 and all(s % d for d in range(2, math.isqrt(s) + 1)) for s in picked)
    if steps >= 200:  # long runs: strictly in the last tenth, five of them
        assert len(picked) == 5 and min(picked) >= steps - steps // 10


def test_concept_drift_drops_accuracy_then_recovers(tmp_path):
    scenario = small(
        dataset="digits:drift_at=100", protocols=("continuous",), steps=160, eval_every=10
    )
    summary = run_scenario(scenario, tmp_path, progress=False)
    assert summary["runs"][0]["syncs"] > 0
    acc = {r["step"]: r["accuracy"] for r in read_rows(tmp_path)}
    assert acc[100] > 0.6
    assert acc[110] < acc[100] - 0.3  # labels permuted after step 100
    assert acc[160] > acc[110] + 0.2  # and it learns the new task


def test_drift_every_n_relabels_training_and_test_data_at_the_right_steps():
    scenario = small(
        dataset="digits:drift_every=40,concepts=3,transition=alternate,drift_width=10",
        protocols=("none",),
        steps=130,
        eval_every=10,
    )
    prepared = prepare(scenario)
    drift = prepared.dataset.drift
    sim = Simulation(prepared, "none")
    bank = sim.learner.data
    original = bank.y.clone()
    seen = {}

    def on_tick(t):
        state = sim.task.state
        seen[t] = (state.concept, state.next, state.share)
        want = bank.padded_labels(
            [drift.relabel(d.x_train, d.y_train, state.concept) for d in prepared.nodes]
        )
        assert torch.equal(bank.y, want)
        if state.next is not None:
            assert bank.y_next is not None and bank.share == state.share
        else:
            assert bank.y_next is None

    summary = sim.run(on_tick)
    assert [seen[t][0] for t in (1, 40, 41, 80)] == [0, 0, 1, 1]  # sudden after step 40
    assert seen[81] == (1, 2, 0.1) and seen[89] == (1, 2, pytest.approx(0.9))  # gradual
    assert seen[90][:2] == (2, None) and seen[121][:2] == (0, None)  # back to the original
    assert torch.equal(bank.y, original)
    assert [(d["step"], d["width"]) for d in summary["drifts"]] == [(40, 0), (80, 10), (120, 0)]
    rows = {r["step"]: r for r in summary["metrics"]}
    assert [rows[t]["concept"] for t in (40, 50, 80, 90, 120, 130)] == [0, 1, 1, 2, 2, 0]
    # the test set follows: right after a sudden drift the trained models score low on it
    assert rows[40]["accuracy"] > rows[50]["accuracy"] + 0.2
    assert rows[40]["prequential_accuracy"] > rows[50]["prequential_accuracy"] + 0.2


def test_prequential_window_scores_each_batch_before_its_step():
    """A run of one node with the per-node learner: the prequential accuracy of each
    evaluation window is the mean, over its steps, of the batch accuracy of the model as it
    was before that step; replayed here step by step with the same data bank."""
    from p2pfl.learning.sampler import NodeDataBank

    scenario = small(nodes=1, topology="complete", protocols=("none",), steps=30, eval_every=5)
    prepared = prepare(scenario)
    rows = Simulation(prepared, "none").run()["metrics"]
    node = prepared.nodes[0]
    bank = NodeDataBank([node.x_train], [node.y_train], scenario.batch_size, scenario.seed)
    model = copy.deepcopy(prepared.model)
    opt = torch.optim.SGD(model.parameters(), lr=scenario.lr)
    scores = []
    for _ in range(30):
        x, y = bank.draw(torch.tensor([0]))
        with torch.no_grad():
            scores.append(float((model(x[0]).argmax(1) == y[0]).float().mean()))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[0]), y[0]).backward()
        opt.step()
    last = 0
    for row in rows:
        window = scores[last : row["step"]]
        assert row["prequential_accuracy"] == pytest.approx(sum(window) / len(window), abs=1e-6)
        last = row["step"]


def test_lr_schedule_reaches_learner_and_cores():
    scenario = small(protocols=("dynamic",), steps=60, lr_schedule="step:every=20,gamma=0.5")
    sim = Simulation(prepare(scenario), "dynamic")
    sim.run()
    assert [sim.learner.lr(n) for n in range(NODES)] == [0.025] * NODES  # steps 40..59
    assert all(core.step_size == 0.025 for core in sim.cores)
    cosine = Simulation(prepare(small(steps=60, lr_schedule="cosine")), "none")
    cosine.run()
    assert cosine.learner.sgd.schedule.steps == 60  # the horizon is the run's length
    assert cosine.learner.lr(0) == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 59 / 60)))


def test_lr_power_delta_follows_the_schedule_in_the_simulator():
    """Each core's Δ is the default's times (η/η_peak)² at its latest agreement: the step
    schedule halves η twice, so the factor is 1, 1/4 or 1/16, and syncs after the first
    halving have the smaller ones."""
    scenario = small(steps=60, lr_schedule="step:every=20,gamma=0.5")
    sim = Simulation(prepare(scenario), "dynamic:lr_power=2")
    sim.run()
    factors = []
    for core in sim.cores:
        assert core.peak_step_size == 0.1
        factors.append(core.delta / (core.config.rel * float(core.reference.dot(core.reference))))
    assert all(any(f == pytest.approx(k) for k in (1.0, 0.25, 0.0625)) for f in factors)
    assert min(factors) < 1.0, factors


def test_churn(tmp_path):
    network = {"churn": 0.02, "rejoin": 0.2}  # no random loss: only offline nodes lose messages
    scenario = small(protocols=("dynamic", "periodic:b=5"), steps=200, network=network)
    summary = run_scenario(scenario, tmp_path, progress=False)
    runs = {r["protocol"]: r for r in summary["runs"]}
    for run in runs.values():
        assert run["node_steps"] < NODES * 200  # offline nodes do not train
        assert run["messages_lost"] > 0  # what is sent to an offline node is lost
        assert run["messages_rejected"] == 0
        assert run["final_accuracy"] > 0.5
    assert runs["dynamic"]["syncs"] > 0 and runs["dynamic"]["sessions"] > 0
    assert runs["periodic:b=5"]["syncs"] > 0
    online = [r["online"] for r in read_rows(tmp_path)]
    assert min(online) < NODES and max(online) <= NODES


def test_loss():
    # a short timeout: with the default (2 s = 200 steps) a lost message parks a session
    # and its members for longer than this whole run
    protocols = ("dynamic:timeout=0.1", "continuous")
    scenario = small(protocols=protocols, steps=150, network={"loss": 0.1})
    runs = {r["protocol"]: r for r in run_scenario(scenario, None, progress=False)["runs"]}
    for run in runs.values():
        assert run["node_steps"] == NODES * 150
        assert 0.05 < run["messages_lost"] / run["messages"] < 0.15
        assert run["final_accuracy"] > 0.5
    dynamic = runs["dynamic:timeout=0.1"]
    assert dynamic["syncs"] > 20 and dynamic["timeouts"] > 0  # lost replies resolve by timer
    assert runs["continuous"]["syncs"] > NODES * 100  # rounds still close (by the next one)


# -- scenario validation --
@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        ({"nodez": 3}, ["unknown scenario key(s) ['nodez']", "known:", "nodes"]),
        ({"network": {"lag": 1}}, ["network.lag", "latency"]),
        ({"protocols": ("dynamic:delta=-1",)}, ["protocol", "'delta'", "must be >= 0"]),
        ({"protocols": ("telepathy",)}, ["unknown kind 'telepathy'"]),
        ({"nodes": "many"}, ["'nodes'", "'many' is not a valid int"]),
        ({"nodes": 2.5}, ["'nodes'", "not a valid int"]),
        ({"nodes": True}, ["'nodes'", "not a valid int"]),
        ({"lr": "fast"}, ["'lr'", "not a valid float"]),
        ({"allow_disconnected": "yes"}, ["'allow_disconnected'", "not a valid bool"]),
        ({"network": {"loss": "lots"}}, ["'network.loss'", "not a valid float"]),
        ({"steps": 0}, ["steps must be >= 1"]),
        ({"seed": -1}, ["seed must be in [0, 2**32)"]),
        ({"learner": "gpu"}, ["learner must be 'batched' or 'per-node'"]),
        ({"momentum": 1.0}, ["momentum must be in [0, 1)"]),
        ({"network": {"loss": 1.0}}, ["network.loss must be in [0, 1)"]),
        ({"lr_schedule": "linear"}, ["lr_schedule", "unknown kind 'linear'", "cosine"]),
        ({"lr_schedule": "step"}, ["lr_schedule", "missing argument 'every'"]),
    ],
)
def test_scenario_errors(overrides, fragments):
    with pytest.raises(ScenarioError) as info:
        load_scenario(None, overrides)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_scenario_files(tmp_path):
    with pytest.raises(ScenarioError, match="not found"):
        load_scenario(tmp_path / "missing.toml", {})
    bad = tmp_path / "bad.toml"
    bad.write_text("nodes = = 3\n")
    with pytest.raises(ScenarioError, match="not valid TOML"):
        load_scenario(bad, {})
    good = tmp_path / "good.toml"
    good.write_text(
        'nodes = 5\nsteps = 7\nprotocols = ["none", "dynamic:delta=0.1"]\n'
        "[network]\nlatency = 0.01\nchurn = 0.1\n"
    )
    scenario = load_scenario(good, {"steps": 9, "seed": None, "protocols": ()})
    assert (scenario.nodes, scenario.steps, scenario.seed) == (5, 9, 0)  # None/() keep the file's
    assert scenario.protocols == ("none", "dynamic:delta=0.1")
    assert (scenario.network.latency, scenario.network.churn) == (0.01, 0.1)
    assert scenario.network.bandwidth == 125e6  # defaults fill the rest
    assert load_scenario(None, {"protocols": "gossip"}).protocols == ("gossip",)


def test_runs_do_not_depend_on_the_python_hash_seed() -> None:
    """Same seed, same result in every process: no protocol decision may follow the iteration
    order of a set of peer ids (which changes with PYTHONHASHSEED). Loss, churn, jitter and
    uneven speeds make sessions collide, time out and give way."""
    script = textwrap.dedent(
        """
        import dataclasses, torch
        torch.set_num_threads(1)
        from p2pfl.simulator.engine import Simulation, prepare
        from p2pfl.simulator.scenario import load_scenario
        s = load_scenario(None, {"nodes": 12, "steps": 150, "partition": "dirichlet:alpha=0.5"})
        net = dataclasses.replace(s.network, loss=0.1, churn=0.02, speed_spread=0.5, jitter=0.003)
        r = Simulation(prepare(dataclasses.replace(s, network=net)), "dynamic").run()
        print(r["bytes_sent"], r["messages"], r["final_accuracy"], r["gave_way"], r["timeouts"])
        """
    )
    outputs = set()
    for hash_seed in ("1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        done = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr[-2000:]
        outputs.add(done.stdout.strip())
    assert len(outputs) == 1, outputs


@pytest.mark.parametrize(
    "protocol", ["none", "continuous", "periodic:b=5", "gossip:b=3", "dynamic", "dynamic:b=1"]
)
def test_batched_and_per_node_learners_end_with_the_same_models(protocol: str) -> None:
    """Same scenario, seeds and protocol: the batched learner (all nodes in one tensor) and
    the per-node reference learner end with the same parameters, and so take the same
    protocol decisions (syncs, bytes), with momentum and a learning-rate schedule."""
    finals = {}
    for learner in ("batched", "per-node"):
        scenario = load_scenario(
            None,
            {
                "nodes": 8,
                "steps": 80,
                "partition": "dirichlet:alpha=0.5",
                "learner": learner,
                "momentum": 0.5,
                "lr_schedule": "cosine:min=0.2",
                "seed": 3,
            },
        )
        sim = Simulation(prepare(scenario), protocol)
        summary = sim.run()
        finals[learner] = (sim.learner.stacked(), summary["syncs"], summary["bytes_sent"])
    (batched, b_syncs, b_bytes), (per_node, p_syncs, p_bytes) = finals.values()
    assert (b_syncs, b_bytes) == (p_syncs, p_bytes)
    assert (b_syncs > 0) == (protocol != "none")
    torch.testing.assert_close(batched, per_node, rtol=1e-4, atol=1e-5)


def test_drift_recovery_reads_the_settled_level_and_the_steps_back_to_it():
    from p2pfl.data.datasets import DriftEvent
    from p2pfl.simulator.stream import drift_recovery

    accuracy = {10: 0.5, 20: 0.8, 30: 0.9, 40: 0.9, 50: 0.9, 60: 0.9, 70: 0.4, 80: 0.88, 90: 0.9}
    rows = [{"step": t, "prequential_accuracy": a, "bytes": 100 * t} for t, a in accuracy.items()]
    (sudden,) = drift_recovery(rows, [DriftEvent(40, 1, 0)])
    assert sudden["prequential_before"] == pytest.approx(0.9)  # the window (30, 40]
    assert sudden["bytes_per_step_before"] == pytest.approx(100)
    assert sudden["recovery_steps"] == 10  # (40, 50] is already back at 0.9
    # gradual over 30 steps: windows inside the transition do not count, even when high
    (gradual,) = drift_recovery(rows, [DriftEvent(40, 1, 30)])
    assert gradual["recovery_steps"] == 40  # (70, 80]: 0.88 >= 0.9 * 0.9 (RECOVERY_SHARE)
    first, second = drift_recovery(rows, [DriftEvent(40, 1, 0), DriftEvent(60, 0, 0)])
    assert first["recovery_steps"] == 10 and second["recovery_steps"] == 20
    assert second["prequential_before"] == pytest.approx(0.9)  # (50, 60]
    never = [dict(r, prequential_accuracy=0.1) if r["step"] > 40 else r for r in rows]
    assert drift_recovery(never, [DriftEvent(40, 1, 0)])[0]["recovery_steps"] is None
