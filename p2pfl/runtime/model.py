"""One node's model inside a learner, as its cores see and change it.

A learner holds the models of one node (daemon) or of all nodes (simulator); ``NodeModel`` is
one of them. Each core works on one part of it (the whole model, or what a community shares):
it reads the part through ``view`` (a ``PartView``), and the runtime writes the part back with
``replace`` and the part's slice of the node's single drift correction with ``set_correction``
(``Corrections``), so private parameters are neither sent nor overwritten.
"""

from __future__ import annotations

from typing import Protocol

import torch

from p2pfl.community.sharing import Corrections, PartView, SharedPart
from p2pfl.learning.learner import SGDConfig
from p2pfl.learning.params import ParamSchema
from p2pfl.runtime.rules import step_size


class Models(Protocol):
    """What ``NodeModel`` needs of a learner (``Learner`` has it; tests use a fake)."""

    schema: ParamSchema
    sgd: SGDConfig

    def get(self, node: int) -> torch.Tensor: ...

    def set(self, node: int, vector: torch.Tensor) -> None: ...

    def set_correction(self, node: int, vector: torch.Tensor | None) -> None: ...

    def lr(self, node: int, steps: int = 1) -> float: ...


class NodeModel:
    """Node ``node`` of ``learner``, trained on ``samples`` local samples."""

    def __init__(self, learner: Models, node: int, samples: int) -> None:
        self.learner, self.node, self.samples = learner, node, samples
        self._corrections: Corrections | None = None

    def step_size(self, steps: int = 1) -> float:
        """The step size of this node's latest step (``rules.step_size``), which its cores
        use; it follows the learning-rate schedule. With ``steps``: the mean over the latest
        ``steps`` steps (what a merge after them divides by, see ``correction.py``)."""
        sgd = self.learner.sgd
        return step_size(sgd, None if sgd.schedule.constant else self.learner.lr(self.node, steps))

    def read(self) -> torch.Tensor:
        """The full flat parameters (may be a live view: clone what you keep)."""
        return self.learner.get(self.node)

    def view(self, part: SharedPart) -> PartView:
        """What a core on ``part`` reads (its ``ModelAccess``)."""
        return PartView(self.read, part, self.samples)

    def replace(self, part: SharedPart, params: torch.Tensor) -> None:
        """Overwrite ``part``'s entries with ``params``; the other entries are kept."""
        self.learner.set(self.node, part.put(self.read(), params))

    def set_correction(self, part: SharedPart, vector: torch.Tensor) -> None:
        """Set ``part``'s slice of the node's gradient correction."""
        if self._corrections is None:
            self._corrections = Corrections(self.learner.schema.numel)
        self.learner.set_correction(self.node, self._corrections.set(part, vector))

    def clear_correction(self, part: SharedPart) -> None:
        """Zero ``part``'s slice of the correction (its channel was closed)."""
        if self._corrections is not None:
            self.learner.set_correction(self.node, self._corrections.clear(part))
