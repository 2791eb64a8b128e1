"""The communities' part of the node checkpoint: each community's core state (step,
reference, drift correction, stats) and counters, by community id, with the digest of the
shared schema they belong to. A restarted node resumes every community it is still in where
it stopped (each restored core re-applies its drift correction to its part); state of a
community it left is ignored, state that does not fit starts that community afresh (with a
warning naming it).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from p2pfl.runtime import CoreRuntime

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
    """Resume the active communities from ``saved`` (by community id)."""
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
            runtime, counters = _restored(communities, community, state)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            log.warning(
                "community %s starts afresh at step 0: its saved state does not fit (%s)",
                community.label,
                exc,
            )
            continue
        community.runtime = communities.sync.active[community.id].runtime = runtime
        community.counters.update(counters)
        log.info("community %s resumed at step %d", community.label, community.core.step)


def _restored(
    communities: Communities, community: Community, state: dict[str, Any]
) -> tuple[CoreRuntime, dict[str, int]]:
    """A new core's runtime and the counters for ``community`` restored from ``state``; raise
    ValueError (or KeyError, TypeError) if it does not fit."""
    if not isinstance(state, dict):
        raise TypeError(f"expected a table, found {type(state).__name__}")
    if bytes(state["schema"]) != community.part.schema.digest():
        raise ValueError("it was saved for another shared schema")
    counters = {name: int(v) for name, v in state["counters"].items() if name in community.counters}
    runtime = communities.new_runtime(community.membership, community.part)
    runtime.restore(state["core"])
    return runtime, counters
