"""Parsing of the short spec strings used everywhere on the command line, and the value
converters shared by every validator (they raise ValueError with the reason).

A spec is ``name`` or ``name:key=value,key=value``; e.g. ``small-world:k=4,p=0.2``,
``dirichlet:alpha=0.5``, ``mlp:hidden=64x32``, ``digits:part=3/8,alpha=0.5``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from p2pfl.errors import P2pflError


class SpecError(P2pflError, ValueError):
    """A spec string the user gave cannot be understood; the message says how to fix it."""


@dataclass(frozen=True)
class Spec:
    """A parsed spec: a kind name and its raw ``key=value`` arguments."""

    kind: str
    args: dict[str, str] = field(default_factory=dict)
    text: str = ""

    def take(
        self, key: str, convert: Callable[[str], Any], default: Any = None, required: bool = False
    ) -> Any:
        """Return argument ``key`` converted, or ``default``; a bad value raises SpecError."""
        if key not in self.args:
            if required:
                raise SpecError(
                    f"{self.text!r}: missing argument {key!r} (write {self.kind}:{key}=...)"
                )
            return default
        raw = self.args[key]
        try:
            return convert(raw)
        except (TypeError, ValueError) as exc:
            raise SpecError(f"{self.text!r}: bad value {raw!r} for {key!r}: {exc}") from None

    def check_keys(self, allowed: Iterable[str]) -> None:
        """Raise SpecError if the spec has an argument not in ``allowed``."""
        allowed = set(allowed)
        unknown = sorted(set(self.args) - allowed)
        if unknown:
            hint = ", ".join(sorted(allowed)) or "none"
            raise SpecError(
                f"{self.text!r}: unknown argument(s) {unknown}; {self.kind} accepts: {hint}"
            )


def parse_spec(text: str, known_kinds: Iterable[str] | None = None) -> Spec:
    """Parse ``name[:key=value,...]``; with ``known_kinds`` an unknown name is an error."""
    text = text.strip()
    if not text:
        raise SpecError("empty spec")
    kind, _, rest = text.partition(":")
    kind = kind.strip().lower()
    args: dict[str, str] = {}
    if rest.strip():
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise SpecError(f"{text!r}: expected key=value, got {item!r}")
            if key.strip() in args:
                raise SpecError(f"{text!r}: argument {key.strip()!r} given twice")
            args[key.strip()] = value.strip()
    if known_kinds is not None:
        kinds = list(known_kinds)
        if kind not in kinds:
            raise SpecError(f"{text!r}: unknown kind {kind!r}; choose one of: {', '.join(kinds)}")
    return Spec(kind=kind, args=args, text=text)


def positive_int(raw: str) -> int:
    """Convert to an int >= 1."""
    value = int(raw)
    if value < 1:
        raise ValueError("must be >= 1")
    return value


def non_negative_int(raw: str) -> int:
    """Convert to an int >= 0 (a step number or a seed)."""
    value = int(raw)
    if value < 0:
        raise ValueError("must be >= 0")
    return value


def non_negative_float(raw: str) -> float:
    """Convert to a float >= 0 (``inf`` allowed)."""
    value = float(raw)
    if not value >= 0:
        raise ValueError("must be >= 0")
    return value


def positive_float(raw: str) -> float:
    """Convert to a finite float > 0."""
    value = float(raw)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError("must be a positive number")
    return value


def probability(raw: str) -> float:
    """Convert to a float in [0, 1]."""
    value = float(raw)
    if not 0.0 <= value <= 1.0:
        raise ValueError("must be between 0 and 1")
    return value


def whole_number(low: int, high: int | None = None) -> Callable[[Any], int]:
    """A converter of an already typed value (TOML, JSON) that must be an int in
    ``[low, high]`` (no upper bound without ``high``); bools and floats are refused."""

    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be a whole number, got {value!r}")
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f">= {low}"
            raise ValueError(f"must be {bound}, got {value}")
        return value

    return convert


def finite_number(*, positive: bool = False) -> Callable[[Any], float]:
    """A converter of an already typed value (TOML, JSON) that must be a finite number,
    ``> 0`` if ``positive`` else ``>= 0``; bools and strings are refused."""

    def convert(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"must be a number, got {value!r}")
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            bound = "a positive number" if positive else "a finite number >= 0"
            raise ValueError(f"must be {bound}, got {value}")
        return float(value)

    return convert
