"""Datasets (digits, synthetic with drift, user .npz) and how they are split across nodes."""

from p2pfl.data.datasets import DataError, Dataset, Drift, load_dataset
from p2pfl.data.partition import NodeData, node_slice, partition, split_nodes

__all__ = [
    "DataError",
    "Dataset",
    "Drift",
    "NodeData",
    "load_dataset",
    "node_slice",
    "partition",
    "split_nodes",
]
