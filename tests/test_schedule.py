"""Learning-rate schedules: their shapes, warm-up, and spec errors."""

from __future__ import annotations

import math

import pytest

from p2pfl.learning.schedule import parse_lr_schedule
from p2pfl.spec import SpecError


def factors(text: str, steps: int, horizon: int | None = None) -> list[float]:
    schedule = parse_lr_schedule(text)
    if horizon is not None:
        schedule = schedule.with_horizon(horizon)
    return [schedule.factor(t) for t in range(steps)]


def test_constant_is_one_and_marked_constant():
    assert factors("constant", 5) == [1.0] * 5
    assert parse_lr_schedule("constant").constant
    assert not parse_lr_schedule("constant:warmup=3").constant


def test_cosine_runs_from_one_to_min_over_the_horizon_then_stays():
    f = factors("cosine:min=0.1", 12, horizon=10)
    assert f[0] == 1.0 and f[5] == pytest.approx(0.55) and f[10] == f[11] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f, f[1:], strict=False))
    assert factors("cosine:steps=4", 5) == pytest.approx(
        [1.0, 0.853553, 0.5, 0.146447, 0.0], abs=1e-6
    )
    assert parse_lr_schedule("cosine:steps=4").with_horizon(100).steps == 4  # its own wins
    with pytest.raises(ValueError, match="steps=T"):
        parse_lr_schedule("cosine").factor(3)


def test_step_decays_by_gamma_every_n_steps():
    assert factors("step:every=3,gamma=0.5", 7) == [1, 1, 1, 0.5, 0.5, 0.5, 0.25]
    assert factors("step:every=2", 5) == pytest.approx([1, 1, 0.1, 0.1, 0.01])


def test_restarts_repeat_the_cosine_and_can_lengthen_it():
    f = factors("restarts:period=4", 9)
    assert f[:4] == f[4:8] and f[8] == 1.0 and f[0] == 1.0 and f[2] == pytest.approx(0.5)
    grown = factors("restarts:period=2,mult=2", 8)
    assert [t for t, v in enumerate(grown) if v == 1.0] == [0, 2, 6]  # periods 2, 4, 8
    assert grown[4] == pytest.approx(0.5 * (1 + math.cos(math.pi * 2 / 4)))


def test_warmup_ramps_then_starts_the_schedule():
    assert factors("step:every=2,gamma=0.5,warmup=4", 8) == [0.25, 0.5, 0.75, 1, 1, 1, 0.5, 0.5]
    f = factors("cosine:warmup=2", 7, horizon=6)
    assert f[:3] == [0.5, 1.0, 1.0] and f[6] == pytest.approx(0.0)  # cosine over steps 2..5


@pytest.mark.parametrize(
    "text",
    [
        "linear",
        "step",
        "step:every=0",
        "step:every=5,gamma=2",
        "cosine:min=-1",
        "cosine:period=4",
        "restarts",
        "restarts:period=5,mult=0.5",
        "constant:min=0.1",
        "constant:warmup=-1",
    ],
)
def test_bad_specs(text):
    with pytest.raises(SpecError):
        parse_lr_schedule(text)
