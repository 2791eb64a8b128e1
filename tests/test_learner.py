"""The batched learner (stacked parameters, vmap) is pinned to the per-node reference learner:
same model, same data bank seed, same steps -> the same parameters, losses and evaluation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from p2pfl.learning.learner import BatchedLearner, PerNodeLearner, SGDConfig
from p2pfl.learning.params import ParamSchema
from p2pfl.learning.sampler import NodeDataBank

NODES, FEATURES, CLASSES = 5, 10, 4
ATOL = 1e-5


@pytest.fixture(autouse=True)
def one_thread():
    """Small models: one thread is faster and immune to a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Residual(nn.Module):
    """Not a plain Sequential: the batched learner trains it through vmap + autograd."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(FEATURES, 16)
        self.head = nn.Linear(16, CLASSES, bias=False)

    def forward(self, x):
        h = self.inp(x)
        return self.head(torch.tanh(h) + h)


MODELS = {
    "relu-mlp": lambda: nn.Sequential(
        nn.Linear(FEATURES, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, CLASSES)
    ),
    "logistic": lambda: nn.Sequential(nn.Linear(FEATURES, CLASSES)),
    "tanh-mlp": lambda: nn.Sequential(nn.Linear(FEATURES, 16), nn.Tanh(), nn.Linear(16, CLASSES)),
    "residual": Residual,
}


def make_model(seed=0, kind="relu-mlp"):
    torch.manual_seed(seed)
    return MODELS[kind]()


def node_data(seed=0):
    """Every node has its own data and its own (different) number of samples."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for node in range(NODES):
        n = 12 + 7 * node
        xs.append(torch.randn(n, FEATURES, generator=g))
        ys.append(torch.randint(0, CLASSES, (n,), generator=g))
    return xs, ys


def pair(sgd, seed=0, kind="relu-mlp"):
    model, (xs, ys) = make_model(seed, kind), node_data(seed)
    per = PerNodeLearner(model, NodeDataBank(xs, ys, batch_size=8, seed=seed), sgd)
    batched = BatchedLearner(model, NodeDataBank(xs, ys, batch_size=8, seed=seed), sgd)
    return per, batched


def assert_same(per, batched):
    torch.testing.assert_close(batched.stacked(), per.stacked(), atol=ATOL, rtol=0)
    for node in range(NODES):
        torch.testing.assert_close(batched.get(node), per.get(node), atol=ATOL, rtol=0)
        torch.testing.assert_close(batched.correction(node), per.correction(node))


def test_both_start_from_the_same_model():
    per, batched = pair(SGDConfig())
    flat = ParamSchema.from_module(make_model()).flatten(make_model())
    assert batched.stacked().shape == (NODES, flat.numel())
    for node in range(NODES):
        torch.testing.assert_close(per.get(node), flat)
    assert_same(per, batched)


SGDS = [
    SGDConfig(lr=0.1),
    SGDConfig(lr=0.05, momentum=0.9),
    SGDConfig(lr=0.1, momentum=0.5, weight_decay=0.01),
]


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("sgd", SGDS, ids=["plain", "momentum", "momentum+decay"])
@pytest.mark.parametrize("with_correction", [False, True], ids=["", "correction"])
def test_batched_equals_per_node(sgd, with_correction, kind):
    per, batched = pair(sgd, seed=1, kind=kind)
    g = torch.Generator().manual_seed(7)
    if with_correction:
        corr = torch.randn(per.schema.numel, generator=g) * 0.05
        for learner in (per, batched):
            learner.set_correction(2, corr)
    start = per.stacked().clone()
    everyone = torch.arange(NODES)
    for _ in range(8):
        torch.testing.assert_close(batched.step(everyone), per.step(everyone), atol=ATOL, rtol=0)
        assert_same(per, batched)
    for _ in range(12):  # random subsets of active nodes (some steps without node 2)
        active = torch.randperm(NODES, generator=g)[
            : int(torch.randint(1, NODES, (1,), generator=g))
        ]
        active = active.sort().values
        idle = sorted(set(range(NODES)) - set(active.tolist()))
        frozen = per.stacked()[idle].clone()
        torch.testing.assert_close(batched.step(active), per.step(active), atol=ATOL, rtol=0)
        assert_same(per, batched)
        torch.testing.assert_close(batched.stacked()[idle], frozen)  # idle nodes untouched
    # the protocol replaces a model (optimizer state kept), then training goes on
    merged = per.stacked()[:3].mean(0)
    for learner in (per, batched):
        learner.set(0, merged)
        learner.set(1, merged)
    for _ in range(4):
        torch.testing.assert_close(batched.step(everyone), per.step(everyone), atol=ATOL, rtol=0)
    assert_same(per, batched)
    assert (per.stacked() - start).abs().max() > 0.05  # they did train
    x, y = node_data(seed=9)
    for a, b in zip(per.evaluate(x[0], y[0]), batched.evaluate(x[0], y[0]), strict=True):
        torch.testing.assert_close(b, a, atol=ATOL, rtol=0)


def test_correction_changes_only_its_node_and_can_be_cleared():
    per, batched = pair(SGDConfig(lr=0.1), seed=2)
    reference, _ = pair(SGDConfig(lr=0.1), seed=2)
    corr = torch.full((per.schema.numel,), 0.3)
    for learner in (per, batched):
        learner.set_correction(3, corr)
    everyone = torch.arange(NODES)
    for learner in (per, batched, reference):
        learner.step(everyone)
    assert_same(per, batched)
    moved = per.stacked() - reference.stacked()
    assert moved[[0, 1, 2, 4]].abs().max() == 0
    torch.testing.assert_close(moved[3], -0.1 * corr, atol=ATOL, rtol=0)  # w -= lr * c
    for learner in (per, batched):
        learner.set_correction(3, None)
        torch.testing.assert_close(learner.correction(3), torch.zeros(per.schema.numel))
    reference.set(3, per.get(3))  # from the same point, a cleared node trains uncorrected
    for learner in (per, batched, reference):
        learner.step(everyone)
    assert_same(per, batched)
    torch.testing.assert_close(per.stacked(), reference.stacked(), atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", list(MODELS))
def test_evaluate_is_per_node_and_agrees(kind):
    per, batched = pair(SGDConfig(lr=0.2), seed=3, kind=kind)
    for _ in range(15):
        per.step(torch.arange(NODES))
        batched.step(torch.arange(NODES))
    x, y = node_data(seed=4)
    x, y = torch.cat(x), torch.cat(y)
    (acc_p, loss_p), (acc_b, loss_b) = per.evaluate(x, y), batched.evaluate(x, y)
    assert acc_p.shape == loss_p.shape == (NODES,)
    torch.testing.assert_close(acc_b, acc_p, atol=ATOL, rtol=0)
    torch.testing.assert_close(loss_b, loss_p, atol=ATOL, rtol=0)
    # node 0's numbers are those of its own model
    model = per.models[0]
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(acc_p[0], (out.argmax(1) == y).float().mean())
    torch.testing.assert_close(loss_p[0], nn.functional.cross_entropy(out, y), atol=ATOL, rtol=0)


def test_same_seed_same_batches_and_different_seed_different_ones():
    xs, ys = node_data()
    a = NodeDataBank(xs, ys, batch_size=6, seed=5)
    b = NodeDataBank(xs, ys, batch_size=6, seed=5)
    c = NodeDataBank(xs, ys, batch_size=6, seed=6)
    nodes = torch.tensor([0, 3])
    (xa, ya), (xb, yb), (xc, _) = a.draw(nodes), b.draw(nodes), c.draw(nodes)
    assert xa.shape == (2, 6, FEATURES) and ya.shape == (2, 6)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(xa, xc)
    # every drawn sample belongs to its own node (padding is never drawn)
    for k, node in enumerate(nodes.tolist()):
        own = {tuple(row.tolist()) for row in xs[node]}
        assert all(tuple(row.tolist()) in own for row in xa[k])


def test_batchnorm_is_refused_by_the_batched_learner():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(FEATURES, 8), nn.BatchNorm1d(8), nn.Linear(8, CLASSES))
    xs, ys = node_data()
    with pytest.raises(ValueError, match="per-node learner") as info:
        BatchedLearner(model, NodeDataBank(xs, ys, 8, 0), SGDConfig())
    assert "BatchNorm1d" in str(info.value)
    # the per-node learner takes it
    per = PerNodeLearner(model, NodeDataBank(xs, ys, 8, 0), SGDConfig())
    before = per.stacked().clone()
    per.step(torch.arange(NODES))
    assert not torch.equal(per.stacked(), before)
