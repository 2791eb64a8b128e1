"""What a node checkpoints: learner (model, optimizer, sampler RNG), core state, counters.

``core_state`` / ``load_core_state`` read and write the attributes of a protocol core that
matter across restarts (the step, the counters and, for the dynamic core, its reference,
drift correction and steps since the last sync). Sessions in flight are not kept: peers time
them out.
"""

from __future__ import annotations

from typing import Any

import torch

from p2pfl.learning.learner import PerNodeLearner
from p2pfl.protocol.core import CoreStats, NodeCore
from p2pfl.protocol.dynamic import DynamicCore

STATE_VERSION = 1


def core_state(core: NodeCore) -> dict[str, Any]:
    """The core's restart-relevant state as plain values."""
    state: dict[str, Any] = {"step": core.step, "stats": core.stats.as_dict()}
    if isinstance(core, DynamicCore):
        state["reference"] = core.reference.clone()
        state["correction"] = None if core.correction is None else core.correction.clone()
        state["steps_since_sync"] = core.steps_since_sync
    return state


def load_core_state(core: NodeCore, state: dict[str, Any]) -> None:
    """Restore what ``core_state`` returned (ignoring dynamic fields on other cores)."""
    core.step = int(state["step"])
    core.stats = CoreStats(**{k: int(v) for k, v in state["stats"].items()})
    if isinstance(core, DynamicCore) and "reference" in state:
        core.reference = state["reference"].clone()
        core.correction = state["correction"]
        core.steps_since_sync = int(state["steps_since_sync"])
        core._delta = core._compute_delta()


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
        "core": core_state(core),
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
    load_core_state(core, state["core"])
    correction = getattr(core, "correction", None)
    if isinstance(correction, torch.Tensor):
        learner.set_correction(0, correction)
    return {k: int(v) for k, v in state["counters"].items()}
