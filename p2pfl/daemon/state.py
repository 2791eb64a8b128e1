"""What a node checkpoints: learner (model, optimizer, sampler RNG), core state, counters,
and the state of each community it is in.

The core's part comes from its own ``state_dict`` and goes back through
``CoreRuntime.restore``; the communities' part from ``Communities.state_dict`` /
``load_state_dict``. Checkpoints written before
communities were checkpointed have no ``communities`` section; they load with none.
"""

from __future__ import annotations

import logging
from typing import Any

from p2pfl.learning.learner import PerNodeLearner
from p2pfl.protocol.core import NodeCore
from p2pfl.runtime import CoreRuntime

log = logging.getLogger("p2pfl.daemon")

STATE_VERSION = 1


def node_state(
    learner: PerNodeLearner,
    core: NodeCore,
    peer_id: str,
    counters: dict[str, int],
    communities: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything a restart needs, ready for ``encode_checkpoint``; ``communities`` is
    ``Communities.state_dict()``."""
    return {
        "version": STATE_VERSION,
        "peer_id": peer_id,
        "schema": learner.schema.digest(),
        "model": learner.get(0).clone(),
        "optimizer": learner.optimizers[0].state_dict(),
        "sampler_rng": learner.data.generator.get_state(),
        "core": core.state_dict(),
        "counters": dict(counters),
        "communities": dict(communities or {}),
    }


def restore_node_state(
    learner: PerNodeLearner, runtime: CoreRuntime, peer_id: str, state: dict[str, Any]
) -> dict[str, int]:
    """Load ``state`` into the learner and the whole-model core's ``runtime``; return its
    counters.

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
    runtime.restore(state["core"])
    learner.steps_taken[0] = runtime.core.step  # the learning-rate schedule goes on from there
    return {k: int(v) for k, v in state["counters"].items()}


def community_states(state: dict[str, Any]) -> dict[str, Any]:
    """The communities' section of a checkpoint, by community id (empty in a checkpoint of an
    earlier version, or with a warning if the section is malformed: communities start afresh,
    the rest of the checkpoint is still used)."""
    section = state.get("communities", {})
    if not isinstance(section, dict):
        log.warning(
            "the checkpoint's communities section is a %s, not a table: every community "
            "starts afresh at step 0",
            type(section).__name__,
        )
        return {}
    return section
