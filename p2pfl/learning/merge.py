"""Merge rules: how a group's models become one, and how much one peer can pull a node.

Rules (``merge=`` in every protocol spec):

* ``uniform``: the mean (keeps the group's mean, hence the global mean); ``samples``: mean
  weighted by each model's training samples.
* ``median``: coordinate-wise median (middle values averaged for an even count).
* ``trimmed``: coordinate-wise trimmed mean, dropping ``ceil(trim·n)`` values at each end
  (at most what leaves one value).
* ``krum`` / ``multikrum`` (Blanchard et al., NeurIPS 2017): score each model by the summed
  squared distances to its ``n - f - 2`` nearest others; Krum takes the best-scored model,
  multi-Krum averages the ``n - f`` best. Ties are averaged, so the result never depends on
  the order of the models.

Robust rules ignore sample counts (a liar would simply claim many samples).

Before any rule, each incoming model can be **clipped** to a ball around the receiver's own
model (self-centred clipping, as in He, Karimireddy & Jaggi, "Byzantine-robust decentralized
learning via ClippedGossip", 2022): ``v ← own + (v - own)·min(1, τ/||v - own||)``. The
protocol core chooses τ from what it knows (see ``NodeCore.clip_bound``); whatever a peer
sends, it moves the merge by at most ``τ / n``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from p2pfl.learning.rules import RULES, MergeRule


def distances_to(vectors: Sequence[torch.Tensor], to: Sequence[torch.Tensor]) -> list[float]:
    """``||vectors[i] - to[i]||`` for every ``i``, in one tensor operation; one vector (or
    one ``to``, or several that are all the same tensor) stands for all of them. Equal, bit
    for bit, to measuring each pair on its own."""
    if not vectors or not to:
        return []
    if len(to) > 1 and all(t is to[0] for t in to):
        to = to[:1]
    if len(vectors) == 1 and len(to) == 1:
        return [float(torch.linalg.vector_norm(vectors[0] - to[0]))]
    if len(vectors) == len(to) > FEW_PAIRS:
        distinct = _distinct_distances(vectors, to)
        if distinct is not None:
            return distinct
    a = vectors[0] if len(vectors) == 1 else torch.stack(list(vectors))
    b = to[0] if len(to) == 1 else torch.stack(list(to))
    return torch.linalg.vector_norm(a - b, dim=-1).tolist()


FEW_PAIRS = 6
"""Up to this many pairs ``distances_to`` stacks both sides (fewest calls); beyond, it
measures each distinct pair once, subtracting run by run into one buffer (fewest copies: a
merge's pairs share sides)."""


def _distinct_distances(
    vectors: Sequence[torch.Tensor], to: Sequence[torch.Tensor]
) -> list[float] | None:
    """``distances_to`` of many pairs, each distinct pair of tensors measured once (a merge
    asks for our distance to one earlier model of ours for every peer recorded with it);
    None unless all the tensors are flat vectors of one size and dtype."""
    index: dict[tuple[int, int], int] = {}
    slots, rows = [], []  # each pair's distinct pair; each distinct pair's first row
    for row, pair in enumerate(zip(map(id, vectors), map(id, to), strict=True)):
        slot = index.setdefault(pair, len(index))
        if slot == len(rows):
            rows.append(row)
        slots.append(slot)
    if len(rows) < len(slots):
        vectors, to = [vectors[r] for r in rows], [to[r] for r in rows]
    # Checked once per distinct tensor (a merge's pairs share most of their tensors).
    if not _alike(list({id(t): t for t in (*vectors, *to)}.values())):
        return None
    distinct = torch.linalg.vector_norm(_differences(vectors, to), dim=-1).tolist()
    return [distinct[slot] for slot in slots]


def _alike(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether all ``tensors`` are flat vectors of one size and dtype."""
    first = tensors[0]
    if first.dim() != 1:
        return False
    shape, dtype = first.shape, first.dtype
    return all(t.shape == shape and t.dtype == dtype for t in tensors)


def _differences(vectors: Sequence[torch.Tensor], to: Sequence[torch.Tensor]) -> torch.Tensor:
    """``vectors[i] - to[i]`` as the rows of one tensor. A run of pairs with one side the
    same tensor subtracts that side broadcast, not a copy of it per row; the other pairs are
    stacked. Elementwise, bit for bit ``stack(vectors) - stack(to)``."""
    n = len(vectors)
    out = torch.empty(n, vectors[0].shape[-1], dtype=vectors[0].dtype)
    i = 0
    while i < n:
        j = _run_end(to, i)
        if j - i > 1:
            torch.stack(vectors[i:j], out=out[i:j]).sub_(to[i])
            i = j
            continue
        j = _run_end(vectors, i)
        if j - i > 1:
            torch.sub(vectors[i], torch.stack(to[i:j], out=out[i:j]), out=out[i:j])
            i = j
            continue
        j = i + 1
        while j < n and _run_end(to, j) == _run_end(vectors, j) == j + 1:
            j += 1
        torch.stack(vectors[i:j], out=out[i:j]).sub_(torch.stack(to[i:j]))
        i = j
    return out


def _run_end(tensors: Sequence[torch.Tensor], start: int) -> int:
    """End of the run of entries from ``start`` that are the same tensor as ``tensors[start]``."""
    end = start + 1
    while end < len(tensors) and tensors[end] is tensors[start]:
        end += 1
    return end


def clip_around(
    own: torch.Tensor,
    others: Sequence[torch.Tensor],
    bounds: float | Sequence[float],
    distances: Sequence[float] | None = None,
) -> tuple[list[torch.Tensor], int]:
    """Each of ``others`` pulled into the ball around ``own`` of its radius in ``bounds``
    (one radius for all, or one per model); also return how many had to be clipped.
    ``distances``: each model's ``||v - own||`` if the caller computed them already."""
    radii = [bounds] * len(others) if isinstance(bounds, float | int) else list(bounds)
    if distances is None:
        distances = [float(torch.linalg.vector_norm(v - own)) for v in others]
    clipped, count = [], 0
    for v, bound, distance in zip(others, radii, distances, strict=True):
        if distance > bound:
            count += 1
            scale = bound / distance if math.isfinite(distance) else 0.0
            v = own + (v - own) * scale
        clipped.append(v)
    return clipped, count


def coordinate_median(stacked: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise median of ``[n, d]``; the two middle values averaged for even n."""
    ordered = stacked.sort(0).values
    n = ordered.shape[0]
    return (ordered[(n - 1) // 2] + ordered[n // 2]) / 2


def trimmed_mean(stacked: torch.Tensor, trim: float) -> torch.Tensor:
    """Coordinate-wise mean after dropping ``ceil(trim·n)`` values at each end (at most
    ``(n-1)//2``, so one value always remains)."""
    n = stacked.shape[0]
    k = min(math.ceil(trim * n - 1e-9), (n - 1) // 2)
    ordered = stacked.sort(0).values
    return ordered[k : n - k].mean(0)


TIE = 1e-5
"""Krum scores this close (relatively) count as a tie: float32 rounding of equal distances."""


def krum(stacked: torch.Tensor, f: int, keep: int) -> torch.Tensor:
    """Mean of the ``keep`` models with the lowest Krum scores (ties at the cut included)."""
    n = stacked.shape[0]
    if n <= 2:
        return stacked.mean(0)
    flat = stacked.double()
    distances = (flat[:, None, :] - flat[None, :, :]).square().sum(-1)
    nearest = max(1, n - f - 2)
    # Each row's smallest entry is the model's zero distance to itself: skip it.
    scores = distances.sort(1).values[:, 1 : 1 + nearest].sum(1)
    cut = scores.sort().values[min(keep, n) - 1]
    chosen = scores <= cut * (1 + TIE) + 1e-30
    return stacked[chosen].mean(0)


def merge(
    vectors: Sequence[torch.Tensor],
    samples: Sequence[int],
    rule: MergeRule | str = "uniform",
) -> torch.Tensor:
    """Merge flat parameter vectors with ``rule`` (no clipping here: see ``clip_around``)."""
    if isinstance(rule, str):
        if rule not in RULES:
            raise ValueError(f"unknown merge rule {rule!r}")
        rule = MergeRule(rule)
    if rule.rule == "uniform" and len(vectors) == 2:  # a pair (gossip): no stack needed
        return (vectors[0] + vectors[1]) / 2  # bit for bit ``stack(vectors).mean(0)``
    stacked = torch.stack(list(vectors))
    n = stacked.shape[0]
    if rule.rule == "uniform" or n == 1:
        return stacked.mean(0)
    if rule.rule == "samples":
        w = torch.tensor(samples, dtype=stacked.dtype).clamp_min(1)
        return (w[:, None] * stacked).sum(0) / w.sum()
    if rule.rule == "median":
        return coordinate_median(stacked)
    if rule.rule == "trimmed":
        return trimmed_mean(stacked, rule.trim)
    if rule.rule == "krum":
        return krum(stacked, rule.f, 1)
    return krum(stacked, rule.f, max(1, n - rule.f))
