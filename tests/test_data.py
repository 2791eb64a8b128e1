"""Datasets, drift, .npz validation and partitioners."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from p2pfl.data import DataError, load_dataset, node_slice, partition, split_nodes
from p2pfl.spec import SpecError


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


def test_digits_shapes_and_scaling(digits):
    assert digits.x_train.dtype == torch.float32 and digits.y_train.dtype == torch.int64
    assert digits.x_train.shape[1] == 64 and digits.input_shape == (1, 8, 8)
    assert len(digits.x_train) + len(digits.x_test) == 1797
    assert len(digits.x_test) == pytest.approx(0.2 * 1797, abs=10)
    assert digits.x_train.min() >= 0.0 and digits.x_train.max() <= 1.0
    assert digits.num_classes == 10 and digits.drift is None
    # stratified: every class is in the test set in about its overall proportion
    assert torch.bincount(digits.y_test, minlength=10).min() >= 30


def test_same_seed_same_split_other_seed_differs():
    a, b, c = (load_dataset("digits", seed=s) for s in (1, 1, 2))
    assert torch.equal(a.y_test, b.y_test) and torch.equal(a.x_train, b.x_train)
    assert not torch.equal(a.x_train, c.x_train)


def test_synthetic_is_standardised_and_balanced():
    data = load_dataset("synthetic:n=1000,features=8,classes=3", seed=0)
    assert abs(len(data.x_train) - 800) <= 3 and data.x_train.shape[1] == 8
    assert data.input_shape == (8,)
    assert data.x_train.mean(0).abs().max() < 1e-4
    assert (data.x_train.std(0) - 1).abs().max() < 1e-2
    assert torch.bincount(data.y_train, minlength=3).min() > 100


@pytest.mark.parametrize("spec", ["digits:drift_at=100", "synthetic:drift_at=5,drift=permute"])
def test_permutation_drift_moves_every_label(spec):
    data = load_dataset(spec, seed=3)
    assert data.drift is not None and data.drift.at_step in (100, 5)
    after = data.drift.relabel(data.x_train, data.y_train, 1)
    assert (after != data.y_train).all()
    assert (data.drift.relabel(data.x_test, data.y_test, 1) != data.y_test).all()
    assert torch.equal(data.drift.relabel(data.x_train, data.y_train, 0), data.y_train)
    # a permutation: the class counts are the same multiset
    assert sorted(torch.bincount(after).tolist()) == sorted(torch.bincount(data.y_train).tolist())


def test_recurring_concepts_differ_on_every_label():
    data = load_dataset("digits:drift_every=10,concepts=4", seed=1)
    labels = [data.drift.relabel(data.x_train, data.y_train, c) for c in range(4)]
    for a in range(4):
        for b in range(a + 1, 4):
            assert (labels[a] != labels[b]).all()  # any drift moves every label


def test_rotate_drift_changes_labels_and_relabels_node_data():
    data = load_dataset("synthetic:n=1000,drift_at=10,drift=rotate", seed=0)
    after = data.drift.relabel(data.x_train, data.y_train, 1)
    changed = (after != data.y_train).float().mean()
    assert 0.2 < changed < 1.0
    # concept 0's rule, folded into the stored features, is the original labelling
    rule = (data.x_train @ data.drift.weights[0] + data.drift.biases[0]).argmax(1)
    assert (rule == data.y_train).float().mean() > 0.999
    node = split_nodes(data, 4, "iid", seed=0)[0]
    relabelled = data.drift.relabel(node.x_train, node.y_train, 1)
    assert relabelled.dtype == torch.int64 and relabelled.shape == node.y_train.shape
    # relabelling the node's samples agrees with relabelling the whole set
    full = {tuple(x.tolist()): int(y) for x, y in zip(data.x_train, after, strict=True)}
    assert all(
        full[tuple(x.tolist())] == int(y) for x, y in zip(node.x_train, relabelled, strict=True)
    )


def test_drift_every_n_happens_at_the_right_steps():
    drift = load_dataset("digits:drift_every=100,concepts=3", seed=0).drift
    assert [(e.step, e.concept, e.width) for e in drift.events(450)] == [
        (100, 1, 0),
        (200, 2, 0),
        (300, 0, 0),
        (400, 1, 0),
    ]
    concept = {t: drift.state(t).concept for t in range(1, 451)}
    assert all(concept[t] == 0 for t in range(1, 101))  # steps 1..100 train on concept 0
    assert all(concept[t] == 1 for t in range(101, 201))
    assert all(concept[t] == 2 for t in range(201, 301))
    assert concept[301] == 0 and concept[401] == 1  # the concepts recur
    assert all(drift.state(t).next is None for t in range(1, 451))  # sudden: never mixed
    once = load_dataset("digits:drift_at=150", seed=0).drift
    assert [e.step for e in once.events(1000)] == [150]
    assert once.state(150).concept == 0 and once.state(151).concept == once.state(999).concept == 1
    late = load_dataset("digits:drift_at=50,drift_every=200", seed=0).drift
    assert [e.step for e in late.events(700)] == [50, 250, 450, 650]


def test_gradual_drift_ramps_the_new_concept_over_its_width():
    drift = load_dataset("synthetic:drift_every=100,drift_width=20,transition=alternate", 0).drift
    events = drift.events(500)
    assert [(e.step, e.width) for e in events] == [(100, 0), (200, 20), (300, 0), (400, 20)]
    assert drift.state(101).next is None  # the first drift is sudden
    ramp = [drift.state(t) for t in range(201, 221)]
    assert all(s.concept == 1 and s.next == 0 for s in ramp[:-1])
    assert [s.share for s in ramp[:-1]] == pytest.approx([j / 20 for j in range(1, 20)])
    assert drift.state(220).concept == 0 and drift.state(220).next is None
    gradual = load_dataset("digits:drift_every=40,transition=gradual", 0).drift
    assert {e.width for e in gradual.events(400)} == {10}  # default width: N // 4


def test_bad_dataset_specs():
    for spec in [
        "mnist",
        "digits:drift=rotate,drift_at=3",
        "synthetic:classes=1",
        "synthetic:drift=spin,drift_at=1",
        "synthetic:n=-3",
        "digits:size=3",
        "synthetic:drift=rotate",
        "digits:concepts=3",
        "digits:drift_every=0",
        "digits:drift_every=10,drift_width=10",
        "digits:drift_every=10,concepts=11",
        "digits:drift_every=10,concepts=1",
        "digits:drift_at=10,transition=gradual",
        "digits:drift_every=10,transition=slow",
    ]:
        with pytest.raises(SpecError):
            load_dataset(spec, seed=0)


def _npz(tmp_path: Path, **arrays: np.ndarray) -> str:
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return str(path)


def test_npz_with_and_without_test_arrays(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 2, 3)), rng.integers(0, 3, size=50)
    held = load_dataset(_npz(tmp_path, x=x, y=y), seed=0)
    assert held.input_shape == (2, 3) and held.x_train.shape[1] == 6
    assert len(held.x_train) + len(held.x_test) == 50 and len(held.x_test) >= 8
    assert held.num_classes == 3 and held.name == "data"
    given = load_dataset(_npz(tmp_path, x=x, y=y, x_test=x[:5], y_test=y[:5]), seed=0)
    assert len(given.x_train) == 50 and len(given.x_test) == 5


@pytest.mark.parametrize(
    ("arrays", "fragment"),
    [
        ({"y": np.zeros(4, dtype=int)}, "missing array 'x'"),
        ({"x": np.zeros((4, 2))}, "missing array 'y'"),
        ({"x": np.zeros((4, 2)), "y": np.zeros(3, dtype=int)}, "same length"),
        ({"x": np.array([["a", "b"]] * 4), "y": np.zeros(4, dtype=int)}, "must be numeric"),
        ({"x": np.zeros((4, 2)), "y": np.array([0.5, 1, 0, 1])}, "integer class labels"),
        ({"x": np.zeros((4, 2)), "y": np.array([0, -1, 0, 1])}, "negative labels"),
        ({"x": np.array([[0.0, np.nan]] * 4), "y": np.array([0, 1, 0, 1])}, "NaN"),
        ({"x": np.zeros((2, 2)), "y": np.array([0, 1])}, "too few samples"),
        (
            {"x": np.zeros((4, 2)), "y": np.array([0, 1, 0, 1]), "x_test": np.zeros((2, 2))},
            "both x_test and y_test",
        ),
    ],
)
def test_malformed_npz(tmp_path, arrays, fragment):
    path = _npz(tmp_path, **arrays)
    with pytest.raises(DataError, match=fragment) as info:
        load_dataset(path, seed=0)
    assert "data.npz" in str(info.value)


def test_npz_missing_file_and_not_a_zip(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_dataset(str(tmp_path / "nope.npz"), seed=0)
    bad = tmp_path / "bad.npz"
    bad.write_text("not a zip archive")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_dataset(str(bad), seed=0)


def _check_disjoint_cover(parts, n):
    joined = torch.cat(parts)
    assert len(joined) == n and len(torch.unique(joined)) == n


@pytest.mark.parametrize("spec", ["iid", "dirichlet:alpha=0.3", "shards:k=2"])
def test_partitions_cover_disjointly_and_are_seeded(digits, spec):
    parts = partition(digits.y_train, 10, spec, seed=4)
    _check_disjoint_cover(parts, len(digits.y_train))
    again = partition(digits.y_train, 10, spec, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition(digits.y_train, 10, spec, seed=5)
    assert not all(torch.equal(a, b) for a, b in zip(parts, other, strict=True))


def _label_share_spread(y, parts, num_classes):
    """Mean over nodes of the largest label share: 1/num_classes for perfectly mixed nodes."""
    return np.mean(
        [torch.bincount(y[p], minlength=num_classes).max().item() / len(p) for p in parts]
    )


def test_dirichlet_skews_labels_and_keeps_a_minimum(digits):
    iid = partition(digits.y_train, 20, "iid", seed=0)
    skewed = partition(digits.y_train, 20, "dirichlet:alpha=0.1", seed=0)
    assert _label_share_spread(digits.y_train, iid, 10) < 0.2
    assert _label_share_spread(digits.y_train, skewed, 10) > 0.4
    assert min(len(p) for p in skewed) >= 8
    tiny = partition(digits.y_train, 100, "dirichlet:alpha=0.01,min=10", seed=0)
    _check_disjoint_cover(tiny, len(digits.y_train))
    assert min(len(p) for p in tiny) >= 10


def test_shards_give_k_labels_per_node():
    y = torch.arange(10).repeat_interleave(20)
    parts = partition(y, 10, "shards:k=2", seed=0)
    _check_disjoint_cover(parts, 200)
    assert all(len(torch.unique(y[p])) <= 2 for p in parts)
    assert all(len(p) == 20 for p in parts)


@pytest.mark.parametrize(
    "spec",
    [
        "random",
        "dirichlet:alpha=0",
        "dirichlet:alpha=x",
        "dirichlet:beta=1",
        "shards:k=0",
        "shards:k=500",
        "iid:k=2",
        "dirichlet:min=1000",
        "",
    ],
)
def test_bad_partition_specs(digits, spec):
    with pytest.raises(SpecError):
        partition(digits.y_train, 10, spec, seed=0)


def test_too_many_nodes():
    with pytest.raises(SpecError, match="cannot be split"):
        partition(torch.zeros(5, dtype=torch.int64), 6, "iid", seed=0)


def test_split_nodes_local_test_split(digits):
    nodes = split_nodes(digits, 8, "iid", seed=0, local_test_fraction=0.25)
    assert sum(len(n.y_train) + len(n.y_test) for n in nodes) == len(digits.y_train)
    for node in nodes:
        total = len(node.y_train) + len(node.y_test)
        assert len(node.y_test) == round(0.25 * total)
        assert node.x_train.shape[1] == 64 and len(node.x_train) == len(node.y_train)


def test_node_slice_matches_split_nodes():
    ref = split_nodes(load_dataset("digits", seed=1), 8, "dirichlet:alpha=0.5", seed=1)[3]
    got = node_slice("digits:part=3/8,alpha=0.5,seed=1")
    assert torch.equal(got.x_train, ref.x_train) and torch.equal(got.y_test, ref.y_test)
    iid = split_nodes(load_dataset("synthetic:n=500", seed=0), 4, "iid", seed=0)[2]
    assert torch.equal(node_slice("synthetic:n=500,part=2/4").x_train, iid.x_train)


def test_node_slice_of_npz(tmp_path):
    rng = np.random.default_rng(0)
    path = _npz(tmp_path, x=rng.normal(size=(80, 3)), y=rng.integers(0, 2, size=80))
    ref = split_nodes(load_dataset(path, seed=2), 4, "iid", seed=2)[1]
    assert torch.equal(node_slice(f"{path}:part=1/4,seed=2").x_train, ref.x_train)
    whole = node_slice(path)
    assert len(whole.y_train) + len(whole.y_test) == len(load_dataset(path, seed=0).y_train)


@pytest.mark.parametrize(
    "spec", ["digits:part=8/8", "digits:part=3", "digits:part=-1/4", "digits:seed=x"]
)
def test_bad_node_slices(spec):
    with pytest.raises(SpecError):
        node_slice(spec)


def test_npz_slice_rejects_dataset_args(tmp_path):
    path = _npz(tmp_path, x=np.zeros((10, 2)), y=np.arange(10) % 2)
    with pytest.raises(SpecError, match="a .npz slice accepts"):
        node_slice(f"{path}:drift_at=3")
