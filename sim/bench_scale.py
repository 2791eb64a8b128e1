"""How the simulator scales with the number of nodes, against a plain per-model torch loop.

Part 1, for each size (MLP on digits, iid, each ``--protocol``, default ``dynamic``), each
configuration in a fresh subprocess (so that its peak memory, from ``ru_maxrss``, is its
own): the plain loop one would write by hand (one ``nn.Module`` + ``torch.optim.SGD`` per
model, ``bench_sim.plain_loop``), then per protocol the simulator with the batched learner and
(unless ``--no-per-node-learner``) with the per-node learner. ``train`` counts only the time
inside ``learner.step``; ``end to end`` is start-up (data split, learner, 10,000 cores...) +
``Simulation.run`` (protocol, messages, evaluation included). The per-node learner and the
plain loop run fewer steps at large sizes; their rates are per node-step, i.e. they
extrapolate linearly, and the table says how many steps each ran. The ratio to the plain loop
is the figure of merit. Every line prints the load average when its configuration ended.

Part 2: ``nodes x steps`` end to end (default 1,000 x 1,000): the vectorised protocol path
and the per-node protocol path (every core called on every step) in one process, and the same
run sharded over ``--shards`` Ray workers (a local Ray cluster started for it, one torch
thread each; needs ``pip install 'p2pfl[ray]'``), with wall and CPU time (on a busy machine
CPU time is the better guide; for the sharded run, the workers' CPU time added up) and peak
memory. ``--large 10000x1000`` adds a larger sharded run. With ``--breakdown`` an
instrumented one-process run splits its CPU time over learner, protocol cores (their message
handlers by message type), wire sizes, network model, evaluation and the engine loop itself.

``--child e2e --nodes N --steps S --protocol P`` runs one configuration and prints its JSON
(CPU and wall of the run and of start-up, peak memory, messages, syncs, accuracy and
``summary_sha256``, which two code trees taking the same decisions share). With
``--count-ops`` it also counts the torch (aten) operations run while delivering messages and
while training, and the delivery's ops per message: a cost that, unlike time, does not depend
on the machine's load (the counting makes the run several times slower). With ``--held`` it
also lists the tensor memory the cores hold at the end of the run, per node, by the attribute
that holds it (``held_by_cores``: each storage counted once, where a core reaches it first
by the largest attribute).

``--against DIR --e2e NODESxSTEPS`` compares this tree with another source tree (a ``git
archive`` of main, say) instead of printing the tables: their end-to-end runs in turn,
``--repeats`` times, each run's CPU and summary hash, and the median CPU ratio of
neighbouring runs (on a shared machine the load moves CPU time by tens of percent between
runs far apart; neighbours share most of it).

Digits has 1,438 training samples. Sizes above that cannot be split; there, node ``i`` trains
on part ``i mod 1024`` of a 1,024-way split (the output says so).

Run from the repository root:
    .venv/bin/python sim/bench_scale.py           # 16, 256, 1,024, 4,096 nodes + 1,000 x 1,000
    .venv/bin/python sim/bench_scale.py --quick   # small sizes, a few minutes
    .venv/bin/python sim/bench_scale.py --against /tmp/main --e2e 1024x200   # against main
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from bench_setup import add_threads_option, prepared_scenario, set_threads
from bench_sim import plain_loop
from torch.utils._python_dispatch import TorchDispatchMode

from p2pfl.simulator import engine
from p2pfl.simulator.engine import Prepared, Simulation
from p2pfl.spec import SpecError
from p2pfl.topology import build_topology

CYCLE_PARTS = 1024
E2E_TARGET_S = 15.0
LARGE_TARGET_S = 180.0
PLAIN_TARGET = 0.1
SESSION_STATS = ("sessions", "violations", "syncs", "refused_busy", "refused_peer", "gave_way")


def parse_args() -> argparse.Namespace:
    """Command-line options (``--child`` is internal: one measurement, JSON on stdout)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default="16,256,1024,4096", help="comma-separated node counts")
    p.add_argument("--steps", type=int, default=200, help="steps of the batched learner")
    p.add_argument(
        "--per-node-budget",
        type=int,
        default=20_000,
        help="node-steps of the per-node learner and of the plain loop per size (steps = "
        "budget / nodes, at least 3, at most --steps)",
    )
    p.add_argument(
        "--protocol",
        action="append",
        dest="protocols",
        help="protocol spec; repeat it to measure several in part 1 against the same plain "
        "loop (part 2 runs the first). Default: dynamic",
    )
    p.add_argument(
        "--no-per-node-learner",
        action="store_true",
        help="skip the simulator with the per-node learner in part 1",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--model",
        default="mlp",
        help="model spec of every run (default mlp: 4,810 parameters); e.g. logistic (650) or "
        "mlp:hidden=256 (19,210) to see which costs grow with the model's size",
    )
    p.add_argument("--e2e", default="1000x1000", help="NODESxSTEPS of the end-to-end runs")
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end runs")
    p.add_argument("--no-scale", action="store_true", help="skip part 1 (the sizes)")
    p.add_argument(
        "--no-per-node-path",
        action="store_true",
        help="skip the per-node protocol path in part 2 (the slowest run)",
    )
    p.add_argument(
        "--shards", type=int, default=2, help="Ray workers of the sharded runs (0: none)"
    )
    p.add_argument(
        "--large", default="", help="NODESxSTEPS of a larger sharded run, e.g. 10000x1000"
    )
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="after the end-to-end runs, repeat the one-process run with per-call timers and "
        "print where its CPU time goes, the cores' message handlers by message type (the timers "
        "add about a microsecond per call)",
    )
    p.add_argument(
        "--against",
        metavar="DIR",
        help="instead of the tables: compare this tree with the source tree DIR (e.g. "
        "`git archive main | tar -x -C DIR`), --e2e NODESxSTEPS of --protocol from each in "
        "turn, --repeats times: each run's CPU, load and summary hash, and the median of the "
        "CPU ratios of neighbouring runs (they share the machine's load)",
    )
    p.add_argument("--repeats", type=int, default=3, help="runs of each tree with --against")
    add_threads_option(p)
    p.add_argument("--quick", action="store_true", help="16, 64, 256 nodes x 50 steps; 200x100")
    p.add_argument(
        "--child", choices=("scale", "plain", "e2e", "sharded", "breakdown"), help=argparse.SUPPRESS
    )
    p.add_argument("--nodes", type=int, help=argparse.SUPPRESS)
    p.add_argument("--learner", default="batched", help=argparse.SUPPRESS)
    p.add_argument("--per-node-protocol", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--count-ops", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--held", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.protocols = args.protocols or ["dynamic"]
    args.protocol = args.protocols[0]
    if args.quick:
        args.sizes, args.steps, args.e2e, args.per_node_budget = "16,64,256", 50, "200x100", 5000
    return args


# ------------------------------------------------------------------ child: one measurement


def prepared_for(nodes: int, steps: int, args: argparse.Namespace, learner: str) -> Prepared:
    """The scenario of one run; sizes beyond the data set cycle a 1,024-way split."""
    data = {
        "dataset": "digits",
        "model": args.model,
        "partition": "iid",
        "batch_size": args.batch_size,
    }
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
    """CPU time (this thread's, ``time.thread_time``) and call counts per category, from
    wrappers around functions: on a machine shared with other processes wall time charges
    their turns to whatever function was running."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` with its time and calls added to ``name``."""
        clock, seconds, calls = time.thread_time, self.seconds, self.calls

        def timed(*a: Any, **kw: Any) -> Any:
            start = clock()
            try:
                return fn(*a, **kw)
            finally:
                seconds[name] += clock() - start
                calls[name] += 1

        return timed

    def by_kind(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn(now, sender, message)`` with its time and calls added to ``name`` and the
        message's type (the handlers of a protocol differ by an order of magnitude)."""
        clock, seconds, calls = time.thread_time, self.seconds, self.calls

        def timed(now: float, sender: str, message: Any) -> Any:
            start = clock()
            try:
                return fn(now, sender, message)
            finally:
                kind = f"{name} {type(message).__name__}"
                seconds[kind] += clock() - start
                calls[kind] += 1

        return timed


def instrument(sim: Simulation, timers: Timers, breakdown: bool) -> None:
    """Time the learner's steps; with ``breakdown`` also every core's event handlers, the
    codec, the network model and the evaluation."""
    learner = sim.learner
    learner.step = timers.wrap("learner.step (training)", learner.step)  # type: ignore[method-assign]
    if not breakdown:
        return
    for name in ("set", "set_correction"):
        setattr(learner, name, timers.wrap("learner.set/set_correction", getattr(learner, name)))
    transmit = timers.wrap("network.transmit", sim.net.transmit)
    s = sim.prepared.scenario

    def counted_transmit(now: float, src: int, dst: int, size: int) -> float | None:
        fifth = min(4, round(now / s.network.step_time) * 5 // (s.steps + 1))
        timers.calls[f"messages in fifth {fifth + 1} of the run"] += 1
        return transmit(now, src, dst, size)

    sim.net.transmit = counted_transmit  # type: ignore[method-assign]
    sim.local_metrics = timers.wrap("evaluation", sim.local_metrics)  # type: ignore[method-assign]
    for stacked in sim.stacked:
        if stacked is not None:
            stacked.local_step = timers.wrap("vectorised local step", stacked.local_step)  # type: ignore[method-assign]
    for core in sim.cores:
        core.on_local_step = timers.wrap("core.on_local_step", core.on_local_step)  # type: ignore[method-assign]
        core.on_message = timers.by_kind("core.on_message", core.on_message)  # type: ignore[method-assign]
        core.on_timer = timers.wrap("core.on_timer", core.on_timer)  # type: ignore[method-assign]
    encoded_size = engine.encoded_size

    def timed_encoded_size(message: Any, schema: Any) -> int:
        start = time.thread_time()
        size = encoded_size(message, schema)
        kind = type(message).__name__
        timers.seconds[f"wire.encoded_size {kind}"] += time.thread_time() - start
        timers.calls[f"wire.encoded_size {kind}"] += 1
        return size

    engine.encoded_size = timed_encoded_size  # type: ignore[assignment]


class OpCounter(TorchDispatchMode):
    """Counts the aten operations a simulation runs, by phase: delivering messages (the
    protocol's cores handling them), training (the learner and the vectorised local step)."""

    def __init__(self, sim: Simulation) -> None:
        super().__init__()
        self.ops: dict[tuple[str, str], int] = defaultdict(int)
        self.phase = "other"
        for phase, name in (("deliver", "deliver"), ("train", "train")):
            setattr(sim, name, self._in_phase(phase, getattr(sim, name)))

    def _in_phase(self, phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*a: Any, **kw: Any) -> Any:
            self.phase = phase
            try:
                return fn(*a, **kw)
            finally:
                self.phase = "other"

        return counted

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops[self.phase, func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def report(self, messages: int) -> dict[str, Any]:
        """Ops per phase, the delivery's ops per message and its most frequent ops."""
        phases: dict[str, int] = defaultdict(int)
        for (phase, _), n in self.ops.items():
            phases[phase] += n
        delivery = sorted(((n, op) for (ph, op), n in self.ops.items() if ph == "deliver"))
        return {
            "ops": dict(phases),
            "ops_per_message": phases["deliver"] / max(1, messages),
            "delivery_ops": {op: n for n, op in reversed(delivery[-12:])},
        }


def _tensors(obj: Any, path: str, out: list[tuple[str, torch.Tensor]], seen: set[int]) -> None:
    """Every tensor reachable from ``obj`` through attributes and containers, with its path
    (``core.progress._last[][1]``: a tuple's fields by index); the model access and config
    are left out (shared)."""
    if isinstance(obj, torch.Tensor):
        out.append((path, obj))
        return
    if id(obj) in seen or isinstance(obj, str | int | float | bool | type) or obj is None:
        return
    seen.add(id(obj))
    if isinstance(obj, dict):
        items: Any = [(f"{path}[]", v) for v in obj.values()]
    elif isinstance(obj, tuple):  # a record: each field apart
        items = [(f"{path}[{i}]", v) for i, v in enumerate(obj)]
    elif isinstance(obj, list | set | frozenset):
        items = [(f"{path}[]", v) for v in obj]
    elif hasattr(obj, "__dict__") and not callable(obj):
        items = [(f"{path}.{k}", v) for k, v in vars(obj).items() if k not in HELD_SKIPPED]
    else:
        return
    for sub, value in items:
        _tensors(value, sub, out, seen)


HELD_SKIPPED = ("model", "config", "mean_step_size")


def held_by_cores(cores: list[Any], nodes: int) -> dict[str, float]:
    """KB per node of the tensor storage the cores hold, by the attribute path that holds it
    (a storage several paths share counts once, under the path holding most in all), and
    the total under ``"total"``."""
    sizes: dict[int, int] = {}
    paths: dict[str, set[int]] = defaultdict(set)
    for core in cores:
        found: list[tuple[str, torch.Tensor]] = []
        _tensors(core, "core", found, set())
        for path, tensor in found:
            storage = tensor.untyped_storage()
            sizes[storage.data_ptr()] = storage.nbytes()
            paths[path].add(storage.data_ptr())
    owner: dict[int, str] = {}
    for path in sorted(paths, key=lambda p: -sum(sizes[k] for k in paths[p])):
        for key in paths[path]:
            owner.setdefault(key, path)
    held: dict[str, float] = defaultdict(float)
    for key, path in owner.items():
        held[path] += sizes[key] / 1024 / nodes
    ordered = dict(sorted(held.items(), key=lambda kv: -kv[1]))
    return {"total": sum(sizes.values()) / 1024 / nodes} | ordered


def clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def summary_sha256(summary: dict[str, Any]) -> str:
    """The run's summary, metrics included and wall time left out, as sha256 (its first 16
    hex digits): two code trees that take the same decisions print the same."""
    decisions = {k: v for k, v in summary.items() if k != "wall_seconds"}
    blob = json.dumps(decisions, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One configuration; returns its measurements. Start-up (data, learner, cores) counts
    into ``total_wall``/``total_cpu``; ``wall``/``cpu`` are the run alone."""
    steps = args.steps
    before = peak_mb()
    wall0, cpu0 = clocks()
    prepared = prepared_for(args.nodes, steps, args, args.learner)
    after_data = peak_mb()
    if args.child == "plain":
        s = prepared.scenario
        plain_loop(prepared, 2, s.batch_size, s.lr, s.seed)  # warm-up, not measured
        wall1, cpu1 = clocks()
        plain_loop(prepared, steps, s.batch_size, s.lr, s.seed)
        wall2, cpu2 = clocks()
        return {
            "nodes": args.nodes,
            "steps": steps,
            "node_steps": args.nodes * steps,
            "wall": wall2 - wall1,
            "cpu": cpu2 - cpu1,
            "load": os.getloadavg()[0],
        }
    if args.child == "sharded":
        return sharded_child(args, prepared, wall0, cpu0)
    sim = Simulation(prepared, args.protocol, vectorised=not args.per_node_protocol)
    timers = Timers()
    instrument(sim, timers, breakdown=args.child == "breakdown")
    ops = OpCounter(sim) if args.count_ops else None
    wall1, cpu1 = clocks()
    with ops or contextlib.nullcontext():
        summary = sim.run()
    wall2, cpu2 = clocks()
    return {
        **({} if ops is None else ops.report(summary["messages"])),
        "nodes": args.nodes,
        "learner": args.learner,
        "steps": steps,
        "node_steps": summary["node_steps"],
        "wall": wall2 - wall1,
        "cpu": cpu2 - cpu1,
        "startup_wall": wall1 - wall0,
        "total_wall": wall2 - wall0,
        "total_cpu": cpu2 - cpu0,
        "load": os.getloadavg()[0],
        "train": timers.seconds["learner.step (training)"],
        "peak_mb": peak_mb(),
        "sim_mb": peak_mb() - after_data,
        "base_mb": before,
        "messages": summary["messages"],
        "syncs": summary["syncs"],
        "accuracy": summary["final_accuracy"],
        "summary_sha256": summary_sha256(summary),
        "seconds": dict(timers.seconds),
        "calls": dict(timers.calls),
        "sessions": {k: summary.get(k, 0) for k in SESSION_STATS},
        **({"held_kb_per_node": held_by_cores(sim.cores, args.nodes)} if args.held else {}),
    }


def sharded_child(
    args: argparse.Namespace, prepared: Prepared, wall0: float, cpu0: float
) -> dict[str, Any]:
    """The run split over ``--shards`` Ray workers on a local cluster started here."""
    import ray

    from p2pfl.simulator.sharding import ShardedRun

    ray.init(num_cpus=args.shards, include_dashboard=False, log_to_driver=False)
    try:
        wall1, cpu1 = clocks()
        run = ShardedRun(prepared, args.protocol, args.shards, threads=args.threads or 1)
        worker_cpu0 = run.shard_stats("cpu_seconds")
        wall2, cpu2 = clocks()
        summary = run.run()
        wall3, cpu3 = clocks()
        worker_cpu = [
            b - a for a, b in zip(worker_cpu0, run.shard_stats("cpu_seconds"), strict=True)
        ]
        worker_mb = run.shard_stats("peak_mb")
    finally:
        ray.shutdown()
    return {
        "nodes": args.nodes,
        "steps": args.steps,
        "shards": args.shards,
        "node_steps": summary["node_steps"],
        "wall": wall3 - wall2,
        "cpu": sum(worker_cpu) + (cpu3 - cpu2),
        "worker_cpu": worker_cpu,
        "startup_wall": wall2 - wall1,
        "windows": run.windows,
        "load": os.getloadavg()[0],
        "driver_mb": peak_mb(),
        "worker_mb": worker_mb,
        "messages": summary["messages"],
        "syncs": summary["syncs"],
        "accuracy": summary["final_accuracy"],
    }


# ------------------------------------------------------------------ parent: tables


def spawn(
    args: argparse.Namespace, kind: str, nodes: int, steps: int, tree: str = "", **flags: Any
) -> dict:
    """Run one configuration (of ``flags["protocol"]``, default the first) in a fresh
    interpreter and parse its JSON line; with ``tree``, that source tree's copy of this
    script on that tree's package."""
    env = None
    if tree:
        env = {**os.environ, "PYTHONPATH": os.path.abspath(tree)}
    cmd = [
        sys.executable,
        os.path.join(tree, "sim", "bench_scale.py") if tree else __file__,
        "--child",
        kind,
        "--nodes",
        str(nodes),
        "--steps",
        str(steps),
        "--learner",
        flags.get("learner", "batched"),
        "--protocol",
        flags.get("protocol", args.protocol),
        "--batch-size",
        str(args.batch_size),
        "--threads",
        str(args.threads),
        "--shards",
        str(args.shards),
    ]
    if flags.get("per_node_protocol"):
        cmd.append("--per-node-protocol")
    if args.model != "mlp":  # a tree from before ``--model`` runs the default
        cmd += ["--model", args.model]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def us_per_node_step(r: dict[str, Any]) -> float:
    """End-to-end wall time incl. start-up per node-step, in microseconds."""
    return r["total_wall"] / r["node_steps"] * 1e6


def scale_table(args: argparse.Namespace) -> None:
    """Part 1: at each size the plain per-model loop, then for each protocol the batched
    (and the per-node) learner, each against that plain loop."""
    sizes = [int(s) for s in args.sizes.split(",")]
    print(
        f"\n== scale: {args.model} on digits (iid), protocols {', '.join(args.protocols)}, batch "
        f"{args.batch_size}, {args.steps} steps batched, per-node/plain steps = "
        f"{args.per_node_budget} / nodes (3..{args.steps}), "
        f"{args.threads or torch.get_num_threads()} thread(s)"
    )
    head = (
        f"{'nodes':>6} {'run':>9} {'steps':>6} {'train us/node-step':>19} "
        f"{'e2e us/node-step':>17} {'+start-up':>10} {'cpu us':>8} {'msgs/node-step':>15} "
        f"{'peak MB':>8} {'load':>5}"
    )
    notes = []
    for n in sizes:
        few = max(3, min(args.steps, args.per_node_budget // n))
        plain = spawn(args, "plain", n, few)
        plain_us = plain["wall"] / plain["node_steps"] * 1e6
        plain_cpu = plain["cpu"] / plain["node_steps"] * 1e6
        for protocol in args.protocols:
            print(f"-- {n} nodes, {protocol}")
            print(head)
            runs = [("batched", spawn(args, "scale", n, args.steps, protocol=protocol))]
            if not args.no_per_node_learner:
                per_node = spawn(args, "scale", n, few, learner="per-node", protocol=protocol)
                runs.append(("per-node", per_node))
            for name, r in runs:
                ns = r["node_steps"]
                print(
                    f"{n:>6} {name:>9} {r['steps']:>6} {r['train'] / ns * 1e6:>19.1f} "
                    f"{r['wall'] / ns * 1e6:>17.1f} {r['total_wall'] / ns * 1e6:>10.1f} "
                    f"{r['total_cpu'] / ns * 1e6:>8.1f} {r['messages'] / ns:>15.2f} "
                    f"{r['peak_mb']:>8.0f} {r['load']:>5.1f}"
                )
            print(
                f"{n:>6} {'plain':>9} {few:>6} {plain_us:>19.1f} {'':>17} {'':>10} "
                f"{plain_cpu:>8.1f} {'':>15} {'':>8} {plain['load']:>5.1f}"
            )
            b = runs[0][1]
            e2e = us_per_node_step(b) / plain_us
            e2e_cpu = b["total_cpu"] / b["node_steps"] * 1e6 / plain_cpu
            verdict = "ok" if max(e2e, e2e_cpu) <= PLAIN_TARGET else "above target"
            per_node_ratio = "".join(
                f"; per-node learner e2e / plain {us_per_node_step(r) / plain_us:.2f}"
                for _, r in runs[1:]
            )
            print(
                f"{n:>6} {'ratio':>9}  {protocol}: batched end to end incl. start-up and "
                f"evaluation / plain per-model loop: {e2e:.3f} wall, {e2e_cpu:.3f} CPU (target "
                f"<= {PLAIN_TARGET}: {verdict}); training alone "
                f"{b['train'] / b['node_steps'] * 1e6 / plain_cpu:.3f} CPU{per_node_ratio}"
            )
        if n > 1438:
            notes.append(n)
    print(
        "train = CPU time inside learner.step (the plain loop's: wall); e2e = "
        "Simulation.run (protocol, messages, "
        "evaluation); +start-up adds data split, learner and cores; cpu us = the same with "
        "CPU time (process_time). peak MB = ru_maxrss of the configuration's own process; "
        "load = 1-minute load average when the configuration ended"
    )
    for n in notes:
        print(f"note: {n} nodes > 1,438 digits samples: node i trains on part i mod 1024")


def e2e_table(args: argparse.Namespace) -> None:
    """Part 2: one long end-to-end run, vectorised and per-node protocol path, and sharded."""
    nodes, steps = (int(v) for v in args.e2e.lower().split("x"))
    print(f"\n== end to end: {nodes} nodes x {steps} steps of {args.protocol}, batched learner")
    fast = spawn(args, "e2e", nodes, steps)
    slow = (
        None if args.no_per_node_path else spawn(args, "e2e", nodes, steps, per_node_protocol=True)
    )
    paths = [("vectorised protocol path", fast), ("per-node protocol path", slow)]
    for name, r in [(name, r) for name, r in paths if r is not None]:
        print(
            f"{name}: {r['wall']:.1f} s wall, {r['cpu']:.1f} s CPU "
            f"(training {r['train']:.1f} s CPU), "
            f"start-up {r['startup_wall']:.1f} s, load {r['load']:.1f}; {r['node_steps']:,} "
            f"node-steps, {r['messages']:,} messages, {r['syncs']:,} syncs, accuracy "
            f"{r['accuracy']:.3f}, peak {r['peak_mb']:.0f} MB"
        )
    if slow is not None:
        print(
            f"vectorised / per-node protocol path: {fast['wall'] / slow['wall']:.2f} wall, "
            f"{fast['cpu'] / slow['cpu']:.2f} CPU (same messages and syncs: "
            f"{fast['messages'] == slow['messages'] and fast['syncs'] == slow['syncs']})"
        )
    if args.shards:
        sharded_line(args, nodes, steps, E2E_TARGET_S, fast)
    if args.large and args.shards:
        big_nodes, big_steps = (int(v) for v in args.large.lower().split("x"))
        print(f"\n== large: {big_nodes} nodes x {big_steps} steps of {args.protocol}")
        sharded_line(args, big_nodes, big_steps, LARGE_TARGET_S, None)
    if args.breakdown:
        breakdown_table(spawn(args, "breakdown", nodes, steps))


def sharded_line(
    args: argparse.Namespace, nodes: int, steps: int, target: float, one: dict | None
) -> None:
    """A sharded run's figures (against the one-process run ``one`` if given)."""
    r = spawn(args, "sharded", nodes, steps)
    verdict = "ok" if r["wall"] <= target else "above target"
    workers = ", ".join(f"{c:.1f}" for c in r["worker_cpu"])
    memory = ", ".join(f"{m:.0f}" for m in r["worker_mb"])
    print(
        f"sharded over {r['shards']} Ray workers ({args.threads or 1} torch thread each): "
        f"{r['wall']:.1f} s wall (target {target:.0f} s: {verdict}), CPU {r['cpu']:.1f} s "
        f"(workers {workers}), {r['windows']:,} windows, start-up {r['startup_wall']:.1f} s, "
        f"load {r['load']:.1f}; {r['messages']:,} messages, {r['syncs']:,} syncs, accuracy "
        f"{r['accuracy']:.3f}; peak memory: workers {memory} MB, driver {r['driver_mb']:.0f} MB"
    )
    if one is not None:
        same = (one["messages"], one["syncs"]) == (r["messages"], r["syncs"])
        print(
            f"sharded / one process: {r['wall'] / one['wall']:.2f} wall, "
            f"{r['cpu'] / one['cpu']:.2f} CPU; same messages and syncs: {same}"
        )


def against_table(args: argparse.Namespace) -> None:
    """This tree against ``--against``: end-to-end runs of each in turn, CPU per node-step
    and the median ratio of neighbouring runs, and whether both took the same decisions."""
    nodes, steps = (int(v) for v in args.e2e.lower().split("x"))
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    print(
        f"\n== {nodes} nodes x {steps} steps of {args.protocol}: this tree ({here}) against "
        f"{args.against}, {args.repeats} runs each, in turn (who goes first alternates)"
    )
    ratios, hashes = [], set()
    for run in range(1, args.repeats + 1):
        pair = {}
        trees = [("this", here), ("against", args.against)]
        for name, tree in trees if run % 2 else trees[::-1]:  # who goes first alternates
            r = spawn(args, "e2e", nodes, steps, tree=tree)
            pair[name] = r
            hashes.add(r["summary_sha256"])
            print(
                f"run {run} {name:<8} {r['total_cpu']:7.1f} s CPU "
                f"({r['total_cpu'] / r['node_steps'] * 1e6:6.1f} us/node-step incl. start-up), "
                f"load {r['load']:4.1f}, peak {r['peak_mb']:5.0f} MB, "
                f"summary {r['summary_sha256']}"
            )
        ratios.append(pair["this"]["total_cpu"] / pair["against"]["total_cpu"])
    ratios.sort()
    print(
        f"CPU this / against: median {statistics.median(ratios):.3f} "
        f"(runs {', '.join(f'{r:.3f}' for r in ratios)}); "
        f"the same decisions (summary sha256): {len(hashes) == 1}"
    )


def breakdown_table(r: dict[str, Any]) -> None:
    """Where the time of an instrumented end-to-end run goes."""
    cpu, seconds, calls = r["cpu"], r["seconds"], r["calls"]
    print(f"instrumented repeat (vectorised path): {cpu:.1f} s CPU, {r['wall']:.1f} s wall")
    # Wrapped categories never nest, so what remains is the engine's own loop.
    rest = cpu - sum(seconds.values())
    rows = sorted(seconds.items(), key=lambda kv: -kv[1]) + [
        ("engine loop and runtime (the rest)", rest)
    ]
    print(f"{'where':<34}{'seconds':>9}{'share':>8}{'calls':>11}{'us/call':>9}")
    for name, sec in rows:
        n = calls.get(name, 0)
        per = f"{sec / n * 1e6:9.1f}" if n else f"{'':>9}"
        print(f"{name:<34}{sec:>9.1f}{sec / cpu:>8.0%}{n:>11,}{per}")
    fifths = [calls.get(f"messages in fifth {i} of the run", 0) for i in range(1, 6)]
    print(f"messages sent in each fifth of the run: {', '.join(f'{n:,}' for n in fifths)}")
    print(", ".join(f"{k} {v:,}" for k, v in r["sessions"].items()))


def main() -> None:
    """Parent: print the tables; child: measure one configuration."""
    args = parse_args()
    set_threads(args.threads)
    if args.child:
        print(json.dumps(child(args)))
        return
    print(
        f"bench_scale: torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"load average {os.getloadavg()[0]:.1f} at the start"
    )
    if args.against:
        against_table(args)
        return
    if not args.no_scale:
        scale_table(args)
    if not args.no_e2e:
        e2e_table(args)


if __name__ == "__main__":
    main()
