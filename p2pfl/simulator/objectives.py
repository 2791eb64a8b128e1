"""Own-objective accuracy: every node measured on its own local test split, predicting among
the classes of its own objective (the classes it has data of), all nodes in one batched pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from p2pfl.data import NodeData
from p2pfl.learning.learner import Learner
from p2pfl.simulator.scenario import ScenarioError


def objective_classes(node: NodeData) -> list[int]:
    """The classes of a node's own objective: every label in its train or local test split."""
    return torch.cat([node.y_train, node.y_test]).unique().tolist()


class OwnObjectives:
    """Every node's local test split padded into ``[nodes, max_n, features]``, with a mask of
    the real samples and of each node's classes."""

    def __init__(self, nodes: Sequence[NodeData], num_classes: int) -> None:
        empty = [i for i, node in enumerate(nodes) if len(node.y_test) == 0]
        if empty:
            raise ScenarioError(
                f"node {empty[0]} has no local test samples, so its own objective cannot be "
                "measured; use partition = 'labels:k=K,min=A,max=B' (tested on the global test "
                "samples of its classes) or fewer nodes"
            )
        self.relabel(nodes, num_classes)

    def relabel(self, nodes: Sequence[NodeData], num_classes: int) -> None:
        """(Re)build the padded test splits and masks, e.g. after concept drift."""
        width = max(len(node.y_test) for node in nodes)
        features = nodes[0].x_test.shape[1]
        self.x = torch.zeros(len(nodes), width, features)
        self.y = torch.zeros(len(nodes), width, dtype=torch.long)
        self.real = torch.zeros(len(nodes), width, dtype=torch.bool)
        self.allowed = torch.zeros(len(nodes), num_classes, dtype=torch.bool)
        for i, node in enumerate(nodes):
            n = len(node.y_test)
            self.x[i, :n], self.y[i, :n], self.real[i, :n] = node.x_test, node.y_test, True
            self.allowed[i, objective_classes(node)] = True
        self.counts = self.real.sum(1)

    @torch.no_grad()
    def accuracy(self, learner: Learner) -> torch.Tensor:
        """Each node's accuracy on its own test split, among its own classes: ``[nodes]``."""
        logits = learner.logits_each(self.x)
        logits.masked_fill_(~self.allowed[:, None, :], float("-inf"))
        hits = (logits.argmax(-1) == self.y) & self.real
        return hits.sum(1) / self.counts
