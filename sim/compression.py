"""Bytes to reach 99 % of continuous averaging, for each protocol x codec, on fixed-data
scenarios (the compression tables of docs/compression.md).

    .venv/bin/python sim/compression.py sim/pareto-iid.toml sim/pareto-dirichlet05.toml \\
        sim/pareto-dirichlet01.toml --seeds 1,2 --out runs/compression

For each scenario and seed: ``continuous:correction=0`` sets the target (99 % of its
accuracy, as ``sim/pareto.py``); every periodic variant of ``--variants`` (the shared
mechanisms: drift correction, outer step; see ``pareto.BASELINES``) at every period of
``--periods``, and gossip (with the drift correction) at every ``b`` of ``--gossip``, run
without a codec; the cheapest of them reaching the target (``pareto.cheapest``, as table 1
picks it) is the *best fair schedule* (if none reaches it, the most accurate one stands in
and is marked). Then every ``dynamic`` spec of ``--dynamic`` (default: its defaults; e.g. a
sweep of ``rel``) and that best fair schedule each run with every codec of ``--codecs``
(float32 first), so a codec is offered to both sides: the fair schedule with the same codec
shows what the codec buys, dynamic's row beside it what the trigger adds. With
``--codec-periods`` / ``--codec-gossip`` each codec also gets the schedule sweep again, with
the codec: the cheapest periodic variant of the float32 sweep at each of those periods, and
gossip at each of those ``b``. The cheapest of these reaching the target (else the most
accurate) is the *best fair schedule with that codec* (a coarse codec may need a shorter
period, or afford a longer one), so the codec's share of the gain (best fair ÷ best fair
with the codec) and the trigger's (best fair with the codec ÷ dynamic with it) are both
measured. Accuracy is the mean of the evaluations at prime steps in the last tenth; a
run's cost is all the bytes it sent.

``--reuse`` takes runs made before on the same scenario, seed and step count (a
``sim/pareto.py`` output's ``runs.jsonl``, a simulation's ``summary.json``, or this script's
``compression.json``): a protocol
found there is not run again (the table marks it). Prints one table per scenario (and the
mean over seeds with its spread) and writes ``compression.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from p2pfl.cli.exits import run_script
from p2pfl.simulator.engine import Simulation, prepare
from p2pfl.simulator.scenario import load_scenario

sys.path.insert(0, str(Path(__file__).parent))
from pareto import BASELINES, REFERENCE, cheapest, with_keys  # noqa: E402

PERIODS = (20, 50, 100, 200, 500)
GOSSIP = (20, 50, 100, 200, 500)
FIXED = ("periodic", "gossip")
"""The fixed schedules a best fair baseline is chosen from."""
VARIANTS = ("plain", "correction", "correction+outer")
CODECS = (
    "codec=fp16",
    "codec=int8",
    "codec=int4",
    "codec=sign",
    "codec=topk,topk=0.05",
    "codec=topk,topk=0.05,values=int8",
)
TARGET = 0.99


def codec_name(codec: str) -> str:
    """The codec keys of a spec as the table shows them (``float32`` for none)."""
    return codec.replace("codec=", "").replace(",", " ") or "float32"


def cheapest_reaching(runs: list[dict[str, Any]], target: float) -> dict[str, Any]:
    """The fixed schedule of ``runs`` with the fewest bytes among those reaching ``target``
    (``pareto.cheapest``); if none does, the most accurate one."""
    best = cheapest(runs, target, FIXED)
    return best or max(runs, key=lambda r: r["final_accuracy"])


def schedules(periods: Sequence[int], keys: str, gossips: Sequence[int]) -> dict[str, str]:
    """Fixed schedules, each with its periodic variant's keys: periodic with ``keys`` at each
    period, and gossip (drift correction on, its default) at each ``b`` of ``gossips``."""
    periodic = {with_keys(f"periodic:b={b}", keys): keys for b in periods}
    return periodic | {f"gossip:b={b}": "" for b in gossips}


def run_scenario(
    path: Path,
    seed: int,
    steps: int | None,
    periods: list[int],
    variants: list[str],
    codecs: list[str],
    dynamics: list[str],
    reused: dict[str, dict[str, Any]],
    gossips: Sequence[int] = (),
    codec_periods: Sequence[int] = (),
    codec_gossips: Sequence[int] = (),
) -> dict[str, Any]:
    """Every run of one scenario and seed, the target and the best fair schedule; runs in
    ``reused`` (by protocol) are taken as they are."""
    overrides: dict[str, Any] = {"seed": seed}
    if steps is not None:
        overrides["steps"] = steps
    prepared = prepare(load_scenario(path, overrides))
    runs: dict[str, dict[str, Any]] = {}

    def run(protocol: str) -> dict[str, Any]:
        """The run of ``protocol``: made once, or taken from ``reused``."""
        if protocol in runs:
            return runs[protocol]
        if protocol in reused:
            runs[protocol] = reused[protocol] | {"reused": True}
            return runs[protocol]
        summary = Simulation(prepared, protocol).run()
        runs[protocol] = {k: v for k, v in summary.items() if k != "metrics"}
        print(
            f"{path.stem} seed {seed} {protocol:52s} accuracy {summary['final_accuracy']:.4f} "
            f"{summary['bytes_sent'] / 1e6:9.2f} MB  refused {summary['refused_codec']}",
            flush=True,
        )
        return runs[protocol]

    target = TARGET * run(REFERENCE)["final_accuracy"]
    variant_of: dict[str, str] = {}
    for v in variants:
        variant_of |= schedules(periods, BASELINES[v], [])
    fixed = [run(p) for p in [*variant_of, *schedules([], "", gossips)]]
    best = cheapest_reaching(fixed, target)
    # The codec sweeps take the periodic variant that did best in float32.
    keys = variant_of[cheapest_reaching([run(p) for p in variant_of], target)["protocol"]]
    rows = []
    for codec in ("", *codecs):
        # (side, its protocol without the codec: the float32 run it loses points to)
        sides = [(d, d) for d in dynamics] + [("best fair", best["protocol"])]
        with_codec = None
        if codec and (codec_periods or codec_gossips):
            plain = list(schedules(codec_periods, keys, codec_gossips))
            swept = [run(with_keys(p, codec)) for p in plain]
            with_codec = cheapest_reaching(swept, target)
            chosen = next(p for p, r in zip(plain, swept, strict=True) if r is with_codec)
            sides.append(("best fair with the codec", chosen))
        for side, protocol in sides:
            spec = with_keys(protocol, codec)
            r = run(spec)
            rows.append(
                {
                    "side": side,
                    "protocol": spec,
                    "codec": codec_name(codec),
                    "accuracy": r["final_accuracy"],
                    "bytes": r["bytes_sent"],
                    "reaches": r["final_accuracy"] >= target,
                    "points_lost": 100 * (run(protocol)["final_accuracy"] - r["final_accuracy"]),
                    "points_below_best_fair": 100 * (best["final_accuracy"] - r["final_accuracy"]),
                    "best_fair_over_this": best["bytes_sent"] / max(r["bytes_sent"], 1),
                    "best_fair_with_codec_over_this": (
                        with_codec["bytes_sent"] / max(r["bytes_sent"], 1)
                        if with_codec and with_codec["final_accuracy"] >= target
                        else None
                    ),
                    "reused": r.get("reused", False),
                }
            )
    return {
        "scenario": path.stem,
        "seed": seed,
        "target": target,
        "best_fair": best["protocol"],
        "best_fair_reaches": best["final_accuracy"] >= target,
        "rows": rows,
        "runs": runs,
    }


def print_table(results: list[dict[str, Any]]) -> None:
    """One markdown table per scenario: each protocol x codec, mean over seeds (± half the
    range when there are several)."""
    by_scenario: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        by_scenario.setdefault(result["scenario"], []).append(result)
    for scenario, group in by_scenario.items():
        seeds = ", ".join(str(g["seed"]) for g in group)
        print(
            f"\n{scenario} (seeds {seeds}): target(s) "
            + ", ".join(f"{g['target']:.3f}" for g in group)
            + "; best fair schedule(s): "
            + ", ".join(
                g["best_fair"] + ("" if g["best_fair_reaches"] else " (does not reach)")
                for g in group
            )
        )
        print(
            "| side | codec | accuracy | MB | reaches | points lost to float32"
            " | points below best fair | best fair / this | best fair with the codec / this |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for i, row in enumerate(group[0]["rows"]):
            cells = [g["rows"][i] for g in group]
            print(
                f"| {row['side']} | {row['codec']} | {_spread([c['accuracy'] for c in cells], 3)}"
                f" | {_spread([c['bytes'] / 1e6 for c in cells], 1)}"
                f" | {sum(c['reaches'] for c in cells)}/{len(cells)}"
                f" | {_spread([c['points_lost'] for c in cells], 1, sign=True)}"
                f" | {_spread([c['points_below_best_fair'] for c in cells], 1, sign=True)}"
                f" | {_spread([c['best_fair_over_this'] for c in cells], 1)}x"
                f" | {_ratios([c['best_fair_with_codec_over_this'] for c in cells])} |"
                + (" (reused)" if any(c["reused"] for c in cells) else "")
            )


def _ratios(values: list[float | None]) -> str:
    """Ratios against the best fair schedule with a codec, ``-`` where it missed the target
    (or was not swept)."""
    return ", ".join("-" if v is None else f"{v:.1f}x" for v in values)


def _spread(values: list[float], digits: int, sign: bool = False) -> str:
    fmt = f"{{:{'+' if sign else ''},.{digits}f}}"
    mean = fmt.format(statistics.fmean(values))
    if len(values) < 2:
        return mean
    return f"{mean} ± {(max(values) - min(values)) / 2:.{digits}f}"


def load_runs(paths: list[Path], steps: int, seed: int) -> dict[str, dict[str, Any]]:
    """Earlier runs by protocol from ``runs.jsonl`` / ``summary.json`` files, those of
    ``steps`` steps whose scenario seed is ``seed`` (where the file says it)."""
    found: dict[str, dict[str, Any]] = {}
    for path in paths:
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text().splitlines() if line]
        elif path.name == "compression.json":
            results = json.loads(path.read_text())
            rows = [r for res in results if res["seed"] == seed for r in res["runs"].values()]
        else:
            summary = json.loads(path.read_text())
            if summary.get("scenario", {}).get("seed", seed) != seed:
                continue
            rows = summary["runs"]
        for row in rows:
            if row.get("steps") == steps:
                found[row["protocol"]] = {k: v for k, v in row.items() if k != "metrics"}
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenarios", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, default=Path("runs/compression"))
    parser.add_argument("--seeds", default="", help="comma list (default: each scenario's)")
    parser.add_argument("--periods", default=",".join(map(str, PERIODS)))
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"of {list(BASELINES)}")
    parser.add_argument(
        "--gossip", default=",".join(map(str, GOSSIP)), help="gossip b values of the baselines"
    )
    parser.add_argument("--codecs", default=";".join(CODECS), help="';'-separated codec keys")
    parser.add_argument(
        "--dynamic", default="dynamic", help="';'-separated dynamic specs, e.g. a rel sweep"
    )
    parser.add_argument(
        "--codec-periods",
        default="",
        help="comma list: sweep the best periodic variant over these periods with each codec"
        " (for the best fair schedule with that codec)",
    )
    parser.add_argument(
        "--codec-gossip", default="", help="comma list: gossip b values swept with each codec"
    )
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument(
        "--reuse", type=Path, nargs="*", default=[], help="runs.jsonl / summary.json to reuse"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)  # one thread per run: on a shared machine more only wait
    periods = [int(b) for b in args.periods.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    codecs = [c for c in args.codecs.split(";") if c]
    dynamics = [d for d in args.dynamic.split(";") if d]
    codec_periods = [int(b) for b in args.codec_periods.split(",") if b]
    codec_gossips = [int(b) for b in args.codec_gossip.split(",") if b]
    gossips = [int(b) for b in args.gossip.split(",") if b]
    results = []
    for path in args.scenarios:
        scenario = load_scenario(path, {} if args.steps is None else {"steps": args.steps})
        for seed in [int(s) for s in args.seeds.split(",") if s] or [scenario.seed]:
            reused = load_runs(args.reuse, scenario.steps, seed)
            results.append(
                run_scenario(
                    path,
                    seed,
                    args.steps,
                    periods,
                    variants,
                    codecs,
                    dynamics,
                    reused,
                    gossips,
                    codec_periods,
                    codec_gossips,
                )
            )
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "compression.json").write_text(json.dumps(results, indent=1))
    print_table(results)


if __name__ == "__main__":
    run_script(main)
