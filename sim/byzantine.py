"""Honest-node accuracy under attack: every attack × merge rule × share of attackers, next to
the attack-free run, on one scenario (default: digits, 16 nodes, Dirichlet 0.5, dynamic).

    .venv/bin/python sim/byzantine.py sim/pareto-dirichlet05.toml --steps 1500 \
        --out runs/byzantine

Writes ``byzantine.json`` and ``byzantine.md`` (the README table) into ``--out``. Accuracy is
the scenario's fair final accuracy (mean over prime-numbered steps in the last tenth) over
honest nodes only. "today" is the merge before issue 11 (plain mean, no clipping).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from p2pfl.protocol.byzantine import ATTACKS
from p2pfl.simulator.engine import Simulation, prepare
from p2pfl.simulator.scenario import load_scenario

RULES = {
    "today": "clip=0",
    "default": "",
    "trimmed": "merge=trimmed",
    "median": "merge=median",
    "multikrum": "merge=multikrum",
}
"""Rows: the merge before issue 11 (plain mean, no clipping), the default (mean of clipped
models), and robust rules over clipped models."""
SHARES = (1, 3, 5)


def spec(protocol: str, extra: str) -> str:
    if not extra:
        return protocol
    return f"{protocol}{',' if ':' in protocol else ':'}{extra}"


def run(scenario_path: Path, steps: int, protocol: str, byzantine: str, rule: str) -> float:
    scenario = load_scenario(scenario_path, {"steps": steps, "byzantine": byzantine})
    summary = Simulation(prepare(scenario), spec(protocol, rule)).run()
    return float(summary["honest_accuracy"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", type=Path)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--protocol", default="dynamic")
    parser.add_argument("--rules", default=",".join(RULES), help="comma-separated rule names")
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--out", type=Path, default=Path("runs/byzantine"))
    parser.add_argument(
        "--table-from", type=Path, nargs="*", help="only print the table of earlier runs' json"
    )
    args = parser.parse_args()
    if args.table_from:
        results = {}
        for path in args.table_from:
            results |= json.loads(path.read_text())
        print(table(results, args.attacks.split(",")))
        return
    rules = [r for r in RULES if r in args.rules.split(",")]
    attacks = args.attacks.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, float]] = {}
    for rule in rules:
        row = {"none": run(args.scenario, args.steps, args.protocol, "", RULES[rule])}
        print(f"{rule}: no attack {row['none']:.3f}", flush=True)
        for attack in attacks:
            for k in SHARES:
                acc = run(args.scenario, args.steps, args.protocol, f"{k}:{attack}", RULES[rule])
                row[f"{attack} {k}/16"] = acc  # the scenarios here have 16 nodes
                print(f"{rule}: {attack} {k}/16 {acc:.3f}", flush=True)
        results[rule] = row
        (args.out / "byzantine.json").write_text(json.dumps(results, indent=2))
    (args.out / "byzantine.md").write_text(table(results, attacks))
    print(table(results, attacks))


def table(results: dict[str, dict[str, float]], attacks: list[str]) -> str:
    """Markdown: one row per attack and share, one column per merge rule."""
    rules = list(results)
    lines = ["| attack | K/N | " + " | ".join(rules) + " |", "|---|---|" + "---|" * len(rules)]
    lines.append("| none | 0 | " + " | ".join(f"{results[r]['none']:.3f}" for r in rules) + " |")
    for attack in attacks:
        for k in SHARES:
            cells = [f"{results[r].get(f'{attack} {k}/16', float('nan')):.3f}" for r in rules]
            lines.append(f"| {attack} | {k}/16 | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
