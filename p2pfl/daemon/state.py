"""What a node checkpoints: learner (model, optimizer, sampler RNG), core state, counters.

The core's part comes from its own ``state_dict`` / ``load_state_dict``.
"""

from __future__ import annotations

from typing import Any

import torch

from p2pfl.learning.learner import PerNodeLearner
from p2pfl.protocol.core import NodeCore

STATE_VERSION = 1


def node_state(
    learner: PerNodeLearner, core: NodeCore, peer_id: str, counters: dict[str, int]
) -> dict[str, Any]:
    """Everything a restart needs, ready for ``encode_checkpoint``."""
    return {
        "version": STATE_VERSION,
        "peer_id": peer_id,
        "schema": learner.schema.digest(),
        "model": learner.get(0).clone(),
        "optimizer": learner.optimizers[0].state_dict(),
        "sampler_rng": learner.data.generator.get_state(),
        "core": core.state_dict(),
        "counters": dict(counters),
    }


def restore_node_state(
    learner: PerNodeLearner, core: NodeCore, peer_id: str, state: dict[str, Any]
) -> dict[str, int]:
    """Load ``state`` into learner and core; return its counters.

    Raises ValueError if it belongs to another identity or another model.
    """
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"checkpoint version {state.get('version')!r}, expected {STATE_VERSION}")
    if state["peer_id"] != peer_id:
        raise ValueError(f"checkpoint belongs to peer {state['peer_id']}, this node is {peer_id}")
    if bytes(state["schema"]) != learner.schema.digest():
        raise ValueError(
            "checkpoint holds a different model architecture; use the model it was trained "
            "with, or move the ckpt files away to start fresh"
        )
    learner.set(0, state["model"])
    learner.optimizers[0].load_state_dict(state["optimizer"])
    learner.data.generator.set_state(state["sampler_rng"])
    core.load_state_dict(state["core"])
    correction = getattr(core, "correction", None)
    if isinstance(correction, torch.Tensor):
        learner.set_correction(0, correction)
    return {k: int(v) for k, v in state["counters"].items()}
