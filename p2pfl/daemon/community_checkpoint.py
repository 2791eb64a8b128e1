"""The communities' part of the node checkpoint: each community's core state (step,
reference, drift correction, stats) and counters, by community id, with the digest of the
shared schema they belong to. A restarted node resumes every community it is still in where
it stopped; state of a community it left is ignored, state that does not fit starts that
community afresh (with a warning naming it).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from p2pfl.protocol.core import NodeCore

if TYPE_CHECKING:
    from p2pfl.daemon.communities import Communities, Community

log = logging.getLogger("p2pfl.communities")


def state_of(community: Community) -> dict[str, Any]:
    """What a restart needs of ``community``."""
    return {
        "name": community.manifest.name,
        "schema": community.part.schema.digest(),
        "core": community.core.state_dict(),
        "counters": dict(community.counters),
    }


def restore(communities: Communities, saved: dict[str, Any]) -> None:
    """Resume the active communities from ``saved`` (by community id), then give the learner
    the combined drift correction of their cores."""
    for cid, state in saved.items():
        community = communities.active.get(cid)
        if community is None:
            name = state.get("name") if isinstance(state, dict) else None
            log.info(
                "ignored the saved state of community %r (%s): this node is no longer a member",
                name,
                str(cid)[:12],
            )
            continue
        try:
            core, counters = _restored(communities, community, state)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            log.warning(
                "community %s starts afresh at step 0: its saved state does not fit (%s)",
                community.label,
                exc,
            )
            continue
        community.core, community.counters = core, counters
        correction = getattr(core, "correction", None)
        if isinstance(correction, torch.Tensor):
            communities.corrections.set(community.part, correction)
        log.info("community %s resumed at step %d", community.label, core.step)
    if communities.active:
        communities.learner.set_correction(0, communities.corrections.correction)


def _restored(
    communities: Communities, community: Community, state: dict[str, Any]
) -> tuple[NodeCore, dict[str, int]]:
    """A new core and counters for ``community`` loaded from ``state``; raise ValueError
    (or KeyError, TypeError) if it does not fit."""
    if not isinstance(state, dict):
        raise TypeError(f"expected a table, found {type(state).__name__}")
    if bytes(state["schema"]) != community.part.schema.digest():
        raise ValueError("it was saved for another shared schema")
    core = communities.new_core(community.membership, community.part)
    core.load_state_dict(state["core"])
    like = core.model.read()
    for name, value in core.state_dict().items():
        if isinstance(value, torch.Tensor) and (
            value.shape != like.shape or value.dtype != like.dtype
        ):
            raise ValueError(
                f"its {name} is {value.dtype} {list(value.shape)}, the shared part is "
                f"{like.dtype} {list(like.shape)}"
            )
    counters = {name: int(state["counters"][name]) for name in community.counters}
    return core, counters
