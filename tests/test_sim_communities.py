"""Communities in simulation: private parameters never travel, a node in two communities shares
disjoint parts, the plain single-channel simulation is unchanged, data-poor nodes gain from
joining, the ``labels`` partitioner, own-objective accuracy, and scenario validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from p2pfl.cli import app
from p2pfl.data import load_dataset, split_nodes
from p2pfl.learning.batched import BatchedLearner
from p2pfl.learning.learner import PerNodeLearner, SGDConfig
from p2pfl.learning.sampler import NodeDataBank
from p2pfl.models import build_model
from p2pfl.simulator import engine
from p2pfl.simulator.engine import Simulation, prepare
from p2pfl.simulator.results import run_scenario
from p2pfl.simulator.scenario import ScenarioError, load_scenario
from p2pfl.spec import SpecError
from p2pfl.wire.codec import decode, encode
from p2pfl.wire.messages import Confirm

ROOT = Path(__file__).resolve().parent.parent
TWO_PARTS = [
    {"name": "body", "members": "0-5", "shared": ["fc1.*"], "protocol": "gossip"},
    {"name": "heads", "members": [4, 5, 6, 7], "shared": "head.*", "protocol": "continuous"},
]


def scenario(communities=TWO_PARTS, **overrides):
    settings = {
        "nodes": 8,
        "steps": 40,
        "eval_every": 20,
        "partition": "labels:k=4,min=8,max=60",
        "communities": communities,
    }
    return load_scenario(None, settings | overrides)


class Wiretap:
    """Records every message the engine sizes for a link: its schema, sender, receiver, and
    the sender's full parameters at that moment."""

    def __init__(self, sim: Simulation, monkeypatch: pytest.MonkeyPatch) -> None:
        self.frames: list[dict] = []
        sized = engine.encoded_size
        transmit = sim.net.transmit

        def tap_size(message, schema):
            self.frames.append({"message": message, "schema": schema})
            return sized(message, schema)

        def tap_transmit(now, src, dst, size):
            frame = self.frames[-1]
            frame |= {"src": src, "dst": dst, "size": size, "full": sim.learner.get(src).clone()}
            return transmit(now, src, dst, size)

        monkeypatch.setattr(engine, "encoded_size", tap_size)
        monkeypatch.setattr(sim.net, "transmit", tap_transmit)


def tapped_run(monkeypatch, prepared):
    sim = Simulation(prepared, "communities", prepared.communities)
    tap = Wiretap(sim, monkeypatch)
    summary = sim.run()
    return sim, tap.frames, summary


def test_private_parameters_never_appear_in_any_message(monkeypatch):
    prepared = prepare(scenario())
    sim, frames, summary = tapped_run(monkeypatch, prepared)
    body, heads = prepared.communities
    assert {f["schema"] for f in frames} == {body.part.schema, heads.part.schema}
    assert summary["messages"] == len(frames) > 100
    for frame in frames:
        schema, message = frame["schema"], frame["message"]
        channel = body if schema == body.part.schema else heads
        private = [n for n in sim.schema.names if n not in schema.names]
        data = encode(message, schema)
        assert len(data) == frame["size"]  # the link carried exactly these bytes
        for name in private:
            assert name.encode() not in data
        if isinstance(message, Confirm):
            continue  # a gossip exchange's confirmation carries no parameters
        assert decode(data, schema).params.shape == (schema.numel,)
        # gossip pushes and continuous rounds carry the shared entries of the sender only
        assert torch.equal(message.params, channel.part.take(frame["full"]))


def test_a_node_in_two_communities_shares_disjoint_parts(monkeypatch):
    prepared = prepare(scenario())
    _, frames, summary = tapped_run(monkeypatch, prepared)
    body, heads = prepared.communities
    assert body.part.schema.names == ["fc1.weight", "fc1.bias"]
    assert heads.part.schema.names == ["head.weight", "head.bias"]
    for frame in frames:
        channel = body if frame["schema"] == body.part.schema else heads
        assert channel.graph.has_edge(frame["src"], frame["dst"])  # only with its members
    for node in (4, 5):  # in both: fc1 goes to body, head to heads, each once per message
        sent = {tuple(f["schema"].names) for f in frames if f["src"] == node}
        assert sent == {("fc1.weight", "fc1.bias"), ("head.weight", "head.bias")}
    channels = {c["name"]: c for c in summary["channels"]}
    assert channels["body"]["bytes_sent"] + channels["heads"]["bytes_sent"] == summary["bytes_sent"]
    assert channels["heads"]["shared_params"] == 64 * 10 + 10


def test_shared_entries_agree_private_entries_stay_own():
    communities = [{"name": "all", "members": "0-5", "shared": ["fc1.*"], "protocol": "continuous"}]
    prepared = prepare(scenario(communities))
    runs = {}
    for name, channels in (("alone", []), ("communities", prepared.communities)):
        sim = Simulation(prepared, name, channels)
        sim.run()
        runs[name] = sim.learner.stacked().clone()
    part = prepared.communities[0].part
    private = torch.ones(runs["alone"].shape[1], dtype=torch.bool)
    private[part.index] = False
    together = runs["communities"][:6]

    def spread(w):
        return float((w - w.mean(0)).square().sum(1).mean())

    # averaged every step: the shared part is one step of local training apart at most
    assert spread(part.take(together)) < 0.05 * spread(part.take(runs["alone"][:6]))
    assert spread(together[:, private]) > 0.5 * spread(runs["alone"][:6][:, private])
    # nodes 6 and 7 are in no community: same data, batches and init, so the very same model
    assert torch.equal(runs["communities"][6:], runs["alone"][6:])


# Recorded with the engine before channels existed (commit a85b0e6), same scenario and seed
# (identical under every PYTHONHASHSEED tried); dynamic and gossip re-recorded when core seeds
# became ``runtime.core_seed`` and gossip when clipping became the default (issue 11); all
# three when the drift correction became every protocol's (periodic, gossip), gossip a
# pairwise exchange (3 of its 1,565 merges clipped) and dynamic's default condition the
# smoothed one. A deliberate change of a protocol or of the learner moves these too:
# re-record them by running this scenario at the parent commit. Gossip re-recorded when a
# merge with a clipped model stopped teaching the drift correction (issue 11: 0.7118 -> 0.7153),
# and back when that rule was kept to dynamic (it broke continuous: 0.969 -> 0.575); and when
# a peer's radius became scaled by its progress (issue 11, replay: 0.7118 -> 0.7022).
# Accuracy was a float32 mean over nodes then and is an exactly rounded one now (1e-7 apart).
# Periodic re-recorded when a neighbour that let a round go by became a straggler (issue 11,
# silent peers: with speed_spread a neighbour far ahead pushes outside the round window, and
# is no longer waited for round after round: 3 more syncs, same bytes, 0.5061 -> 0.5064);
# and when a push of a round that could not be matched (101 of its 310 here: nodes of other
# speeds count other rounds) became its sender's fallback instead of being dropped: 9 more
# syncs, same bytes, 0.5064 -> 0.5311, loss 1.672 -> 1.527. Gossip re-recorded when the
# receiver of an exchange began learning its correction update only once the initiator
# confirms (issue 11, flood: 782 confirmations, 20,332 bytes, none missing; 0.7022 -> 0.7073).
# Gossip and periodic re-recorded when PeerProgress began keeping our own model as a
# half-precision snapshot (issue 11, memory: our move since a peer's last model is measured
# less the snapshot's rounding error): gossip clipped 87 models instead of 88, 0.7073 ->
# 0.7136; periodic the same clips and accuracy, loss 1.527215 -> 1.527228.
PINNED = {
    "periodic:b=5": (0.5310584917664528, 1.5272279888391496, 6023460, 310, 146),
    "dynamic": (0.6140668511390686, 1.3707069367170335, 3545008, 332, 109),
    "gossip": (0.7136490270495415, 1.3473816603422164, 30562622, 2353, 1565),
}


def test_default_single_channel_simulation_is_unchanged():
    plain = load_scenario(
        None,
        {
            "nodes": 8,
            "steps": 120,
            "topology": "ring",
            "protocols": tuple(PINNED),
            "seed": 2,
            "eval_every": 40,
            "partition": "dirichlet:alpha=0.5",
            "network": {"jitter": 0.003, "speed_spread": 0.3},
        },
    )
    summary = run_scenario(plain, None, progress=False)
    assert "joining" not in summary
    for run in summary["runs"]:
        expected = PINNED[run["protocol"]]
        accuracy, loss, sent, messages, syncs = expected
        assert run["final_accuracy"] == pytest.approx(accuracy, abs=1e-7)
        assert run["final_loss"] == pytest.approx(loss, rel=1e-6)
        assert (run["bytes_sent"], run["messages"], run["syncs"]) == (sent, messages, syncs)
        assert run["node_steps"] == 788
        assert "channels" not in run and "own_accuracy_nodes" not in run


def test_data_poor_nodes_gain_from_joining(tmp_path):
    fast = load_scenario(
        None,
        {
            "nodes": 10,
            "steps": 300,
            "eval_every": 100,
            "seed": 0,
            "partition": "labels:k=6,min=6,max=150",
            "communities": [
                {"name": "body", "members": "0-9", "shared": ["fc1.*"]},
                {
                    "name": "heads",
                    "members": "0-4",
                    "shared": ["head.*"],
                    "protocol": "periodic:b=5",
                },
            ],
        },
    )
    summary = run_scenario(fast, tmp_path, progress=False)
    joining = summary["joining"]
    poor = joining["groups"]["data_poor"]
    assert poor["nodes"] >= 5
    assert poor["mean_gain"] > 0.03  # measured +0.067 (seeds 0-3: +0.052 to +0.067)
    assert poor["share_gaining"] >= 0.75
    assert poor["mean_accuracy_communities"] > poor["mean_accuracy_alone"]
    rows = joining["nodes"]
    assert [r["node"] for r in rows] == list(range(10))
    for row in rows:
        assert row["gain"] == pytest.approx(row["accuracy_communities"] - row["accuracy_alone"])
        assert len(row["classes"]) == 6 and 6 <= row["train_samples"] <= 150
        assert row["member_of"] == (["body", "heads"] if row["node"] < 5 else ["body"])
    assert [c["name"] for c in joining["communities"]] == ["body", "heads"]
    assert all(c["bytes_sent"] > 0 for c in joining["communities"])
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["joining"] == json.loads(json.dumps(joining))
    assert [r["protocol"] for r in on_disk["runs"]] == ["alone", "communities"]
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(len(r["own_accuracy_nodes"]) == 10 for r in rows)


def test_own_objective_accuracy_is_measured_among_the_node_s_classes():
    prepared = prepare(scenario())
    sim = Simulation(prepared, "alone", [])
    sim.run()
    assert sim.objectives is not None
    measured = sim.objectives.accuracy(sim.learner)
    logits = sim.learner.logits(prepared.dataset.x_test)
    for i, node in enumerate(prepared.nodes):
        classes = node.y_train.unique()
        mine = torch.isin(prepared.dataset.y_test, classes)
        among = logits[i][mine][:, classes].argmax(1)
        expected = (classes[among] == prepared.dataset.y_test[mine]).float().mean()
        assert measured[i] == pytest.approx(float(expected))


def test_logits_each_batched_equals_per_node():
    model = build_model("mlp:hidden=16x8", (12,), 5, seed=0)
    g = torch.Generator().manual_seed(0)
    xs = [torch.rand(9, 12, generator=g) for _ in range(4)]
    ys = [torch.randint(0, 5, (9,), generator=g) for _ in range(4)]
    learners = [
        cls(model, NodeDataBank(xs, ys, 4, 0), SGDConfig())
        for cls in (BatchedLearner, PerNodeLearner)
    ]
    for learner in learners:
        for _ in range(3):
            learner.step(torch.arange(4))
    x = torch.rand(4, 7, 12, generator=g)
    torch.testing.assert_close(learners[0].logits_each(x), learners[1].logits_each(x))
    assert learners[0].logits_each(x).shape == (4, 7, 5)


# -- the labels partitioner --
def test_labels_partition_gives_each_node_its_own_objective():
    digits = load_dataset("digits", seed=3)
    nodes = split_nodes(digits, 20, "labels:k=3,min=5,max=120", seed=3)
    seen: set[tuple[float, ...]] = set()
    sizes = []
    for node in nodes:
        classes = node.y_train.unique()
        assert len(classes) == 3 and 5 <= len(node.y_train) <= 120
        counts = torch.bincount(node.y_train)[classes]
        assert int(counts.max() - counts.min()) <= 1  # spread evenly over its classes
        # local test split: every global test sample of its classes, and nothing else
        assert torch.equal(node.y_test.unique(), classes)
        assert len(node.y_test) == int(torch.isin(digits.y_test, classes).sum())
        rows = {tuple(x.tolist()) for x in node.x_train}
        assert not rows & seen  # disjoint from every other node's
        seen |= rows
        sizes.append(len(node.y_train))
    assert max(sizes) > 4 * min(sizes)  # very different data sizes
    again = split_nodes(digits, 20, "labels:k=3,min=5,max=120", seed=3)
    assert all(torch.equal(a.y_train, b.y_train) for a, b in zip(nodes, again, strict=True))


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("labels:k=11", "k=11 but the data set has 10 classes"),
        ("labels:k=4,min=3", "need k <= min <= max"),
        ("labels:min=50,max=10", "need k <= min <= max"),
        ("labels:k=4,min=300,max=400", "lower max or the number of nodes"),
        ("labels:k=4,size=3", "unknown argument(s) ['size']"),
    ],
)
def test_labels_partition_errors(spec, fragment):
    digits = load_dataset("digits", seed=0)
    with pytest.raises(SpecError) as info:
        split_nodes(digits, 24, spec, seed=0)
    assert fragment in str(info.value)


# -- scenario validation --
def community(**fields):
    return {"name": "c", "members": "0-3", "shared": ["fc1.*"]} | fields


@pytest.mark.parametrize(
    ("communities", "overrides", "fragments"),
    [
        ([community(members="0-8")], {}, ["'c'", "member 8 is out of range", "nodes are 0..7"]),
        ([community(members=[1, 9])], {}, ["member 9 is out of range"]),
        ([community(members="3-1")], {}, ["runs backwards"]),
        ([community(members="a-b")], {}, ["'members'", "not understood", '"0-11"']),
        ([community(members=[2])], {}, ["at least 2 members"]),
        ([community(members=[1, 1, 2])], {}, ["lists a node twice"]),
        ([community(colour="red")], {}, ["unknown key(s) ['colour']", "shared"]),
        ([{"name": "c", "members": "0-3"}], {}, ["missing key 'shared'", "fc1.*"]),
        ([community(shared=[])], {}, ["'shared' must list parameter name globs"]),
        ([community(protocol="telepathy")], {}, ["communities[0] ('c')", "unknown kind"]),
        ([community(protocol="none")], {}, ["shares nothing"]),
        ([community(), community()], {}, ["name 'c' is used twice"]),
        ([community()], {"protocols": ("dynamic",)}, ["'protocols' does not apply", "protocol"]),
        ([community()], {"topology": "ring"}, ["'topology' does not apply"]),
        ({"name": "c"}, {}, ["must be a list of tables", "[[communities]]"]),
    ],
)
def test_scenario_errors(communities, overrides, fragments):
    with pytest.raises(ScenarioError) as info:
        load_scenario(None, {"nodes": 8, "communities": communities} | overrides)
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("communities", "partition", "fragments"),
    [
        ([community(shared=["fc9.*"])], None, ["key 'shared'", "'fc9.*' matches no", "head.bias"]),
        (
            [community(name="a"), community(name="b", members="3-5", shared=["fc1.weight"])],
            None,
            ["node 3", "'fc1.weight'", "'a' and 'b'", "narrow"],
        ),
        ([community(topology="ring:k=2")], None, ["key 'topology'", "unknown argument"]),
        ([community()], "iid", ["node 0 has no local test samples", "labels:k=K"]),
    ],
)
def test_errors_found_when_the_model_and_data_are_known(communities, partition, fragments):
    settings = {"nodes": 8, "communities": communities, "partition": "labels:k=2,min=4,max=9"}
    if partition:  # 1,438 digits over 1,000 nodes: one or two samples each, none left to test
        settings |= {"nodes": 1000, "partition": partition}
    with pytest.raises(ScenarioError) as info:
        prepared = prepare(load_scenario(None, settings))
        Simulation(prepared, "communities", prepared.communities)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_the_communities_scenario_file_runs_from_the_command_line(tmp_path):
    out = tmp_path / "run"
    shortened = ["--steps", "60", "--quiet", "--out", out]
    result = CliRunner().invoke(app, ["sim", str(ROOT / "sim" / "communities.toml"), *shortened])
    text = " ".join(result.output.split())
    assert result.exit_code == 0, result.output
    for fragment in ("own-objective", "the value of joining", "data-poor", "communities"):
        assert fragment in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scenario"]["nodes"] == 24 and len(summary["scenario"]["communities"]) == 3
    members = [set(c["members"]) for c in summary["scenario"]["communities"]]
    assert any(a & b for a in members for b in members if a is not b)  # some overlap
    result = CliRunner().invoke(
        app, ["sim", str(ROOT / "sim" / "communities.toml"), "--protocol", "dynamic", "--quiet"]
    )
    assert result.exit_code == 2 and "does not apply with [[communities]]" in result.output


def test_refused_peers_exchange_no_model_bytes():
    """A community with admission: members 6 and 7 hold forged invites and ignore every
    refusal (their cores keep pushing to all members, their own gates let everything out).
    The others refuse their hellos and every frame they send (all counted), never send them
    the community's part, and admit and sync with each other. A community without admission
    beside it runs as before."""
    guarded = {"name": "body", "members": "0-7", "shared": ["fc1.*"], "protocol": "periodic:b=2"}
    guarded |= {"admission": "invite", "uninvited": "6-7"}
    heads = {"name": "heads", "members": [0, 1, 2], "shared": "head.*", "protocol": "continuous"}
    prepared = prepare(scenario([guarded, heads]))
    sim = Simulation(prepared, "communities", prepared.communities)
    uninvited, invited = {6, 7}, set(range(6))
    admits = sim.gates.admits
    sim.gates.admits = lambda c, src, dst: src in uninvited or admits(c, src, dst)
    for node in uninvited:
        core = sim.runtimes[0][node].core
        core.on_peer_down = lambda now, peer: []
        core.neighbors |= {str(member) for member in invited}  # they pick the members
    sent, taken = [], []
    push = sim._push

    def record_push(at, origin, kind, payload):
        if kind == "msg":
            sent.append(payload[:3])
        return push(at, origin, kind, payload)

    sim._push = record_push
    for c, runtimes in enumerate(sim.runtimes):
        for node, runtime in runtimes.items():
            core = runtime.core

            def on_message(now, sender, message, c=c, node=node, real=core.on_message):
                taken.append((c, int(sender), node))
                return real(now, sender, message)

            core.on_message = on_message
    summary = sim.run()
    pushed = [s for s in sent if s[0] == 0 and s[1] in uninvited]
    assert len(pushed) >= 2 * len(invited) * 10  # every 2 steps to every member
    assert summary["channels"][0]["refused"] >= len(pushed) + 2 * len(invited)  # and hellos
    assert not [s for s in sent if s[0] == 0 and s[1] in invited and s[2] in uninvited]
    assert not [t for t in taken if t[0] == 0 and uninvited & {t[1], t[2]}]
    assert {(t[1], t[2]) for t in taken if t[0] == 0} == {
        (a, b) for a in invited for b in invited if a != b
    }
    cores = {node: runtime.core for node, runtime in sim.runtimes[0].items()}
    for node in invited:
        assert cores[node].live_neighbors == [str(n) for n in sorted(invited - {node})]
        assert cores[node].stats.syncs > 0
    assert summary["channels"][1]["refused"] == 0 and summary["channels"][1]["syncs"] > 0


def test_admission_keys_are_checked():
    base = {"name": "body", "members": "0-7", "shared": ["fc1.*"]}
    cases = [
        ({"admission": "closed"}, "'admission' must be 'invite' or 'open'"),
        ({"admission": "open", "uninvited": [3]}, 'needs admission = "invite"'),
        ({"admission": "invite", "uninvited": [9]}, "[9] are not in 'members'"),
        ({"admission": "invite", "uninvited": "0-1"}, "first member (0) founds it"),
    ]
    for keys, message in cases:
        with pytest.raises(ScenarioError, match=None) as info:
            scenario([base | keys])
        assert message in str(info.value), (keys, str(info.value))
