"""Partitioners: how a training set is split across the nodes of a network.

``iid`` deals samples uniformly, ``dirichlet:alpha=A`` skews each node's label mix (smaller
alpha, stronger skew), ``shards:k=K`` gives each node K label-sorted shards.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from p2pfl.data.datasets import Dataset, load_dataset, non_negative_int
from p2pfl.spec import SpecError, non_negative_float, parse_spec, positive_int

PARTITION_KINDS = ("iid", "dirichlet", "shards")
DIRICHLET_REDRAWS = 50


@dataclass(eq=False)
class NodeData:
    """One node's private data: its local train split and local test split."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def partition(y: torch.Tensor, num_nodes: int, spec: str, seed: int) -> list[torch.Tensor]:
    """Disjoint sorted index tensors, one per node, covering every sample of ``y``."""
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


def split_nodes(
    dataset: Dataset,
    num_nodes: int,
    partition_spec: str,
    seed: int,
    local_test_fraction: float = 0.2,
) -> list[NodeData]:
    """Partition the training set, then split each node's part into local train and test."""
    if not 0.0 <= local_test_fraction < 1.0:
        raise ValueError(f"local_test_fraction must be in [0, 1), got {local_test_fraction}")
    nodes: list[NodeData] = []
    for node, index in enumerate(partition(dataset.y_train, num_nodes, partition_spec, seed)):
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


def node_slice(spec: str) -> NodeData:
    """One daemon's data, e.g. ``digits:part=3/8,alpha=0.5,seed=1`` or ``data.npz:part=0/4``.

    ``part=I/N`` is node I (from 0) of N, ``alpha`` selects Dirichlet label skew (default IID),
    ``seed`` (default 0) seeds loading and partitioning; other arguments go to the dataset.
    The slice equals ``split_nodes(load_dataset(..., seed), N, ..., seed)[I]``.
    """
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
    return split_nodes(dataset, num_nodes, partition_spec, seed)[index]


def _part(raw: str) -> tuple[int, int]:
    index, slash, total = raw.partition("/")
    if not slash:
        raise ValueError("write part=I/N, e.g. part=3/8 for node 3 of 8")
    return non_negative_int(index), positive_int(total)
