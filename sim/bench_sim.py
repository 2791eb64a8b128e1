"""Overhead of the simulator: ``Simulation.run`` (protocol ``none``) against a plain torch loop
training the same number of separate models for the same number of steps, in one process.

The plain loop is what one would write by hand: one ``nn.Module`` and one
``torch.optim.SGD`` per model, a fresh mini-batch drawn with replacement from the model's own
data each step. The simulator runs the same models on the same data split twice: with the
batched learner (its fast path) and with the per-node learner, whose ratio shows what the
simulator itself adds on top of per-model training. Repeats are interleaved; the table shows
medians, and each ratio is the median of the ratios measured within one repeat.

Run from the repository root:
    .venv/bin/python sim/bench_sim.py            # 16 nodes x 1000 steps, mlp on digits
    .venv/bin/python sim/bench_sim.py --quick    # a few seconds
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time
from collections.abc import Callable

import torch
from bench_setup import add_threads_option, prepared_scenario, set_threads
from torch import nn

from p2pfl.simulator.engine import Prepared, Simulation

TARGET_RATIO = 1.3


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--nodes", type=int, default=16)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--model", default="mlp")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--repeats", type=int, default=3)
    add_threads_option(p)
    p.add_argument("--quick", action="store_true", help="8 nodes x 200 steps, 2 repeats")
    args = p.parse_args()
    if args.quick:
        args.nodes, args.steps, args.repeats = 8, 200, 2
    return args


def plain_loop(prepared: Prepared, steps: int, batch_size: int, lr: float, seed: int) -> float:
    """Train one model per node by hand for ``steps`` steps; return the wall seconds."""
    models = [copy.deepcopy(prepared.model) for _ in prepared.nodes]
    opts = [torch.optim.SGD(m.parameters(), lr=lr) for m in models]
    data = [(d.x_train, d.y_train) for d in prepared.nodes]
    gen = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    for _ in range(steps):
        for model, opt, (x, y) in zip(models, opts, data, strict=True):
            idx = torch.randint(len(y), (batch_size,), generator=gen)
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return time.perf_counter() - started


def simulated(prepared: Prepared, learner: str) -> Callable[[], float]:
    """A function that builds a fresh simulation (untimed) and times its ``run``."""
    scenario = prepared.scenario
    variant = dataclasses.replace(scenario, learner=learner)

    def run() -> float:
        sim = Simulation(dataclasses.replace(prepared, scenario=variant), "none")
        started = time.perf_counter()
        summary = sim.run()
        wall = time.perf_counter() - started
        expected = scenario.nodes * scenario.steps
        if summary["node_steps"] != expected:
            raise RuntimeError(f"{learner}: {summary['node_steps']} node-steps, not {expected}")
        return wall

    return run


def main() -> None:
    """Measure and print the table."""
    args = parse_args()
    set_threads(args.threads)
    prepared = prepared_scenario(
        args.nodes,
        args.steps,
        "none",
        "batched",
        batch_size=args.batch_size,
        model=args.model,
        dataset=args.dataset,
    )
    s = prepared.scenario
    runs: dict[str, Callable[[], float]] = {
        "plain torch loop": lambda: plain_loop(prepared, s.steps, s.batch_size, s.lr, s.seed),
        "sim, batched learner": simulated(prepared, "batched"),
        "sim, per-node learner": simulated(prepared, "per-node"),
    }
    print(
        f"bench_sim: {s.nodes} nodes x {s.steps} steps, {s.model} on {s.dataset}, batch "
        f"{s.batch_size}, protocol none, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), {args.repeats} repeats (interleaved)"
    )
    plain_loop(prepared, 5, s.batch_size, s.lr, s.seed)  # warm-up, not measured
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            times[name].append(fn())
    base = times["plain torch loop"]
    node_steps = s.nodes * s.steps
    print(f"\n{'run':<24}{'seconds':>10}{'us/node-step':>15}{'ratio to plain':>17}")
    for name, ts in times.items():
        ratio = statistics.median(t / b for t, b in zip(ts, base, strict=True))
        wall = statistics.median(ts)
        print(f"{name:<24}{wall:>10.2f}{wall / node_steps * 1e6:>15.1f}{ratio:>17.2f}")
    batched = statistics.median(
        t / b for t, b in zip(times["sim, batched learner"], base, strict=True)
    )
    verdict = "ok" if batched <= TARGET_RATIO else "ABOVE TARGET"
    print(f"\nsim/plain, batched learner: {batched:.2f} (target <= {TARGET_RATIO}: {verdict})")
    print("the per-node ratio is the simulator's own overhead on top of per-model training")


if __name__ == "__main__":
    main()
