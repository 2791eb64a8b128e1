"""Sharing masks: the part of a node's model one community syncs, and the rest stays private.

A community names the parameters it shares with globs (``fc1.*``, ``head.*``). ``SharedPart``
turns them into a sub-schema (what goes on the wire) and the positions of those entries in the
node's full flat vector. Protocol cores only ever see the shared part: ``PartView`` is the
``ModelAccess`` a community's core reads; a driver applies the core's ``ReplaceModel`` with
``SharedPart.put`` and its ``SetCorrection`` through ``Corrections``, so private parameters are
neither sent nor overwritten.
"""

from __future__ import annotations

import fnmatch
import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from p2pfl.errors import P2pflError
from p2pfl.learning.params import ParamSchema


class SharingError(P2pflError, ValueError):
    """Share globs that match nothing, or parts that overlap; the message says what to fix."""


@dataclass(frozen=True)
class SharedPart:
    """The entries of a full flat parameter vector that one community shares."""

    schema: ParamSchema
    """Sub-schema of the shared parameters, in the order of the full schema."""
    index: torch.Tensor
    """Positions (int64) of the shared entries in the full flat vector."""

    @functools.cached_property
    def span(self) -> slice | None:
        """The shared entries as one slice when they are contiguous (whole layers next to each
        other, or the whole model): then ``take`` and ``put`` copy a slice, several times
        faster than gathering by index. None otherwise."""
        first, count = int(self.index[0]), len(self.index)
        contiguous = torch.equal(self.index, torch.arange(first, first + count))
        return slice(first, first + count) if contiguous else None

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """The shared entries of a full vector (a copy)."""
        span = self.span
        return full[..., span].clone() if span is not None else full.index_select(-1, self.index)

    def put(self, full: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
        """``full`` with the shared entries replaced by ``part``: a new tensor, or ``part``
        itself when the part is the whole model (so never modify the result in place)."""
        span = self.span
        if span is not None and span.start == 0 and span.stop == full.shape[-1]:
            return part
        out = full.clone()
        out[..., self.index if span is None else span] = part
        return out


def shared_part(schema: ParamSchema, globs: Sequence[str], local: Iterable[str] = ()) -> SharedPart:
    """The part of ``schema`` whose parameter names match any of ``globs``, except the
    parameters named in ``local`` (kept on the node, e.g. a protocol's ``local=bn``).

    Every glob must match at least one parameter (a typo would otherwise share nothing)."""
    kept = set(local)
    if not globs:
        raise SharingError("no parameters to share: give at least one name glob, e.g. 'fc1.*'")
    for glob in globs:
        if not any(fnmatch.fnmatchcase(name, glob) for name in schema.names):
            raise SharingError(
                f"share glob {glob!r} matches no parameter of the model; "
                f"its parameters are {', '.join(schema.names)}"
            )
    specs, positions, offset = [], [], 0
    for spec in schema.params:
        if spec.name not in kept and any(fnmatch.fnmatchcase(spec.name, g) for g in globs):
            specs.append(spec)
            positions.append(torch.arange(offset, offset + spec.numel))
        offset += spec.numel
    if not specs:
        raise SharingError(f"nothing left to share: {list(globs)} match only local parameters")
    return SharedPart(ParamSchema(tuple(specs)), torch.cat(positions))


def check_disjoint(parts: Iterable[tuple[str, SharedPart]]) -> None:
    """Raise ``SharingError`` if two named parts share a parameter (each parameter is synced
    by at most one community, so two policies never fight over it)."""
    owner: dict[str, str] = {}
    for label, part in parts:
        for name in part.schema.names:
            if name in owner:
                raise SharingError(
                    f"parameter {name!r} would be shared with both {owner[name]} and {label}; "
                    "a parameter can be shared with one community at a time: leave one of "
                    "them or narrow its share globs"
                )
            owner[name] = label


class PartView:
    """``ModelAccess`` of one community's core: reads only the shared entries."""

    def __init__(self, read_full: Callable[[], torch.Tensor], part: SharedPart, samples: int):
        self._read_full, self.part, self._samples = read_full, part, samples

    def read(self) -> torch.Tensor:
        """The shared entries: a live view when they are contiguous, else a copy (the core
        clones what it keeps, as ``ModelAccess`` asks)."""
        full, span = self._read_full(), self.part.span
        if span is None:
            return self.part.take(full)
        return full if span.start == 0 and span.stop == full.shape[-1] else full[..., span]

    @property
    def samples(self) -> int:
        return self._samples


class Corrections:
    """One node's drift corrections from several communities, side by side in one full-size
    vector (zero on private entries), since the learner keeps a single correction per node."""

    def __init__(self, numel: int) -> None:
        self.correction = torch.zeros(numel)

    def set(self, part: SharedPart, vector: torch.Tensor) -> torch.Tensor:
        """Record a community's correction; returns the node's full correction vector (the
        live buffer: hand it to ``Learner.set_correction``, which copies it)."""
        self.correction[part.index if part.span is None else part.span] = vector
        return self.correction

    def clear(self, part: SharedPart) -> torch.Tensor:
        """Drop a community's correction (it was left); returns the full correction vector
        (the live buffer, as ``set``)."""
        self.correction[part.index] = 0.0
        return self.correction
