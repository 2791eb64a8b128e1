"""Is a run robust to rounding? The same scenario with one node's starting model perturbed by a
relative ``scale`` (default 1e-7, float32 rounding), printed beside what a defence refused.

    .venv/bin/python sim/perturbed_start.py sim/pareto-dirichlet01.toml --steps 3000 --seed 1

An honest network should end within its seeds' spread and refuse ~no average either way
(docs/byzantine.md, "Honest networks refuse no average").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from p2pfl.cli.exits import run_script
from p2pfl.simulator.engine import Simulation, prepare
from p2pfl.simulator.scenario import load_scenario

REPORTED = ("final_accuracy", "average_model_accuracy", "syncs", "refused_peer", "clipped")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", type=Path)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--protocol", default="dynamic")
    parser.add_argument("--node", type=int, default=0, help="whose starting model is perturbed")
    parser.add_argument("--scale", type=float, default=1e-7, help="relative perturbation")
    args = parser.parse_args()
    scenario = load_scenario(args.scenario, {"steps": args.steps, "seed": args.seed})
    for scale in (0.0, args.scale):
        sim = Simulation(prepare(scenario), args.protocol)
        start = sim.learner.get(args.node).clone()
        noise = torch.randn(start.shape, generator=torch.Generator().manual_seed(0))
        sim.learner.set(args.node, start * (1 + scale * noise))
        summary = sim.run(lambda _t: None)
        print(json.dumps({"scale": scale} | {k: summary.get(k) for k in REPORTED}))


if __name__ == "__main__":
    run_script(main)
