"""The default defence on the fixed schedules (periodic, gossip, continuous), end to end in
small simulations: a sign-flipping neighbour is held, and an honest run is never judged (no
honest peer's trust lowered, so the merges and the drift correction stay those of the
undefended network)."""

from __future__ import annotations

import pytest
from kit import small_digits_run

from p2pfl.protocol.trust import PeerTrust
from p2pfl.simulator.engine import Simulation

FIXED = ("periodic:b=5", "gossip", "continuous")


def lowered(sim: Simulation) -> dict[str, dict[str, float]]:
    """Each honest core's peers whose trust is below 1, by node."""
    honest = sim.attackers.honest(len(sim.cores))
    tables: dict[str, dict[str, float]] = {}
    for node, core in enumerate(sim.cores):
        trust: PeerTrust = core.trust
        low = {peer: t for peer, t in trust._trust.items() if t < 1.0}
        if honest[node] and low:
            tables[core.node_id] = low
    return tables


@pytest.mark.parametrize("protocol", FIXED)
def test_a_sign_flipping_neighbour_cannot_steer_a_fixed_schedule(protocol):
    """One sign-flipper of 8: the honest nodes stay within 8 points of the attack-free run
    (measured 5 on each schedule: the liar's eighth of the data is lost to them either way;
    with trust judged only where the protocol bounds honest peers, as before, they fell to
    0.10-0.19); the liar, and only the liar, lost its trust."""
    honest = small_digits_run(protocol)
    attacked = small_digits_run(protocol, "1:signflip")
    (liar,) = [str(node) for node in sorted(attacked.attackers.nodes)]
    assert attacked.summary["honest_accuracy"] >= (honest.summary["honest_accuracy"] - 0.08)
    assert attacked.summary["distrusted"] > 0 and honest.summary["distrusted"] == 0
    judged = lowered(attacked)
    assert judged and all(set(low) == {liar} for low in judged.values()), judged
    assert all(t < 1e-3 for low in judged.values() for t in low.values()), judged


@pytest.mark.parametrize("protocol", ("continuous", "gossip"))
def test_an_honest_network_on_a_fixed_schedule_is_never_judged(protocol):
    """Merging every step under strong label skew, an honest peer sometimes lies beyond τ
    (and is clipped), but never beyond its verdict radius: no trust is ever lowered, so no
    honest merge loses a peer's pull nor a lesson of the drift correction. Judged at τ
    (5 honest models here), neighbours were clipped apart and the correction learned the
    mismatch: continuous 0.966 → 0.439 over 3,000 steps on Dirichlet 0.5; gossip judged at
    2τ even when vouched for fell from 0.929 to 0.842 on Dirichlet 0.1."""
    sim = small_digits_run(protocol, steps=300, alpha=0.1)
    assert sim.summary["clipped"] > 0  # τ alone is not what holds
    assert sim.summary["distrusted"] == 0 and lowered(sim) == {}
