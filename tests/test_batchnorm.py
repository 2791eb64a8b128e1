"""BatchNorm: the batched learner trains it like the per-node learner (running statistics per
node, stacked), predictions use each node's own statistics, and ``local=bn`` keeps the
BatchNorm layers' affine parameters on the node: they appear in no message (frame
inspection, as the community tests do)."""

from __future__ import annotations

import pytest
import torch
from test_sim_communities import Wiretap

from p2pfl.learning.batched import BatchedLearner
from p2pfl.learning.learner import PerNodeLearner, SGDConfig
from p2pfl.learning.sampler import NodeDataBank
from p2pfl.models import build_model, local_parameters
from p2pfl.protocol.config import parse_protocol
from p2pfl.simulator.engine import Simulation, prepare
from p2pfl.simulator.scenario import load_scenario
from p2pfl.spec import SpecError
from p2pfl.wire.codec import decode, encode

NODES = 3
BN = ["bn1.weight", "bn1.bias", "bn2.weight", "bn2.bias"]


def node_data(seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(20 + 5 * k, 64, generator=g) * (1 + k) + k for k in range(NODES)]
    ys = [torch.randint(0, 10, (len(x),), generator=g) for x in xs]
    return xs, ys


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_batched_learner_trains_batchnorm_like_the_per_node_learner(momentum):
    model = build_model("cnn-bn", (1, 8, 8), 10, seed=0)
    assert local_parameters(model, "bn") == BN
    xs, ys = node_data()
    sgd = SGDConfig(lr=0.05, momentum=momentum)
    per = PerNodeLearner(model, NodeDataBank(xs, ys, 8, seed=1), sgd)
    batched = BatchedLearner(model, NodeDataBank(xs, ys, 8, seed=1), sgd)
    for t in range(6):  # all nodes, then subsets: buffers of idle nodes must not move
        nodes = torch.arange(NODES) if t % 2 == 0 else torch.tensor([2, 0][: 1 + t % 3 // 2])
        torch.testing.assert_close(batched.step(nodes), per.step(nodes), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(batched.stacked(), per.stacked(), atol=1e-5, rtol=1e-4)
    for name in ("bn1.running_mean", "bn2.running_var", "bn2.num_batches_tracked"):
        mine = torch.stack([per.models[k].get_buffer(name) for k in range(NODES)])
        torch.testing.assert_close(batched.buffers[name], mine, atol=1e-5, rtol=1e-4)
    # each node has its own statistics (its own data), and predictions use them
    assert not torch.allclose(
        batched.buffers["bn1.running_mean"][0], batched.buffers["bn1.running_mean"][2]
    )
    x = torch.randn(7, 64)
    torch.testing.assert_close(batched.logits(x), per.logits(x), atol=1e-4, rtol=1e-4)
    before = {k: v.clone() for k, v in batched.buffers.items()}
    batched.evaluate(x, torch.zeros(7, dtype=torch.long))
    per.evaluate(x, torch.zeros(7, dtype=torch.long))
    assert all(torch.equal(before[k], batched.buffers[k]) for k in before)  # eval: no update
    assert per.models[0].training and batched.template.training


def test_local_spec_key():
    assert parse_protocol("dynamic:local=bn").local == "bn"
    assert parse_protocol("periodic:b=5,local=bn,codec=int8").local == "bn"
    assert parse_protocol("dynamic").local == ""
    with pytest.raises(SpecError, match="bad value 'all' for 'local'.*FedBN"):
        parse_protocol("dynamic:local=all")


def scenario(**overrides):
    settings = {
        "nodes": 4,
        "topology": "complete",
        "dataset": "digits",
        "partition": "dirichlet:alpha=0.1",
        "model": "cnn-bn",
        "steps": 24,
        "batch_size": 8,
        "eval_every": 12,
        "seed": 1,
    }
    return load_scenario(None, settings | overrides)


@pytest.mark.parametrize(
    "protocol",
    [
        "continuous:local=bn",
        "dynamic:local=bn,codec=int8",
        "gossip:local=bn,codec=topk,topk=0.2,values=int8",
    ],
)
def test_local_bn_parameters_never_leave_the_node(monkeypatch, protocol):
    prepared = prepare(scenario())
    sim = Simulation(prepared, protocol)
    tap = Wiretap(sim, monkeypatch)
    start = sim.learner.stacked().clone()
    sim.run()
    (channel,) = sim.channels
    assert channel.part.schema.names == [n for n in sim.schema.names if n not in BN]
    assert len(tap.frames) > 20
    full = dict(zip(sim.schema.names, range(len(sim.schema.names)), strict=True))
    for frame in tap.frames:
        data = encode(frame["message"], frame["schema"])
        assert len(data) == frame["size"] and frame["schema"] == channel.part.schema
        params = getattr(decode(data, frame["schema"]), "params", None)
        if isinstance(params, torch.Tensor):  # float32: exactly the sender's shared entries
            assert torch.equal(params, channel.part.take(frame["full"]))
        for name in BN:
            assert name.encode() not in data
            value = sim.schema.split(frame["full"])[full[name]]
            assert value.numpy().tobytes() not in data
    # the BatchNorm parameters trained on each node's own data and were never averaged
    bn = torch.cat([sim.schema.split(sim.learner.stacked())[full[n]] for n in BN], dim=1)
    assert not torch.equal(bn, torch.cat([sim.schema.split(start)[full[n]] for n in BN], dim=1))
    assert all(not torch.allclose(bn[0], bn[k]) for k in range(1, 4))


def test_without_local_the_batchnorm_parameters_are_shared():
    prepared = prepare(scenario(steps=2))
    (channel,) = Simulation(prepared, "continuous").channels
    assert set(BN) <= set(channel.part.schema.names)
