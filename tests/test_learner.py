"""The batched learner (stacked parameters, vmap) is pinned to the per-node reference learner:
same model, same data bank seed, same steps -> the same parameters, losses, prequential
accuracy and evaluation, with and without a learning-rate schedule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from p2pfl.learning.batched import BatchedLearner
from p2pfl.learning.learner import PerNodeLearner, SGDConfig, predicted
from p2pfl.learning.params import ParamSchema
from p2pfl.learning.sampler import NodeDataBank
from p2pfl.learning.schedule import parse_lr_schedule

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
    # nodes take different numbers of steps below, so their rates differ within one step
    SGDConfig(lr=0.2, momentum=0.5, schedule=parse_lr_schedule("step:every=3,gamma=0.5")),
    SGDConfig(lr=0.2, schedule=parse_lr_schedule("restarts:period=5,warmup=2,min=0.1")),
]


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize(
    "sgd", SGDS, ids=["plain", "momentum", "momentum+decay", "step-lr", "restarts-lr"]
)
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
    assert torch.equal(per.steps_taken, batched.steps_taken)
    assert [per.lr(n) for n in range(NODES)] == pytest.approx([batched.lr(n) for n in everyone])
    average = per.evaluate_average(x[0], y[0])
    assert batched.evaluate_average(x[0], y[0]) == pytest.approx(average, abs=ATOL)


@pytest.mark.parametrize("kind", ["relu-mlp", "residual"])
@pytest.mark.parametrize("which", ["per-node", "batched"])
def test_prequential_scores_a_batch_before_the_step_that_trains_on_it(which, kind):
    model, (xs, ys) = make_model(4, kind), node_data(4)
    cls = PerNodeLearner if which == "per-node" else BatchedLearner
    learner = cls(model, NodeDataBank(xs, ys, batch_size=8, seed=4), SGDConfig(lr=0.3))
    shadow = NodeDataBank(xs, ys, batch_size=8, seed=4)  # draws the same batches
    nodes = torch.tensor([0, 2, 3])
    for _ in range(3):
        xb, yb = shadow.draw(nodes)
        before = torch.stack(
            [learner.logits_each(xb[k].expand(NODES, -1, -1))[n] for k, n in enumerate(nodes)]
        )
        expected_acc = (before.argmax(2) == yb).float().mean(1)
        expected_loss = nn.functional.cross_entropy(before.transpose(1, 2), yb, reduction="none")
        result = learner.step(nodes)
        torch.testing.assert_close(result.accuracy, expected_acc)
        torch.testing.assert_close(result.loss, expected_loss.mean(1), atol=ATOL, rtol=0)
        after = torch.stack(
            [learner.logits_each(xb[k].expand(NODES, -1, -1))[n] for k, n in enumerate(nodes)]
        )
        # the scores are not those of the trained model: it fits the batch better now
        trained = nn.functional.cross_entropy(after.transpose(1, 2), yb, reduction="none")
        assert (trained.mean(1) < result.loss).all()


def test_lr_schedule_sets_each_nodes_rate_by_its_own_step_count():
    sgd = SGDConfig(lr=0.5, schedule=parse_lr_schedule("step:every=2,gamma=0"))
    per, batched = pair(sgd, seed=5)
    for learner in (per, batched):
        assert learner.lr(0) == 0.5  # before any step: the rate of the first one
        learner.step(torch.arange(NODES))
        learner.step(torch.tensor([0, 1]))
        assert [learner.lr(n) for n in range(NODES)] == [0.5, 0.5, 0.5, 0.5, 0.5]
        frozen = learner.stacked().clone()
        learner.step(torch.arange(NODES))  # nodes 0, 1: their third step, at rate 0
        assert torch.equal(learner.stacked()[:2], frozen[:2])
        assert not torch.equal(learner.stacked()[2:], frozen[2:])
        assert learner.lr(0) == learner.lr(1) == 0.0 and learner.lr(2) == 0.5
        # the mean over the latest steps (as many as taken): what a merge divides by
        assert learner.lr(0, steps=3) == pytest.approx(1 / 3) and learner.lr(2, steps=3) == 0.5
    assert_same(per, batched)


@pytest.mark.parametrize("kind", list(MODELS))
def test_evaluate_is_per_node_and_agrees_and_so_does_the_average_model(kind):
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
    # the average model: the mean of the nodes' parameters (not the mean of their accuracies)
    model = make_model(3, kind)
    per.schema.load(model, per.stacked().mean(0))
    with torch.no_grad():
        out = model(x)
    expected = ((out.argmax(1) == y).float().mean().item(), nn.functional.cross_entropy(out, y))
    for learner in (per, batched):
        acc, loss = learner.evaluate_average(x, y)
        assert acc == pytest.approx(expected[0], abs=ATOL)
        assert loss == pytest.approx(float(expected[1]), abs=ATOL)


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


def test_gradual_drift_labels_a_share_of_drawn_samples_by_the_next_concept():
    xs, ys = node_data()
    bank = NodeDataBank(xs, ys, batch_size=400, seed=1)
    flipped = bank.padded_labels([(y + 1) % CLASSES for y in ys])
    nodes = torch.arange(NODES)
    for share, low, high in ((0.0, 0.0, 0.0), (0.3, 0.25, 0.35), (1.0, 1.0, 1.0)):
        bank.set_labels(bank.padded_labels(ys), flipped, share)
        x, y = bank.draw(nodes)
        # which samples were drawn: recover each one's original label from its features
        original = torch.stack(
            [
                torch.stack([ys[n][(xs[n] == row).all(1).nonzero()[0, 0]] for row in x[k]])
                for k, n in enumerate(nodes.tolist())
            ]
        )
        new = y == (original + 1) % CLASSES
        assert ((y == original) | new).all()
        assert low <= new.float().mean() <= high
    with pytest.raises(ValueError, match="labels for"):
        bank.padded_labels(ys[:-1] + [ys[-1][:-1]])


def test_predicted_is_argmax_bit_for_bit_with_ties_nan_and_inf():
    """``predicted`` (``max(1)``, the fast form) picks what ``argmax(1)`` picks: the first
    maximum, NaN counting as the maximum, on logits full of ties, NaN and infinities."""
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        k, classes, n = (int(torch.randint(1, hi, (1,), generator=g)) for hi in (20, 12, 40))
        if trial % 3 == 0:
            logits = torch.randn(k, classes, n, generator=g)
        else:  # few distinct values: many ties
            logits = torch.randint(-3, 3, (k, classes, n), generator=g).float()
            draw = torch.rand(k, classes, n, generator=g)
            logits[draw < 0.05] = float("nan")
            logits[(draw >= 0.05) & (draw < 0.1)] = float("inf")
            logits[(draw >= 0.1) & (draw < 0.15)] = float("-inf")
        assert torch.equal(predicted(logits), logits.argmax(1))
