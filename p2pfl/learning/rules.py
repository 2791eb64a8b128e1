"""The merge rule a protocol spec names (``merge=``, ``trim=``, ``f=``, ``clip=``); parsed
without torch so the command line stays light. The rules themselves: ``p2pfl.learning.merge``."""

from __future__ import annotations

import math
from dataclasses import dataclass

from p2pfl.spec import Spec, SpecError, non_negative_float, non_negative_int, probability

RULES = ("uniform", "samples", "median", "trimmed", "krum", "multikrum")
MERGE_KEYS = frozenset({"merge", "trim", "f", "clip"})
CLIP_FACTOR = 3.0
"""Default κ of the clip bound τ = κ·s: an honest peer's model differs from ours by at most
our own displacement since the last merge, plus its displacement (about the same: same
protocol, same step size), plus what the last merge left between us (no more than one
displacement when merges mix well), so about 3·s."""


@dataclass(frozen=True)
class MergeRule:
    """A merge rule and its parameters, as parsed from a protocol spec."""

    rule: str = "uniform"
    trim: float = 0.2
    f: int = 1
    clip: float = CLIP_FACTOR


def parse_merge(spec: Spec) -> MergeRule:
    """Take ``merge``, ``trim``, ``f`` and ``clip`` out of a protocol spec."""
    rule = spec.take("merge", str, "uniform")
    if rule not in RULES:
        raise SpecError(f"{spec.text!r}: merge must be one of {', '.join(RULES)}")
    trim = spec.take("trim", probability, 0.2)
    if trim >= 0.5:
        raise SpecError(f"{spec.text!r}: trim is the fraction cut at EACH end; keep it below 0.5")
    clip = spec.take("clip", non_negative_float, CLIP_FACTOR)
    if not math.isfinite(clip):
        raise SpecError(f"{spec.text!r}: clip must be finite (0 turns clipping off)")
    return MergeRule(rule, trim, spec.take("f", non_negative_int, 1), clip)
