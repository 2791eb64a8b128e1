"""Diagnose the drift corrections' zero sum under dynamic averaging on a stream
(docs/fair-comparison.md, "Long changing streams"): every 200 steps, the norm of the sum of
all nodes' corrections, their mean norm, the refused averages so far and what the
refusers' missing updates add back; at the end, why the averages were refused (distance
against the radius the member checks it at, the coordinator's trust and its progress
share, see ``p2pfl.protocol.trust``): beyond the radius, within it but beyond the
coordinator's trusted part of it, or within that but beyond its progress share.

    .venv/bin/python sim/session_corrections.py dynamic:rel=0.0002 1000 [scenario.toml]
    .venv/bin/python sim/session_corrections.py dynamic 3000 sim/pareto-dirichlet01.toml

It wraps ``DynamicCore._on_average`` to observe each refusal (the protocol is unchanged).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

from p2pfl.protocol.actions import Action
from p2pfl.protocol.correction import correction_gain
from p2pfl.protocol.dynamic import MERGED_RADIUS, DynamicCore
from p2pfl.simulator.engine import Simulation, prepare
from p2pfl.simulator.scenario import load_scenario
from p2pfl.wire.messages import Average

REPORT_EVERY = 200


def main(protocol: str, steps: int, scenario: Path) -> None:
    sim = Simulation(prepare(load_scenario(scenario, {"steps": steps})), protocol)
    refusals: list[tuple[float, float, float, float]] = []  # distance, radius, trust, share
    missed = torch.zeros(sim.schema.numel)  # what the refusers would have learnt
    on_average = DynamicCore._on_average

    def observed(core: DynamicCore, sender: str, msg: Average) -> list[Action]:
        m, before = core.membership, core.stats.refused_peer
        if m is not None:  # measured before the check records this average
            own, known = m.sent, core.progress.knows(sender)
            theirs, ours = core.progress.references(core.progress._last.get(sender))
            moved = float(torch.linalg.vector_norm(own - ours))
            progress = float(torch.linalg.vector_norm(msg.params - theirs))
            pooled = (core.config.cap or len(core.neighbors) + 1) if known else 1
            share = min(1.0, pooled * progress / moved) if moved > 0 else 1.0
            radius = core.clip_bound(own) * (MERGED_RADIUS if known else 1.0)
            seen = (float(torch.linalg.vector_norm(msg.params - own)), radius)
        actions = on_average(core, sender, msg)
        if core.stats.refused_peer == before or m is None:
            return actions
        refusals.append((*seen, core.trust[sender], share))
        lam = core.drift_correction.lam
        if lam and msg.steps > 0:
            scale = correction_gain(lam, msg.steps, core.config.pace) / (
                core.mean_step_size(msg.steps) * msg.steps
            )
            missed.add_((own - msg.params) * scale)
        return actions

    DynamicCore._on_average = observed  # type: ignore[method-assign]

    def report(t: int) -> None:
        vectors = [c.drift_correction.vector for c in sim.cores]
        vectors = [v for v in vectors if v is not None]
        if t % REPORT_EVERY or not vectors:
            return
        total = torch.stack(vectors).sum(0)
        mean_norm = sum(float(v.norm()) for v in vectors) / len(vectors)
        print(
            f"step {t}: |sum of corrections| {float(total.norm()):.4g}, mean |correction| "
            f"{mean_norm:.4g}, refused averages {len(refusals)}, |sum + refusers' missed "
            f"updates| {float((total + missed).norm()):.4g}",
            flush=True,
        )

    summary = sim.run(report)
    print(f"prequential {summary['prequential_accuracy']:.4f}, syncs {summary['syncs']}")
    if refusals:
        beyond = sum(d > r for d, r, _, _ in refusals)
        untrusted = sum(r * t < d <= r for d, r, t, _ in refusals)
        print(
            f"refused averages: {len(refusals)}; median distance/radius "
            f"{statistics.median(d / r for d, r, _, _ in refusals):.3f}; at full trust "
            f"{sum(t == 1.0 for _, _, t, _ in refusals)}; median progress share "
            f"{statistics.median(s for *_, s in refusals):.3f}; beyond the radius {beyond}, "
            f"beyond its trusted part {untrusted}, beyond its progress share "
            f"{len(refusals) - beyond - untrusted}"
        )


if __name__ == "__main__":
    args = sys.argv[1:]
    if len(args) not in (2, 3):
        sys.exit(__doc__)
    main(args[0], int(args[1]), Path(args[2] if len(args) == 3 else "sim/stream-fresh.toml"))
