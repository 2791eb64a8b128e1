"""Merge rules: how a group's models become one."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def merge(
    vectors: Sequence[torch.Tensor], samples: Sequence[int], rule: str = "uniform"
) -> torch.Tensor:
    """Average flat parameter vectors: ``uniform`` (keeps the group's mean, hence the global
    mean) or weighted by ``samples`` (each model counts as much as the data behind it)."""
    stacked = torch.stack(list(vectors))
    if rule == "uniform":
        return stacked.mean(0)
    if rule == "samples":
        w = torch.tensor(samples, dtype=stacked.dtype).clamp_min(1)
        return (w[:, None] * stacked).sum(0) / w.sum()
    raise ValueError(f"unknown merge rule {rule!r}")
