"""The rules both drivers follow when they build a node's cores: the step size a core is told
and the seed of its randomness. One function each, so a simulated node and a daemon with the
same settings build the same core.
"""

from __future__ import annotations

import hashlib

from p2pfl.learning.learner import SGDConfig

WHOLE_MODEL_CHANNEL = "all"
"""The name of the whole-model channel in ``core_seed`` (simulator and daemon alike)."""


def step_size(sgd: SGDConfig, lr: float | None = None) -> float:
    """The step size a core uses to turn a parameter change into a gradient (the drift
    correction ``c += g (w_sent - average) / (η K)``): ``lr / (1 - momentum)``, with the
    current ``lr`` under a learning-rate schedule (default: the base ``sgd.lr``).

    Why not ``lr``: a constant gradient offset ``δ`` (what the correction learns) moves SGD
    with momentum ``β`` by ``lr δ (1 + β + β² + ...) = lr δ / (1 - β)`` per step once the
    velocity has settled, so the drift a core observes over K steps is ``K η δ`` with
    ``η = lr / (1 - β)``. Dividing by ``lr`` alone would overestimate the offset by
    ``1 / (1 - β)`` (10× at β = 0.9) and make the correction overshoot. Without momentum both
    are ``lr``."""
    if not 0.0 <= sgd.momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {sgd.momentum}")
    return (sgd.lr if lr is None else lr) / (1.0 - sgd.momentum)


def derive_seed(seed: int, *names: object) -> int:
    """A 63-bit seed for the thing named by ``names`` under the run's ``seed``: stable across
    runs and machines (SHA-256, not ``hash``), different for every name."""
    text = ":".join(str(part) for part in (seed, *names))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") & (2**63 - 1)


def core_seed(seed: int, node: str, channel: str) -> int:
    """Seed of the core of ``node`` (its id: peer id, or index in a simulation) in
    ``channel`` (the whole model, or a community's id or name)."""
    return derive_seed(seed, "core", node, channel)
