"""The accuracy-vs-bytes frontier: periodic averaging at every period b against dynamic
averaging over a range of Δ, on identical data, initial model and seed.

    .venv/bin/python sim/pareto.py sim/pareto-dirichlet05.toml --out runs/pareto-dirichlet05

Writes ``pareto.json`` and ``pareto.png`` (frontier, and traffic over time) into ``--out``
and prints, for target accuracies (95 % and 99 % of ``continuous``), the fewest bytes each
family needed and the ratio best-periodic / dynamic. Accuracy is measured fairly: the mean
of evaluations at prime-numbered steps in the last tenth of the run (no period divides them).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from p2pfl.simulator.engine import Simulation, prepare  # noqa: E402
from p2pfl.simulator.scenario import load_scenario  # noqa: E402

PERIODS = (1, 2, 5, 10, 20, 50, 100, 200)
RELS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02)


def family(protocol: str) -> str:
    return "dynamic" if protocol.startswith("dynamic") else "periodic"


def cheapest(runs: list[dict[str, Any]], fam: str, target: float) -> dict[str, Any] | None:
    """The run of ``fam`` that reaches ``target`` accuracy with the fewest bytes."""
    ok = [r for r in runs if family(r["protocol"]) == fam and r["final_accuracy"] >= target]
    return min(ok, key=lambda r: r["bytes_sent"], default=None)


def frontier_table(runs: list[dict[str, Any]], reference: float) -> list[dict[str, Any]]:
    """For 95 % and 99 % of the reference accuracy: bytes of the cheapest run per family."""
    rows = []
    for share in (0.95, 0.99):
        target = share * reference
        per, dyn = cheapest(runs, "periodic", target), cheapest(runs, "dynamic", target)
        rows.append(
            {
                "target": f"{share:.0%} of continuous ({target:.3f})",
                "periodic": per and (per["protocol"], per["bytes_sent"]),
                "dynamic": dyn and (dyn["protocol"], dyn["bytes_sent"]),
                "ratio": per["bytes_sent"] / dyn["bytes_sent"] if per and dyn else None,
                "tail_ratio": (
                    per["bytes_last_20pct"] / max(dyn["bytes_last_20pct"], 1)
                    if per and dyn
                    else None
                ),
            }
        )
    return rows


def draw(
    runs: list[dict[str, Any]], metrics: dict[str, list[dict]], path: Path, title: str
) -> None:
    fig, (ax, ax_t) = plt.subplots(1, 2, figsize=(13, 4.8))
    for fam, style in (("periodic", "o-"), ("dynamic", "s-")):
        pts = sorted(
            (r["bytes_sent"] / 1e6, r["final_accuracy"], r["protocol"])
            for r in runs
            if family(r["protocol"]) == fam and r["bytes_sent"] > 0
        )
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=fam)
        for x, y, name in pts:
            ax.annotate(name.split(":", 1)[-1], (x, y), fontsize=6, alpha=0.7)
    for r in runs:
        if r["bytes_sent"] == 0:
            ax.axhline(r["final_accuracy"], ls=":", c="gray", label=f"{r['protocol']} (0 bytes)")
    ax.set(xscale="log", xlabel="MB sent (log)", ylabel="final accuracy", title="frontier")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    for name, rows in metrics.items():
        rate = [
            (b["bytes"] - a["bytes"]) / 1e6 / max(b["step"] - a["step"], 1)
            for a, b in zip(rows, rows[1:], strict=False)
        ]
        ax_t.plot([r["step"] for r in rows[1:]], rate, label=name)
    ax_t.set(yscale="log", xlabel="step", ylabel="MB per step (log)", title="traffic over time")
    ax_t.grid(alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", type=Path)
    parser.add_argument("--out", type=Path, default=Path("runs/pareto"))
    parser.add_argument("--periods", default=",".join(map(str, PERIODS)))
    parser.add_argument("--rels", default=",".join(map(str, RELS)))
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    protocols = [f"periodic:b={b}" for b in args.periods.split(",")]
    protocols += ["dynamic"] + [f"dynamic:rel={r}" for r in args.rels.split(",")]
    protocols += ["none"]
    scenario = load_scenario(args.scenario, {"protocols": tuple(protocols), "steps": args.steps})
    prepared = prepare(scenario)
    runs, metrics = [], {}
    for protocol in scenario.protocols:
        result = Simulation(prepared, protocol).run()
        rows = result.pop("metrics")
        runs.append(result)
        print(
            f"{protocol:28s} acc {result['final_accuracy']:.3f}  "
            f"{result['bytes_sent'] / 1e6:9.1f} MB  last 20%: "
            f"{result['bytes_last_20pct'] / 1e6:8.1f} MB",
            flush=True,
        )
        if protocol in ("periodic:b=1", "periodic:b=10", "dynamic"):
            metrics[
                protocol.replace("periodic:b=1", "continuous", 1)
                if protocol.endswith("=1")
                else protocol
            ] = rows
    reference = next(r["final_accuracy"] for r in runs if r["protocol"] == "periodic:b=1")
    table = frontier_table(runs, reference)
    print(f"\ncontinuous (periodic:b=1) accuracy: {reference:.3f}")
    for row in table:
        print(
            f"{row['target']}: periodic {row['periodic']}, dynamic {row['dynamic']}, "
            f"best-periodic/dynamic bytes = {row['ratio'] and round(row['ratio'], 1)}, "
            f"last-20% traffic ratio = {row['tail_ratio'] and round(row['tail_ratio'], 1)}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"scenario": scenario.to_dict(), "runs": runs, "frontier": table}
    (args.out / "pareto.json").write_text(json.dumps(summary, indent=2) + "\n")
    draw(runs, metrics, args.out / "pareto.png", f"{scenario.dataset} · {scenario.partition}")
    print(f"wrote {args.out}/pareto.json and pareto.png")


if __name__ == "__main__":
    main()
