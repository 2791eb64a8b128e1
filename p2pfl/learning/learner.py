"""Learners: the models of one or many nodes, trained with SGD on each node's own data.

Two implementations share one interface. ``PerNodeLearner`` (here) keeps a separate
``nn.Module`` per node (the reference path; the daemon uses it with one node).
``BatchedLearner`` (``batched.py``) stacks all nodes' parameters into one ``[nodes, params]``
tensor and trains them together (the simulator's fast path). Both read batches from the
same ``NodeDataBank`` and apply the same update:

    v = momentum * v + (grad + weight_decay * w + correction);  w -= lr_t * v

``correction`` is a per-node vector the protocol may set (drift correction); it is zero
unless a protocol uses it. ``lr_t`` is the base learning rate times the schedule's factor at
the node's own step count ``t`` (see ``schedule.py``). Every step also scores each node's
batch *before* training on it (prequential evaluation): the logits of the training step's
forward pass give its accuracy at no extra cost.
"""

from __future__ import annotations

import contextlib
import copy
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from p2pfl.learning.params import ParamSchema
from p2pfl.learning.sampler import NodeDataBank
from p2pfl.learning.schedule import LRSchedule


@dataclass(frozen=True)
class SGDConfig:
    """Optimizer settings shared by every node."""

    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    schedule: LRSchedule = field(default_factory=LRSchedule)


class StepResult(NamedTuple):
    """Per listed node, the loss and the accuracy of its model on the batch of a step, both
    measured before the step trained on that batch (prequential)."""

    loss: torch.Tensor
    accuracy: torch.Tensor


class Learner(ABC):
    """The models of ``num_nodes`` nodes as flat parameter vectors."""

    schema: ParamSchema
    data: NodeDataBank
    sgd: SGDConfig
    steps_taken: torch.Tensor
    """Local steps each node has taken (the step count its learning-rate schedule reads)."""

    @property
    def num_nodes(self) -> int:
        return self.data.num_nodes

    @abstractmethod
    def step(self, nodes: torch.Tensor, window: tuple[int, int] | None = None) -> StepResult:
        """One SGD step on a fresh mini-batch for each listed node; returns each node's loss
        and accuracy on that batch before the update (``window``: ``NodeDataBank.draw``)."""

    def lr(self, node: int, steps: int = 1) -> float:
        """The learning rate of the node's latest step (of its first, before it took any);
        with ``steps``, the mean over its latest ``steps`` steps (as many as it took)."""
        taken = int(self.steps_taken[node])
        first, last = max(0, taken - steps), max(0, taken - 1)
        factor = self.sgd.schedule.factor
        return self.sgd.lr * sum(factor(t) for t in range(first, last + 1)) / (last - first + 1)

    def _next_lrs(self, nodes: torch.Tensor) -> float | torch.Tensor:
        """The learning rate of each listed node's next step: one float if they share it,
        else a ``[k, 1]`` column; counts the step as taken."""
        schedule, base = self.sgd.schedule, self.sgd.lr
        counts = self.steps_taken[nodes]
        self.steps_taken[nodes] += 1
        if schedule.constant:
            return base
        distinct, which = counts.unique(return_inverse=True)
        lrs = torch.tensor([base * schedule.factor(int(t)) for t in distinct])
        return float(lrs[0]) if len(distinct) == 1 else lrs[which].unsqueeze(1)

    @abstractmethod
    def get(self, node: int) -> torch.Tensor:
        """The node's flat parameters (may be a view: clone before keeping it)."""

    @abstractmethod
    def set(self, node: int, vector: torch.Tensor) -> None:
        """Overwrite the node's parameters (optimizer state is kept)."""

    @abstractmethod
    def stacked(self) -> torch.Tensor:
        """All parameters as ``[nodes, params]`` (a view or a copy)."""

    @abstractmethod
    def set_correction(self, node: int, vector: torch.Tensor | None) -> None:
        """Set (or clear with None) the vector added to the node's gradients."""

    @abstractmethod
    def correction(self, node: int) -> torch.Tensor:
        """The node's current gradient correction (zeros if none)."""

    @abstractmethod
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Every node's predictions on the same inputs: ``[nodes, n, classes]``."""

    @abstractmethod
    def logits_each(self, x: torch.Tensor) -> torch.Tensor:
        """Each node's predictions on its own inputs ``x [nodes, n, features]``:
        ``[nodes, n, classes]`` (e.g. on local test splits padded to one length)."""

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-node accuracy and mean cross-entropy loss on ``(x, y)``."""
        return score_logits(self.logits(x).transpose(1, 2), y)

    @torch.no_grad()
    def evaluate_average(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """Accuracy and mean cross-entropy on ``(x, y)`` of the network's average model (the
        mean of all nodes' parameters, what a federated server would hold)."""
        return self.evaluate_vector(self.stacked().mean(0), x, y)

    @torch.no_grad()
    def evaluate_vector(
        self, vector: torch.Tensor, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[float, float]:
        """Accuracy and mean cross-entropy on ``(x, y)`` of the model with flat parameters
        ``vector`` (e.g. an average over shards of nodes)."""
        acc, loss = score_logits(self._logits_of(vector, x).unsqueeze(0), y)
        return float(acc), float(loss)

    @abstractmethod
    def _logits_of(self, vector: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Predictions ``[classes, n]`` of the model with flat parameters ``vector``."""


class PerNodeLearner(Learner):
    """One ``nn.Module`` and one ``torch.optim.SGD`` per node: the reference path."""

    def __init__(self, model: nn.Module, data: NodeDataBank, sgd: SGDConfig) -> None:
        self.schema = ParamSchema.from_module(model)
        self.data = data
        self.sgd = sgd
        self.models = [copy.deepcopy(model) for _ in range(data.num_nodes)]
        self.optimizers = [
            torch.optim.SGD(
                m.parameters(), lr=sgd.lr, momentum=sgd.momentum, weight_decay=sgd.weight_decay
            )
            for m in self.models
        ]
        self._corrections: dict[int, torch.Tensor] = {}
        self.steps_taken = torch.zeros(data.num_nodes, dtype=torch.long)
        self._probe = copy.deepcopy(model)

    def step(self, nodes: torch.Tensor, window: tuple[int, int] | None = None) -> StepResult:
        xb, yb = self.data.draw(nodes, window=window)
        lrs = self._next_lrs(nodes)
        losses, accuracy = torch.empty(len(nodes)), torch.empty(len(nodes))
        for k, node in enumerate(nodes.tolist()):
            model, opt = self.models[node], self.optimizers[node]
            opt.param_groups[0]["lr"] = lrs if isinstance(lrs, float) else float(lrs[k])
            opt.zero_grad(set_to_none=False)
            logits = model(xb[k])
            loss = nn.functional.cross_entropy(logits, yb[k])
            loss.backward()
            corr = self._corrections.get(node)
            if corr is not None:
                for p, c in zip(model.parameters(), self.schema.split(corr), strict=True):
                    p.grad.add_(c)
            opt.step()
            losses[k] = loss.detach()
            accuracy[k] = (logits.detach().argmax(1) == yb[k]).float().mean()
        return StepResult(losses, accuracy)

    def get(self, node: int) -> torch.Tensor:
        return self.schema.flatten(self.models[node])

    def set(self, node: int, vector: torch.Tensor) -> None:
        self.schema.load(self.models[node], vector)

    def stacked(self) -> torch.Tensor:
        return torch.stack([self.get(i) for i in range(self.num_nodes)])

    def set_correction(self, node: int, vector: torch.Tensor | None) -> None:
        if vector is None:
            self._corrections.pop(node, None)
        else:
            self._corrections[node] = vector.clone()

    def correction(self, node: int) -> torch.Tensor:
        corr = self._corrections.get(node)
        return corr.clone() if corr is not None else torch.zeros(self.schema.numel)

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        with evaluating(self.models):
            return torch.stack([m(x) for m in self.models])

    @torch.no_grad()
    def logits_each(self, x: torch.Tensor) -> torch.Tensor:
        with evaluating(self.models):
            return torch.stack([m(xi) for m, xi in zip(self.models, x, strict=True)])

    @torch.no_grad()
    def _logits_of(self, vector: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self.schema.load(self._probe, vector)
        for name, buf in self._probe.named_buffers():  # the nodes' mean statistics
            stacked = torch.stack([m.get_buffer(name) for m in self.models])
            buf.copy_(stacked.float().mean(0) if buf.is_floating_point() else stacked[0])
        with evaluating([self._probe]):
            return self._probe(x).T


def predicted(logits: torch.Tensor) -> torch.Tensor:
    """The class each column of ``logits`` ``[nodes, classes, n]`` predicts: bit for bit
    ``argmax(1)`` (the first maximum; NaN counts as the maximum), found by ``max(1)``,
    4-5 times faster than ``argmax`` along that strided dim."""
    return logits.max(1).indices


def score_logits(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-node accuracy and mean cross-entropy of logits ``[nodes, classes, n]``; the
    softmax runs along dim 1, much faster than along a short last dim."""
    acc = (predicted(logits) == y).float().mean(1)
    target = y.expand(logits.shape[0], -1)
    return acc, nn.functional.cross_entropy(logits, target, reduction="none").mean(1)


@contextlib.contextmanager
def evaluating(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Modules in eval mode (BatchNorm uses its running statistics) for the block."""
    modules = list(modules)
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)
