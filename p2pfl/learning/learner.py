"""Learners: the models of one or many nodes, trained with SGD on each node's own data.

Two implementations share one interface. ``PerNodeLearner`` keeps a separate ``nn.Module``
per node (the reference path; the daemon uses it with one node). ``BatchedLearner`` stacks
all nodes' parameters into one ``[nodes, params]`` tensor and trains them together with
``torch.func`` (the simulator's fast path). Both read batches from the same
``NodeDataBank`` and apply the same update:

    v = momentum * v + (grad + weight_decay * w + correction);  w -= lr * v

``correction`` is a per-node vector the protocol may set (drift correction); it is zero
unless a protocol uses it.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from p2pfl.learning.params import ParamSchema
from p2pfl.learning.sampler import NodeDataBank


@dataclass(frozen=True)
class SGDConfig:
    """Optimizer settings shared by every node."""

    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0


class Learner(ABC):
    """The models of ``num_nodes`` nodes as flat parameter vectors."""

    schema: ParamSchema
    data: NodeDataBank
    sgd: SGDConfig

    @property
    def num_nodes(self) -> int:
        return self.data.num_nodes

    @abstractmethod
    def step(self, nodes: torch.Tensor) -> torch.Tensor:
        """One SGD step on a fresh mini-batch for each listed node; returns their losses."""

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

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-node accuracy and mean cross-entropy loss on ``(x, y)``."""
        out = self.logits(x)
        acc = (out.argmax(-1) == y).float().mean(-1)
        loss = nn.functional.cross_entropy(
            out.reshape(-1, out.shape[-1]), y.repeat(out.shape[0]), reduction="none"
        )
        return acc, loss.reshape(out.shape[0], -1).mean(-1)


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

    def step(self, nodes: torch.Tensor) -> torch.Tensor:
        xb, yb = self.data.draw(nodes)
        losses = torch.empty(len(nodes))
        for k, node in enumerate(nodes.tolist()):
            model, opt = self.models[node], self.optimizers[node]
            opt.zero_grad(set_to_none=False)
            loss = nn.functional.cross_entropy(model(xb[k]), yb[k])
            loss.backward()
            corr = self._corrections.get(node)
            if corr is not None:
                for p, c in zip(model.parameters(), self.schema.split(corr), strict=True):
                    p.grad.add_(c)
            opt.step()
            losses[k] = loss.detach()
        return losses

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
        return torch.stack([m(x) for m in self.models])


class BatchedLearner(Learner):
    """All nodes' parameters in one ``[nodes, params]`` tensor, trained with one vectorised
    forward (``vmap`` over ``functional_call``) and one backward per step."""

    def __init__(self, model: nn.Module, data: NodeDataBank, sgd: SGDConfig) -> None:
        unsupported = [type(m).__name__ for m in model.modules() if _has_state(m)]
        if unsupported:
            raise ValueError(
                f"the batched learner cannot train models with running state ({unsupported}); "
                "use the per-node learner (--learner per-node)"
            )
        self.schema = ParamSchema.from_module(model)
        self.data = data
        self.sgd = sgd
        self.template = copy.deepcopy(model).to("meta")
        self.params = self.schema.flatten(model).repeat(data.num_nodes, 1)
        self.momentum = torch.zeros_like(self.params) if sgd.momentum else None
        self.corrections: torch.Tensor | None = None
        self._forward = torch.vmap(self._forward_one)

    def _forward_one(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        tensors = dict(zip(self.schema.names, self.schema.split(flat), strict=True))
        return functional_call(self.template, tensors, (x,))

    def step(self, nodes: torch.Tensor) -> torch.Tensor:
        xb, yb = self.data.draw(nodes)
        every = len(nodes) == self.num_nodes
        w = (self.params if every else self.params[nodes]).detach().requires_grad_(True)
        out = self._forward(w, xb)
        losses = (
            nn.functional.cross_entropy(
                out.reshape(-1, out.shape[-1]), yb.reshape(-1), reduction="none"
            )
            .reshape(len(nodes), -1)
            .mean(-1)
        )
        (grad,) = torch.autograd.grad(losses.sum(), w)
        with torch.no_grad():
            if self.sgd.weight_decay:
                grad.add_(w, alpha=self.sgd.weight_decay)
            if self.corrections is not None:
                grad.add_(self.corrections if every else self.corrections[nodes])
            if self.momentum is not None:
                if every:
                    grad = self.momentum.mul_(self.sgd.momentum).add_(grad)
                else:
                    grad = self.momentum[nodes].mul_(self.sgd.momentum).add_(grad)
                    self.momentum[nodes] = grad
            if every:
                self.params.sub_(grad, alpha=self.sgd.lr)
            else:
                self.params[nodes] = w.detach() - self.sgd.lr * grad
        return losses.detach()

    def get(self, node: int) -> torch.Tensor:
        return self.params[node]

    def set(self, node: int, vector: torch.Tensor) -> None:
        self.params[node] = vector

    def stacked(self) -> torch.Tensor:
        return self.params

    def set_correction(self, node: int, vector: torch.Tensor | None) -> None:
        if vector is None:
            if self.corrections is not None:
                self.corrections[node] = 0.0
            return
        if self.corrections is None:
            self.corrections = torch.zeros_like(self.params)
        self.corrections[node] = vector

    def correction(self, node: int) -> torch.Tensor:
        if self.corrections is None:
            return torch.zeros(self.schema.numel)
        return self.corrections[node].clone()

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(self.params, x.expand(self.num_nodes, *x.shape))


def _has_state(module: nn.Module) -> bool:
    return any(True for _ in module.buffers(recurse=False))
