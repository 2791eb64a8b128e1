"""Learning-rate schedules: the factor each node's base learning rate is multiplied by at
its ``t``-th local step (``t = 0`` for its first step).

``constant``; ``cosine[:steps=T,min=M]`` (from 1 down to ``M`` over ``T`` steps, then ``M``;
``T`` defaults to the run's length); ``step:every=N[,gamma=G]`` (times ``G`` every ``N``
steps); ``restarts:period=P[,mult=K,min=M]`` (cosine with warm restarts, SGDR, Loshchilov &
Hutter 2017: a cosine from 1 to ``M`` over ``P`` steps, then again over ``K·P``, ...). Every
kind takes ``warmup=W``: a linear ramp over the first ``W`` steps, after which the schedule
starts from its own step 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from p2pfl.spec import non_negative_int, parse_spec, positive_int, probability

SCHEDULE_KINDS = ("constant", "cosine", "step", "restarts")


@dataclass(frozen=True)
class LRSchedule:
    """A parsed schedule; :meth:`factor` is the multiplier of the base learning rate."""

    kind: str = "constant"
    steps: int | None = None
    every: int = 0
    gamma: float = 0.1
    period: int = 0
    mult: float = 1.0
    min: float = 0.0
    warmup: int = 0
    text: str = "constant"

    @property
    def constant(self) -> bool:
        return self.kind == "constant" and not self.warmup

    def with_horizon(self, steps: int) -> LRSchedule:
        """The schedule with a cosine horizon of ``steps`` if it has none yet."""
        if self.kind == "cosine" and self.steps is None:
            return replace(self, steps=steps)
        return self

    def factor(self, t: int) -> float:
        """The learning-rate multiplier of a node's ``t``-th step (``t >= 0``)."""
        if t < self.warmup:
            return (t + 1) / self.warmup
        t -= self.warmup
        if self.kind == "step":
            return self.gamma ** (t // self.every)
        if self.kind == "cosine":
            if self.steps is None:
                raise ValueError(f"{self.text!r}: the cosine schedule needs steps=T")
            horizon = max(1, self.steps - self.warmup)
            return self._cosine(min(t, horizon) / horizon)
        if self.kind == "restarts":
            length = float(self.period)
            if self.mult == 1.0:
                t %= self.period
            while t >= length:
                t -= int(length)
                length = max(1.0, round(length * self.mult))
            return self._cosine(t / length)
        return 1.0

    def _cosine(self, progress: float) -> float:
        return self.min + (1.0 - self.min) * 0.5 * (1.0 + math.cos(math.pi * progress))


def parse_lr_schedule(text: str) -> LRSchedule:
    """Parse a schedule spec; bad specs raise SpecError naming the fix."""
    spec = parse_spec(text, SCHEDULE_KINDS)
    keys = {
        "constant": [],
        "cosine": ["steps", "min"],
        "step": ["every", "gamma"],
        "restarts": ["period", "mult", "min"],
    }[spec.kind]
    spec.check_keys(keys + ["warmup"])
    values = {
        "kind": spec.kind,
        "text": spec.text,
        "warmup": spec.take("warmup", non_negative_int, default=0),
        "min": spec.take("min", probability, default=0.0),
    }
    if spec.kind == "cosine":
        values["steps"] = spec.take("steps", positive_int)
    elif spec.kind == "step":
        values["every"] = spec.take("every", positive_int, required=True)
        values["gamma"] = spec.take("gamma", probability, default=0.1)
    elif spec.kind == "restarts":
        values["period"] = spec.take("period", positive_int, required=True)
        values["mult"] = spec.take("mult", _at_least_one, default=1.0)
    return LRSchedule(**values)


def _at_least_one(raw: str) -> float:
    value = float(raw)
    if not value >= 1.0:
        raise ValueError("must be >= 1 (each period as long as the last, or longer)")
    return value
