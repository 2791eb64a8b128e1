"""The Edgify post's comparison on our runs: large batch (``continuous``) vs federated
averaging (``periodic:b=B``, plain FedAvg: no drift correction) vs ``dynamic``, under IID and
Dirichlet(0.1) label skew.

    .venv/bin/python sim/large_batch_vs_federated.py --out runs/large-batch

For every run: final accuracy, messages, bytes, and the steps, communication rounds (merges
per node) and bytes until the mean accuracy first reached each target. Prints one table per
partition and seed (``--seeds``) and writes ``large_batch_vs_federated.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from p2pfl.protocol.config import parse_protocol
from p2pfl.simulator.engine import Simulation, prepare
from p2pfl.simulator.scenario import load_scenario
from p2pfl.spec import SpecError

SCENARIO = Path(__file__).with_name("large_batch_vs_federated.toml")
PARTITIONS = ("iid", "dirichlet:alpha=0.1")
PROTOCOLS = ("continuous", "periodic:b=5", "periodic:b=20", "periodic:b=100", "dynamic")
PLAIN = "correction=0"
"""Large batch and FedAvg as the post ran them: no drift correction (where protocols have one)."""
TARGETS = (0.90, 0.95)


def plain(protocol: str) -> str:
    """``protocol`` without drift correction: ``dynamic`` as it is (its default), the others
    with ``correction=0`` when they take the key."""
    if protocol.startswith("dynamic"):
        return protocol
    candidate = f"{protocol}{',' if ':' in protocol else ':'}{PLAIN}"
    try:
        parse_protocol(candidate)
    except SpecError:
        return protocol
    return candidate


def first_reaching(metrics: list[dict[str, Any]], target: float, nodes: int) -> dict[str, Any]:
    """Step, rounds per node, messages and bytes at the first evaluation at ``target``."""
    for row in metrics:
        if row["accuracy"] >= target:
            return {
                "step": row["step"],
                "rounds": row["syncs"] / nodes,
                "messages": row["messages"],
                "bytes": row["bytes"],
            }
    return {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/large-batch"))
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--protocols", default=";".join(PROTOCOLS), help="';'-separated")
    parser.add_argument("--seeds", default="", help="comma list (default: the scenario's)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one thread per run: on a shared machine more only wait
    results: dict[str, list[dict[str, Any]]] = {}
    seeds = [int(s) for s in args.seeds.split(",") if s] or [load_scenario(SCENARIO, {}).seed]
    for partition, seed in ((p, s) for p in PARTITIONS for s in seeds):
        overrides: dict[str, Any] = {"partition": partition, "seed": seed}
        if args.steps is not None:
            overrides["steps"] = args.steps
        scenario = load_scenario(SCENARIO, overrides)
        prepared = prepare(scenario)
        rows = []
        for protocol in map(plain, args.protocols.split(";")):
            s = Simulation(prepared, protocol).run()
            rows.append(
                {
                    "protocol": protocol,
                    "accuracy": s["final_accuracy"],
                    "messages": s["messages"],
                    "bytes": s["bytes_sent"],
                    "rounds": s["syncs"] / scenario.nodes,
                    "reach": {
                        str(t): first_reaching(s["metrics"], t, scenario.nodes) for t in TARGETS
                    },
                }
            )
            print(f"{partition} seed {seed} {protocol}: {s['final_accuracy']:.3f}", flush=True)
        results[f"{partition} seed {seed}"] = rows
        print(f"\n{partition}, seed {seed}")
        head = " | ".join(f"to {t}: steps / rounds / MB" for t in TARGETS)
        print(f"| protocol | accuracy | messages | MB | rounds per node | {head} |")
        print("|---|---|---|---|---|" + "---|" * len(TARGETS))
        for row in rows:
            cells = []
            for t in TARGETS:
                r = row["reach"][str(t)]
                cells.append(
                    f"{r['step']:,} / {r['rounds']:,.0f} / {r['bytes'] / 1e6:,.1f}"
                    if r
                    else "never"
                )
            print(
                f"| {row['protocol']} | {row['accuracy']:.3f} | {row['messages']:,} | "
                f"{row['bytes'] / 1e6:,.1f} | {row['rounds']:,.0f} | " + " | ".join(cells) + " |"
            )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "large_batch_vs_federated.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
