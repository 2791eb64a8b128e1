"""How the simulator scales with the number of nodes: the batched learner against the
per-node reference learner, and one long end-to-end run with a breakdown of where time goes.

Part 1, for each size (MLP on digits, iid, protocol ``dynamic``): node-steps per second of
both learners, each configuration in a fresh subprocess (so that its peak memory, from
``ru_maxrss``, is its own). ``train`` counts only the time inside ``learner.step``;
``end to end`` is the whole ``Simulation.run`` (protocol, messages, evaluation included). The
per-node learner runs fewer steps at large sizes; its rates are per node-step, i.e. they
extrapolate linearly, and the table says how many steps each side ran.

Part 2: ``nodes x steps`` of ``dynamic`` end to end through ``Simulation.run`` (default
1,000 x 1,000, target under a minute), wall and CPU time (on a busy machine CPU time is
the better guide); with ``--breakdown`` a second, instrumented run splits the time over
learner, protocol cores, wire sizes, network model, evaluation and the engine loop itself.

Digits has 1,438 training samples. Sizes above that cannot be split; there, node ``i`` trains
on part ``i mod 1024`` of a 1,024-way split (the output says so).

Run from the repository root:
    .venv/bin/python sim/bench_scale.py           # 16, 256, 1,024, 4,096 nodes + 1,000 x 1,000
    .venv/bin/python sim/bench_scale.py --quick   # small sizes, under a minute
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from bench_setup import add_threads_option, prepared_scenario, set_threads

from p2pfl.simulator import engine
from p2pfl.simulator.engine import Prepared, Simulation
from p2pfl.spec import SpecError
from p2pfl.topology import build_topology

CYCLE_PARTS = 1024
E2E_TARGET_S = 60.0


def parse_args() -> argparse.Namespace:
    """Command-line options (``--child`` is internal: one measurement, JSON on stdout)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default="16,256,1024,4096", help="comma-separated node counts")
    p.add_argument("--steps", type=int, default=200, help="steps of the batched learner")
    p.add_argument(
        "--per-node-budget",
        type=int,
        default=20_000,
        help="node-steps of the per-node learner per size (steps = budget / nodes, at least "
        "3, at most --steps)",
    )
    p.add_argument("--protocol", default="dynamic")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--e2e", default="1000x1000", help="NODESxSTEPS of the end-to-end run")
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end run")
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="after the end-to-end run, repeat it with per-call timers and print where the "
        "time goes (the timers add about a microsecond per call)",
    )
    add_threads_option(p)
    p.add_argument("--quick", action="store_true", help="16, 64, 256 nodes x 50 steps; 200x100")
    p.add_argument("--child", choices=("scale", "e2e", "breakdown"), help=argparse.SUPPRESS)
    p.add_argument("--nodes", type=int, help=argparse.SUPPRESS)
    p.add_argument("--learner", default="batched", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.sizes, args.steps, args.e2e, args.per_node_budget = "16,64,256", 50, "200x100", 5000
    return args


# ------------------------------------------------------------------ child: one measurement


def prepared_for(nodes: int, steps: int, args: argparse.Namespace, learner: str) -> Prepared:
    """The scenario of one run; sizes beyond the data set cycle a 1,024-way split."""
    data = {"dataset": "digits", "model": "mlp", "partition": "iid", "batch_size": args.batch_size}
    try:
        return prepared_scenario(nodes, steps, args.protocol, learner, **data)
    except SpecError:
        base = prepared_scenario(CYCLE_PARTS, steps, args.protocol, learner, **data)
        s = dataclasses.replace(base.scenario, nodes=nodes)
        graph = build_topology(s.topology, nodes, s.seed, s.allow_disconnected)
        parts = [base.nodes[i % CYCLE_PARTS] for i in range(nodes)]
        return dataclasses.replace(base, scenario=s, nodes=parts, graph=graph)


def peak_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Timers:
    """Wall time and call counts per category, from wrappers around functions."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` with its time and calls added to ``name``."""
        clock, seconds, calls = time.perf_counter, self.seconds, self.calls

        def timed(*a: Any, **kw: Any) -> Any:
            start = clock()
            try:
                return fn(*a, **kw)
            finally:
                seconds[name] += clock() - start
                calls[name] += 1

        return timed


def instrument(sim: Simulation, timers: Timers, breakdown: bool) -> None:
    """Time the learner's steps; with ``breakdown`` also every core's event handlers, the
    codec and the network model."""
    learner = sim.learner
    learner.step = timers.wrap("learner.step (training)", learner.step)  # type: ignore[method-assign]
    if not breakdown:
        return
    for name in ("set", "set_correction"):
        setattr(learner, name, timers.wrap("learner.set/set_correction", getattr(learner, name)))
    sim.net.transmit = timers.wrap("network.transmit", sim.net.transmit)  # type: ignore[method-assign]
    sim._measure = timers.wrap("evaluation", sim._measure)  # type: ignore[method-assign]
    for core in sim.cores:
        core.on_local_step = timers.wrap("core.on_local_step", core.on_local_step)  # type: ignore[method-assign]
        core.on_message = timers.wrap("core.on_message", core.on_message)  # type: ignore[method-assign]
        core.on_timer = timers.wrap("core.on_timer", core.on_timer)  # type: ignore[method-assign]
    encoded_size = engine.encoded_size

    def timed_encoded_size(message: Any, schema: Any) -> int:
        start = time.perf_counter()
        size = encoded_size(message, schema)
        kind = type(message).__name__
        timers.seconds[f"wire.encoded_size {kind}"] += time.perf_counter() - start
        timers.calls[f"wire.encoded_size {kind}"] += 1
        return size

    engine.encoded_size = timed_encoded_size  # type: ignore[assignment]


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One configuration; returns its measurements."""
    steps = args.steps
    before = peak_mb()
    prepared = prepared_for(args.nodes, steps, args, args.learner)
    after_data = peak_mb()
    sim = Simulation(prepared, args.protocol)
    timers = Timers()
    instrument(sim, timers, breakdown=args.child == "breakdown")
    started, cpu_started = time.perf_counter(), time.process_time()
    summary = sim.run()
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return {
        "nodes": args.nodes,
        "learner": args.learner,
        "steps": steps,
        "node_steps": summary["node_steps"],
        "wall": wall,
        "cpu": cpu,
        "load": os.getloadavg()[0],
        "train": timers.seconds["learner.step (training)"],
        "peak_mb": peak_mb(),
        "sim_mb": peak_mb() - after_data,
        "base_mb": before,
        "messages": summary["messages"],
        "syncs": summary["syncs"],
        "accuracy": summary["final_accuracy"],
        "seconds": dict(timers.seconds),
        "calls": dict(timers.calls),
    }


# ------------------------------------------------------------------ parent: tables


def spawn(args: argparse.Namespace, kind: str, nodes: int, steps: int, learner: str) -> dict:
    """Run one configuration in a fresh interpreter and parse its JSON line."""
    cmd = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--nodes",
        str(nodes),
        "--steps",
        str(steps),
        "--learner",
        learner,
        "--protocol",
        args.protocol,
        "--batch-size",
        str(args.batch_size),
        "--threads",
        str(args.threads),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def scale_table(args: argparse.Namespace) -> None:
    """Part 1: batched against per-node at each size."""
    sizes = [int(s) for s in args.sizes.split(",")]
    print(
        f"\n== scale: mlp on digits (iid), protocol {args.protocol}, batch {args.batch_size}, "
        f"{args.steps} steps batched, per-node steps = {args.per_node_budget} / nodes "
        f"(3..{args.steps}), {args.threads or torch.get_num_threads()} thread(s)"
    )
    head = (
        f"{'nodes':>6} {'learner':>9} {'steps':>6} {'train node-steps/s':>19} {'us':>7} "
        f"{'end-to-end node-steps/s':>24} {'msgs/node-step':>15} {'peak MB':>8} {'+sim MB':>8}"
    )
    print(head)
    notes = []
    for n in sizes:
        pn_steps = max(3, min(args.steps, args.per_node_budget // n))
        rows = {
            "batched": spawn(args, "scale", n, args.steps, "batched"),
            "per-node": spawn(args, "scale", n, pn_steps, "per-node"),
        }
        for name, r in rows.items():
            rate = r["node_steps"] / r["train"]
            print(
                f"{n:>6} {name:>9} {r['steps']:>6} {rate:>19,.0f} {1e6 / rate:>7.1f} "
                f"{r['node_steps'] / r['wall']:>24,.0f} {r['messages'] / r['node_steps']:>15.2f} "
                f"{r['peak_mb']:>8.0f} {r['sim_mb']:>8.0f}"
            )
        b, p = rows["batched"], rows["per-node"]
        train_ratio = (b["node_steps"] / b["train"]) / (p["node_steps"] / p["train"])
        e2e_ratio = (b["node_steps"] / b["wall"]) / (p["node_steps"] / p["wall"])
        print(
            f"{n:>6} {'ratio':>9} {'':>6} {train_ratio:>18.1f}x {'':>7} {e2e_ratio:>23.1f}x "
            f"(batched / per-node; per-node ran {pn_steps} steps, rates extrapolate per node-step)"
        )
        if n > 1438:
            notes.append(n)
    print(
        "train = time inside learner.step (us = per node-step); end-to-end = Simulation.run.\n"
        "peak MB = ru_maxrss of the configuration's own process; +sim MB = growth of that peak "
        "after imports and data (learner, cores, messages in flight, evaluation)"
    )
    for n in notes:
        print(f"note: {n} nodes > 1,438 digits samples: node i trains on part i mod 1024")


def e2e_table(args: argparse.Namespace) -> None:
    """Part 2: one long end-to-end run with its time breakdown."""
    nodes, steps = (int(v) for v in args.e2e.lower().split("x"))
    print(f"\n== end to end: {nodes} nodes x {steps} steps of {args.protocol}, batched learner")
    r = spawn(args, "e2e", nodes, steps, "batched")
    wall = r["wall"]
    verdict = "ok" if wall < E2E_TARGET_S else "ABOVE TARGET"
    print(
        f"Simulation.run: {wall:.1f} s wall (target < {E2E_TARGET_S:.0f} s: {verdict}), "
        f"{r['cpu']:.1f} s CPU, load average {r['load']:.1f} at the end; "
        f"{r['node_steps']:,} node-steps, {r['messages']:,} messages, {r['syncs']:,} syncs, "
        f"final accuracy {r['accuracy']:.3f}, peak {r['peak_mb']:.0f} MB"
    )
    if args.breakdown:
        breakdown_table(spawn(args, "breakdown", nodes, steps, "batched"))


def breakdown_table(r: dict[str, Any]) -> None:
    """Where the time of an instrumented end-to-end run goes."""
    wall, seconds, calls = r["wall"], r["seconds"], r["calls"]
    print(f"instrumented repeat: {wall:.1f} s wall")
    # Wrapped categories never nest, so what remains is the engine's own loop.
    rest = wall - sum(seconds.values())
    rows = sorted(seconds.items(), key=lambda kv: -kv[1]) + [("engine loop (the rest)", rest)]
    print(f"{'where':<34}{'seconds':>9}{'share':>8}{'calls':>11}{'us/call':>9}")
    for name, sec in rows:
        n = calls.get(name, 0)
        per = f"{sec / n * 1e6:9.1f}" if n else f"{'':>9}"
        print(f"{name:<34}{sec:>9.1f}{sec / wall:>8.0%}{n:>11,}{per}")


def main() -> None:
    """Parent: print the tables; child: measure one configuration."""
    args = parse_args()
    set_threads(args.threads)
    if args.child:
        print(json.dumps(child(args)))
        return
    print(f"bench_scale: torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    scale_table(args)
    if not args.no_e2e:
        e2e_table(args)


if __name__ == "__main__":
    main()
