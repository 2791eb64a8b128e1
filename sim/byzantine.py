"""Honest-node accuracy under attack: every attack × merge rule × share of attackers, next to
the attack-free run, on one scenario (default: digits, 16 nodes, Dirichlet 0.5, dynamic).

    .venv/bin/python sim/byzantine.py sim/pareto-dirichlet05.toml --steps 400 \
        --rules default,today,trimmed --out runs/byzantine

Writes ``byzantine.json`` (after every run, so an interrupted table keeps what it measured)
and ``byzantine.md`` (the table of docs/byzantine.md, with the default's cost on an honest
network) into
``--out``; ``--table-from`` prints the table of earlier runs' json. Accuracy is the
scenario's fair final accuracy (mean over prime-numbered steps in the last tenth) over
honest nodes only. "today" is the merge before issue 11 (plain mean, no clipping, no
trust).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from p2pfl.cli.exits import run_script
from p2pfl.protocol.byzantine import ATTACKS
from p2pfl.simulator.engine import Simulation, prepare
from p2pfl.simulator.scenario import load_scenario

RULES = {
    "default": "",
    "today": "clip=0",
    "trimmed": "merge=trimmed",
    "median": "merge=median",
    "multikrum": "merge=multikrum",
}
"""Columns: the default (mean of clipped models, per-peer trust), the merge before issue 11
(plain mean, no clipping), and robust rules over clipped models."""
SHARES = (1, 3, 5)
AIM_SHARE, AIM = 3, 3.0
"""Issue 11's aim: with at most ``AIM_SHARE`` of 16 attackers, any attack costs honest nodes at
most ``AIM`` points of accuracy."""


def cost_of(row: dict[str, float], key: str) -> float:
    """Points of honest-node accuracy the run ``key`` lost against the attack-free run of
    the same row (nan if either was not measured)."""
    if key not in row or "none" not in row:
        return math.nan
    return 100 * (row["none"] - row[key])


def spec(protocol: str, extra: str) -> str:
    if not extra:
        return protocol
    return f"{protocol}{',' if ':' in protocol else ':'}{extra}"


def run(
    scenario_path: Path, steps: int, protocol: str, byzantine: str, rule: str, seed: int | None
) -> float:
    """Honest-node accuracy of one run (``seed``: the scenario's own if None)."""
    overrides: dict[str, object] = {"steps": steps, "byzantine": byzantine}
    if seed is not None:
        overrides["seed"] = seed
    scenario = load_scenario(scenario_path, overrides)
    summary = Simulation(prepare(scenario), spec(protocol, rule)).run()
    return float(summary["honest_accuracy"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", type=Path)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--protocol", default="dynamic")
    parser.add_argument("--rules", default=",".join(RULES), help="comma-separated rule names")
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument(
        "--shares", default="0,1,3,5", help="attackers out of 16 (0: the attack-free run)"
    )
    parser.add_argument("--seed", type=int, default=None, help="override the scenario's seed")
    parser.add_argument("--out", type=Path, default=Path("runs/byzantine"))
    parser.add_argument(
        "--table-from", type=Path, nargs="*", help="only print the table of earlier runs' json"
    )
    args = parser.parse_args()
    if args.table_from:
        results = {}
        for path in args.table_from:
            for rule, row in json.loads(path.read_text()).items():
                results.setdefault(rule, {}).update(row)
        print(table(results, args.attacks.split(",")))
        return
    rules = [r for r in RULES if r in args.rules.split(",")]
    attacks = args.attacks.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, float]] = {}
    for rule in rules:
        row = results.setdefault(rule, {})
        shares = [int(k) for k in args.shares.split(",")]
        runs = [("none", 0)] if 0 in shares else []
        for attack, k in runs + [(a, k) for a in attacks for k in shares if k]:
            byzantine = f"{k}:{attack}" if k else ""
            key = f"{attack} {k}/16" if k else "none"  # the scenarios here have 16 nodes
            row[key] = run(
                args.scenario, args.steps, args.protocol, byzantine, RULES[rule], args.seed
            )
            print(f"{rule}: {key} {row[key]:.3f}", flush=True)
            (args.out / "byzantine.json").write_text(json.dumps(results, indent=2))
    (args.out / "byzantine.md").write_text(table(results, attacks))
    print(table(results, attacks))


def table(results: dict[str, dict[str, float]], attacks: list[str]) -> str:
    """Markdown: one row per attack and share, one column per merge rule; each attacked
    cell also gives its cost in points against the rule's attack-free run (when measured),
    and a last line the largest cost at K/N ≤ 3/16 per rule (the aim: at most ``AIM``)."""
    rules = list(results)
    lines = ["| attack | K/N | " + " | ".join(rules) + " |", "|---|---|" + "---|" * len(rules)]
    none = [f"{results[r].get('none', float('nan')):.3f}" for r in rules]
    lines.append("| none | 0 | " + " | ".join(none) + " |")
    worst: dict[str, float] = {}
    for attack in attacks:
        for k in SHARES:
            key = f"{attack} {k}/16"
            if all(key not in results[r] for r in rules):
                continue
            cells = []
            for r in rules:
                acc, cost = results[r].get(key, math.nan), cost_of(results[r], key)
                cells.append(f"{acc:.3f}" + ("" if math.isnan(cost) else f" ({-cost:+.1f})"))
                if k <= AIM_SHARE and not math.isnan(cost):
                    worst[r] = max(worst.get(r, -math.inf), cost)
            lines.append(f"| {attack} | {k}/16 | " + " | ".join(cells) + " |")
    if worst:
        costs = ", ".join(f"{r} {c:.1f}" for r, c in worst.items())
        lines.append(f"\nLargest cost at K/N ≤ {AIM_SHARE}/16 (points; aim ≤ {AIM:g}): {costs}.")
    if {"today", "default"} <= set(rules) and "none" in results["today"]:
        cost = results["today"]["none"] - results["default"]["none"]
        lines.append(f"\nCost of the default on an honest network: {100 * cost:+.1f} points.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_script(main)
