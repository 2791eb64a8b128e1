"""Outer optimizer (DiLoCo, Douillard et al., arXiv 2311.08105), offered to every merging
protocol: a merge is treated as an outer gradient step instead of a plain replacement.

A node keeps its *anchor*, the last model it agreed on (initially its starting model). When a
merge yields ``merged``, the change ``Δ = anchor − merged`` is a pseudo-gradient, applied with
Nesterov momentum like ``torch.optim.SGD(nesterov=True)``::

    v ← μ v + Δ;   new = anchor − lr (Δ + μ v)  =  merged − (lr − 1) Δ − lr μ v

and ``new`` becomes the model and the next anchor. With ``lr = 1`` and ``μ = 0`` the right-hand
form is exactly ``merged`` (plain averaging, bit for bit). The paper's values are lr 0.7,
μ 0.9, for syncs hundreds of steps apart.

Each node applies its own outer step. For a uniform group whose members share one anchor
(a periodic round from a common start, a dynamic session) the mean of their new models is
the outer step of the mean, i.e. DiLoCo on the group's average.
"""

from __future__ import annotations

from typing import Any

import torch


class OuterOptimizer:
    """Nesterov momentum on the pseudo-gradients of successive merges; see the module."""

    def __init__(self, lr: float, momentum: float, anchor: torch.Tensor) -> None:
        self.lr = lr
        self.momentum = momentum
        self.anchor = anchor.clone()
        self.velocity = torch.zeros_like(anchor)

    def step(self, merged: torch.Tensor) -> torch.Tensor:
        """The model that replaces ``merged`` (it is the new anchor too)."""
        delta = self.anchor - merged
        self.velocity.mul_(self.momentum).add_(delta)
        new = merged - (self.lr - 1.0) * delta - (self.lr * self.momentum) * self.velocity
        self.anchor = new.clone()
        return new

    def state_dict(self) -> dict[str, Any]:
        return {"outer_anchor": self.anchor.clone(), "outer_velocity": self.velocity.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "outer_anchor" in state:
            self.anchor = state["outer_anchor"].clone()
            self.velocity = state["outer_velocity"].clone()
