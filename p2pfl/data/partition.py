"""Partitioners: how a training set is split across the nodes of a network.

``iid`` deals samples uniformly, ``dirichlet:alpha=A`` skews each node's label mix (smaller
alpha, stronger skew), ``shards:k=K`` gives each node K label-sorted shards. These three cover
every sample. ``labels:k=K,min=A,max=B`` gives each node an objective of its own: K random
classes, and a train size drawn log-uniformly in [A, B] (spread evenly over its classes,
disjoint from every other node's, not necessarily covering the data set); its local test
split is the global test set restricted to its classes, so even a node with ten samples is
measured on its whole objective. With ``groups=G`` the objectives *conflict*: the nodes form
G contiguous groups of equal size and group g names every class y ``(y + g) mod C`` (train
and test), so the same inputs are labelled differently in each group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from p2pfl.data.datasets import Dataset, load_dataset
from p2pfl.spec import SpecError, non_negative_float, non_negative_int, parse_spec, positive_int

PARTITION_KINDS = ("iid", "dirichlet", "shards", "labels")
DIRICHLET_REDRAWS = 50
LABELS_REDRAWS = 50


@dataclass(eq=False)
class NodeData:
    """One node's private data: its local train split and local test split."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def partition(y: torch.Tensor, num_nodes: int, spec: str, seed: int) -> list[torch.Tensor]:
    """Disjoint sorted index tensors, one per node, covering every sample of ``y`` (all
    kinds but ``labels``, which takes only the samples its nodes need)."""
    parsed = parse_spec(spec, PARTITION_KINDS)
    labels = y.numpy()
    n = len(labels)
    if num_nodes < 1:
        raise SpecError(f"{spec!r}: need at least one node, got {num_nodes}")
    if num_nodes > n:
        raise SpecError(f"{spec!r}: {n} samples cannot be split across {num_nodes} nodes")
    rng = np.random.default_rng(seed)
    if parsed.kind == "iid":
        parsed.check_keys([])
        parts = np.array_split(rng.permutation(n), num_nodes)
    elif parsed.kind == "dirichlet":
        parsed.check_keys(["alpha", "min"])
        alpha = parsed.take("alpha", non_negative_float, default=0.5)
        if alpha <= 0:
            raise SpecError(f"{spec!r}: alpha must be > 0 (small = strong skew, large = near IID)")
        min_size = parsed.take("min", positive_int, default=min(8, n // num_nodes))
        if min_size * num_nodes > n:
            raise SpecError(
                f"{spec!r}: {num_nodes} nodes x min={min_size} exceeds the {n} samples; lower min"
            )
        parts = _dirichlet(labels, num_nodes, alpha, min_size, rng)
    elif parsed.kind == "labels":
        parsed.check_keys(["k", "min", "max", "groups"])
        k = parsed.take("k", positive_int, default=2)
        low = parsed.take("min", positive_int, default=10)
        high = parsed.take("max", positive_int, default=400)
        classes = len(np.unique(labels))
        if k > classes:
            raise SpecError(f"{spec!r}: k={k} but the data set has {classes} classes; lower k")
        if not k <= low <= high:
            raise SpecError(
                f"{spec!r}: need k <= min <= max (every node gets at least one sample of each "
                f"of its classes), got k={k}, min={low}, max={high}"
            )
        parts = _labels(labels, num_nodes, k, low, high, rng, spec)
    else:
        parsed.check_keys(["k"])
        k = parsed.take("k", positive_int, default=2)
        if num_nodes * k > n:
            raise SpecError(f"{spec!r}: {num_nodes * k} shards need more than {n} samples; lower k")
        order = rng.permutation(n)
        order = order[np.argsort(labels[order], kind="stable")]
        shards = np.array_split(order, num_nodes * k)
        dealt = rng.permutation(num_nodes * k).reshape(num_nodes, k)
        parts = [np.concatenate([shards[s] for s in row]) for row in dealt]
    return [torch.as_tensor(np.sort(part), dtype=torch.int64) for part in parts]


def _dirichlet(
    labels: np.ndarray, num_nodes: int, alpha: float, min_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Per-class Dirichlet proportions; redraw a few times, then top up nodes below min_size."""
    for _ in range(DIRICHLET_REDRAWS):
        owner = np.empty(len(labels), dtype=np.int64)
        for label in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == label))
            shares = rng.dirichlet(np.full(num_nodes, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
            for node, chunk in enumerate(np.split(members, cuts)):
                owner[chunk] = node
        sizes = np.bincount(owner, minlength=num_nodes)
        if sizes.min() >= min_size:
            break
    for node in np.flatnonzero(sizes < min_size):
        while sizes[node] < min_size:
            donor = int(sizes.argmax())
            take = rng.choice(np.flatnonzero(owner == donor))
            owner[take] = node
            sizes[donor] -= 1
            sizes[node] += 1
    return [np.flatnonzero(owner == node) for node in range(num_nodes)]


def _labels(
    labels: np.ndarray,
    num_nodes: int,
    k: int,
    low: int,
    high: int,
    rng: np.random.Generator,
    spec: str,
) -> list[np.ndarray]:
    """``k`` random classes per node and a log-uniform size in [low, high], spread evenly over
    the node's classes; the draw is repeated until every class has the samples it needs."""
    classes = np.unique(labels)
    supply = {int(c): int((labels == c).sum()) for c in classes}
    for _ in range(LABELS_REDRAWS):
        chosen = [rng.choice(classes, size=k, replace=False) for _ in range(num_nodes)]
        logs = rng.uniform(math.log(low), math.log(high + 1), size=num_nodes)
        sizes = np.minimum(np.floor(np.exp(logs)).astype(np.int64), high)
        wants = []  # per node: {class: samples}
        demand = dict.fromkeys(supply, 0)
        for node_classes, size in zip(chosen, sizes, strict=True):
            share = np.full(k, size // k)
            share[rng.choice(k, size=size % k, replace=False)] += 1
            want = {int(c): int(n) for c, n in zip(node_classes, share, strict=True)}
            for c, n in want.items():
                demand[c] += n
            wants.append(want)
        if all(demand[c] <= supply[c] for c in supply):
            break
    else:
        short = max(supply, key=lambda c: demand[c] - supply[c])
        raise SpecError(
            f"{spec!r}: {num_nodes} nodes need more samples of some class than the data set "
            f"has in each of {LABELS_REDRAWS} draws (the last one: {demand[short]} of class "
            f"{short}, which has {supply[short]}); lower max or the number of nodes"
        )
    pools = {c: list(rng.permutation(np.flatnonzero(labels == c))) for c in supply}
    parts = []
    for want in wants:
        taken = [pools[c][:n] for c, n in want.items()]
        for c, n in want.items():
            del pools[c][:n]
        parts.append(np.concatenate(taken).astype(np.int64))
    return parts


def split_nodes(
    dataset: Dataset,
    num_nodes: int,
    partition_spec: str,
    seed: int,
    local_test_fraction: float = 0.2,
) -> list[NodeData]:
    """Partition the training set, then split each node's part into local train and test
    (``labels``: all of the part is train, the local test split is the global test set
    restricted to the node's classes)."""
    if not 0.0 <= local_test_fraction < 1.0:
        raise ValueError(f"local_test_fraction must be in [0, 1), got {local_test_fraction}")
    parts = partition(dataset.y_train, num_nodes, partition_spec, seed)
    parsed = parse_spec(partition_spec)
    if parsed.kind == "labels":
        groups = parsed.take("groups", positive_int, default=1)
        if groups > min(num_nodes, dataset.num_classes):
            raise SpecError(
                f"{partition_spec!r}: groups={groups} needs at least as many nodes and classes"
            )
        return [
            _relabel(_own_objective(dataset, index), node * groups // num_nodes, dataset)
            for node, index in enumerate(parts)
        ]
    nodes: list[NodeData] = []
    for node, index in enumerate(parts):
        rng = np.random.default_rng([seed, node])
        shuffled = index[torch.as_tensor(rng.permutation(len(index)))]
        n_test = min(round(local_test_fraction * len(index)), len(index) - 1)
        test, train = shuffled[:n_test].sort().values, shuffled[n_test:].sort().values
        nodes.append(
            NodeData(
                x_train=dataset.x_train[train],
                y_train=dataset.y_train[train],
                x_test=dataset.x_train[test],
                y_test=dataset.y_train[test],
            )
        )
    return nodes


def _own_objective(dataset: Dataset, index: torch.Tensor) -> NodeData:
    """A node that trains on ``index`` and is tested on the global test samples of its classes."""
    y_train = dataset.y_train[index]
    mine = torch.isin(dataset.y_test, y_train.unique())
    return NodeData(dataset.x_train[index], y_train, dataset.x_test[mine], dataset.y_test[mine])


def _relabel(node: NodeData, group: int, dataset: Dataset) -> NodeData:
    """The node's data as group ``group`` names the classes: ``y -> (y + group) mod C``."""
    if not group:
        return node
    c = dataset.num_classes
    return NodeData(
        node.x_train, (node.y_train + group) % c, node.x_test, (node.y_test + group) % c
    )


def node_slice(spec: str) -> NodeData:
    """One daemon's data, e.g. ``digits:part=3/8,alpha=0.5,seed=1`` or ``data.npz:part=0/4``.

    ``part=I/N`` is node I (from 0) of N, ``alpha`` selects Dirichlet label skew (default IID),
    ``seed`` (default 0) seeds loading and partitioning; other arguments go to the dataset.
    The slice equals ``split_nodes(load_dataset(..., seed), N, ..., seed)[I]``.
    """
    return load_node_slice(spec)[1]


def load_node_slice(spec: str) -> tuple[Dataset, NodeData]:
    """The whole dataset a ``node_slice`` spec names (for its shape, classes and global test
    split) and the node's slice of it, loading the dataset once."""
    source, sep, rest = spec.strip().partition(":")
    is_file = source.lower().endswith(".npz")
    parsed = parse_spec(f"npz{sep}{rest}" if is_file else spec)
    index, num_nodes = parsed.take("part", _part, default=(0, 1))
    alpha = parsed.take("alpha", non_negative_float)
    seed = parsed.take("seed", non_negative_int, default=0)
    data_args = {k: v for k, v in parsed.args.items() if k not in ("part", "alpha", "seed")}
    if is_file:
        if data_args:
            raise SpecError(
                f"{spec!r}: unknown argument(s) {sorted(data_args)}; a .npz slice accepts: "
                "alpha, part, seed"
            )
        data_spec = source
    else:
        data_spec = ",".join(f"{k}={v}" for k, v in data_args.items())
        data_spec = f"{parsed.kind}:{data_spec}" if data_spec else parsed.kind
    if index >= num_nodes:
        raise SpecError(f"{spec!r}: part={index}/{num_nodes} needs 0 <= I < N (nodes count from 0)")
    partition_spec = "iid" if alpha is None else f"dirichlet:alpha={alpha}"
    dataset = load_dataset(data_spec, seed)
    return dataset, split_nodes(dataset, num_nodes, partition_spec, seed)[index]


def _part(raw: str) -> tuple[int, int]:
    index, slash, total = raw.partition("/")
    if not slash:
        raise ValueError("write part=I/N, e.g. part=3/8 for node 3 of 8")
    return non_negative_int(index), positive_int(total)
