"""A stream of fresh samples, and the metrics that compare protocols on a changing stream
(``sim/stream.py``): bytes at equal prequential accuracy, recovery per drift, settled
traffic."""

from __future__ import annotations

import math

import pytest
import torch

from p2pfl.data import load_dataset
from p2pfl.data.datasets import DriftEvent
from p2pfl.learning.sampler import NodeDataBank
from p2pfl.simulator.stream import (
    bytes_at_accuracy,
    closest_traffic,
    drift_recovery,
    settled_traffic,
)
from p2pfl.spec import SpecError

FRESH = "synthetic:n=600,features=5,classes=3,fresh=1,modes=2,drift_every=50"


def _bank(seed: int = 0) -> tuple[NodeDataBank, torch.Tensor]:
    data = load_dataset(FRESH, seed=0)
    ys = [data.y_train[:10], data.y_train[10:13]]
    xs = [data.x_train[:10], data.x_train[10:13]]
    return NodeDataBank(xs, ys, batch_size=64, seed=seed, fresh=data.fresh), data.fresh.means


def test_fresh_batches_are_new_samples_of_the_nodes_own_classes():
    bank, means = _bank()
    seen: set[tuple[float, ...]] = set()
    for _ in range(5):
        x, y = bank.draw(torch.tensor([0, 1]))
        rows = {tuple(v.tolist()) for v in x.reshape(-1, x.shape[-1])}
        assert not rows & seen and len(rows) == x.shape[0] * x.shape[1]  # never seen twice
        seen |= rows
        for node in (0, 1):
            own = set(bank.classes[node, : bank.counts[node]].tolist())
            assert set(y[node].tolist()) <= own  # the node's class mix is kept
    # each sample is a mode of its own class plus unit noise: E||x - mode||² = 5 features
    x, y = bank.draw(torch.tensor([0, 1]))
    distance = (x.reshape(-1, 1, 1, 5) - means[None]).square().sum(-1).amin(-1)  # [n, classes]
    own = distance.gather(1, y.reshape(-1, 1))
    assert 3.5 < float(own.mean()) < 6.5 < float(distance.mean()) + 1


def test_fresh_labels_follow_the_concept_and_shards_draw_the_same_samples():
    bank, _ = _bank()
    whole = bank.draw(torch.tensor([0, 1]))
    shard, _ = _bank()
    part = shard.draw(torch.tensor([1]), window=(1, 2))
    assert torch.equal(part[0][0], whole[0][1]) and torch.equal(part[1][0], whole[1][1])
    shard.skip(2)  # a step none of the shard's nodes takes keeps it in step
    bank.draw(torch.tensor([0, 1]))
    later = bank.draw(torch.tensor([0, 1]))[0][:1]
    assert torch.equal(shard.draw(torch.tensor([0]), window=(0, 2))[0], later)
    assert not torch.equal(later, whole[0][:1])  # and every step draws new samples
    drift = load_dataset(FRESH, seed=0).drift
    permuted = drift.permutations[1][bank.classes]
    bank.set_labels(permuted)
    x, y = bank.draw(torch.tensor([0]))
    assert set(y[0].tolist()) <= set(permuted[0, : bank.counts[0]].tolist())


def test_bad_stream_specs():
    for spec in ("synthetic:fresh=2", "synthetic:fresh=1,drift=rotate,drift_at=5"):
        with pytest.raises(SpecError):
            load_dataset(spec, seed=0)
    assert load_dataset("synthetic:n=100", seed=0).fresh is None


def test_bytes_at_accuracy_reads_the_frontier_in_log_bytes():
    points = [(0, 0.5), (100, 0.7), (10_000, 0.9), (1_000, 0.65)]  # (1,000, 0.65) is beaten
    assert bytes_at_accuracy(points, 0.9) == pytest.approx(10_000)
    assert bytes_at_accuracy(points, 0.8) == pytest.approx(1_000)  # halfway in log bytes
    assert bytes_at_accuracy(points, 0.6) == pytest.approx(50)  # from 0 bytes: linear
    assert bytes_at_accuracy(points, 0.4) == 0  # training alone is enough
    assert bytes_at_accuracy(points, 0.95) is None  # no baseline reaches it
    assert math.isclose(bytes_at_accuracy([(10, 0.6), (1000, 0.8)], 0.7), 100)
    # of runs with equal bytes only the most accurate is on the frontier
    same = [(10, 0.6), (1000, 0.75), (1000, 0.8)]
    assert math.isclose(bytes_at_accuracy(same, 0.7), 100)
    assert bytes_at_accuracy(same, 0.76) == pytest.approx(10 * 100 ** (0.16 / 0.2))


def test_closest_traffic_is_equal_traffic_in_ratio():
    runs = [
        {"bytes_sent": b, "protocol": str(b), "prequential_accuracy": 0.5}
        for b in (0, 100, 1_000, 10_000)
    ]
    assert closest_traffic(runs, 400)["protocol"] == "1000"  # 2.5x more beats 4x less
    assert closest_traffic(runs, 300)["protocol"] == "100"  # 3x less beats 3.3x more
    assert closest_traffic(runs, 5_000)["protocol"] == "10000"
    assert closest_traffic(runs[:1], 5_000) is None
    better = {"bytes_sent": 1_000, "protocol": "better", "prequential_accuracy": 0.6}
    assert closest_traffic([*runs, better], 900)["protocol"] == "better"  # same bytes: the best


def test_settled_traffic_is_the_last_quarter_of_every_phase():
    # 10 bytes per step always, but 1,000 per step in the first quarter after the drift
    rows, sent = [], 0
    for t in range(10, 210, 10):
        sent += 10 * (1_000 if 100 < t <= 125 else 10)
        rows.append({"step": t, "bytes": sent, "prequential_accuracy": 0.9})
    events = [DriftEvent(100, 1, 0)]
    # phases [0, 100] and (100, 200]: last quarters (75, 100] and (175, 200]
    assert settled_traffic(rows, events) == pytest.approx(10)
    assert settled_traffic(rows, []) == pytest.approx(10)  # one phase: (150, 200]
    # a gradual drift's phase starts after its transition: (100 + 40, 200] -> (155, 200]
    assert settled_traffic(rows, [DriftEvent(100, 1, 40)]) == pytest.approx(10)


def test_drift_recovery_gives_the_accuracy_just_after_each_drift():
    levels = {t: 0.9 for t in range(10, 210, 10)} | {110: 0.3, 120: 0.5}
    rows = [{"step": t, "prequential_accuracy": a, "bytes": 0} for t, a in levels.items()]
    (drift,) = drift_recovery(rows, [DriftEvent(100, 1, 0)])
    assert drift["prequential_after"] == pytest.approx((0.3 + 0.5) / 2)  # (100, 125]
    assert drift["recovery_steps"] == 30  # (120, 130] back at 0.9 >= 0.9 * 0.9
    assert drift_recovery(rows, [DriftEvent(100, 1, 0)], share=0.5)[0]["recovery_steps"] == 20
