"""Dynamic averaging against the best fair baseline on a long, changing stream (issue 10).

    .venv/bin/python sim/stream.py sim/stream-fresh.toml --out runs/stream-fresh

Runs ``none``, periodic averaging at every ``--periods`` b in every ``--baselines`` variant
(with and without the drift correction and the outer step: the mechanisms that do not depend
on *when* a node talks), and every ``--dynamic`` spec, all on the scenario's data, seed and
learning-rate schedule (``--lr-schedule`` sets it for every run alike). For each dynamic
run it prints and writes to ``stream.json``:

* **bytes at equal prequential accuracy**: what the best fair baseline needs for the
  dynamic run's prequential accuracy (its frontier, interpolated in log bytes; ``none`` is
  its 0-byte point), and the ratio to the dynamic run's bytes;
* **recovery at equal traffic**: per drift, the steps until prequential accuracy is back
  at 90 % of its settled level before the drift, and the mean prequential accuracy over the
  first quarter of the phase after it, for the dynamic run and for the baseline run whose
  total bytes are closest to it;
* **settled traffic**: bytes per step over the last quarter of every concept phase, and
  the baseline's at equal prequential accuracy (a periodic schedule pays the same every
  step, so that is its bytes at equal accuracy divided by the steps).

``stream.png`` shows prequential accuracy and traffic over time for the default
``dynamic``, the baseline at equal traffic and the cheapest baseline reaching its accuracy.
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
from pareto import BASELINES, RunLog, mechanisms, per_window, with_keys  # noqa: E402

from p2pfl.cli.exits import run_script  # noqa: E402
from p2pfl.simulator.engine import prepare  # noqa: E402
from p2pfl.simulator.scenario import load_scenario  # noqa: E402
from p2pfl.simulator.stream import (  # noqa: E402
    bytes_at_accuracy,
    closest_traffic,
    drift_recovery,
    settled_traffic,
)

PERIODS = (20, 50, 100, 200, 500, 1000, 2000)


def compare(
    runs: list[dict[str, Any]], metrics: dict[str, list[dict[str, Any]]], events: list[Any]
) -> list[dict[str, Any]]:
    """For each dynamic run: bytes at equal prequential accuracy vs the best fair baseline,
    recovery per drift at equal traffic, and settled traffic (see the module docstring)."""
    baseline = [r for r in runs if mechanisms(r["protocol"])[0] in ("periodic", "none")]
    periodic = [r for r in baseline if r["bytes_sent"] > 0]
    points = [(r["bytes_sent"], r["prequential_accuracy"]) for r in baseline]
    out = []
    for run in (r for r in runs if mechanisms(r["protocol"])[0] == "dynamic"):
        level = run["prequential_accuracy"]
        fair = bytes_at_accuracy(points, level)
        matched = closest_traffic(periodic, run["bytes_sent"])
        steps = run["steps"]
        entry: dict[str, Any] = {
            "protocol": run["protocol"],
            "prequential_accuracy": level,
            "bytes_sent": run["bytes_sent"],
            "fair_bytes_at_equal_accuracy": fair,
            "ratio": None if fair is None else fair / max(run["bytes_sent"], 1),
            "best_fair_reaching": _cheapest_reaching(periodic, level),
            "settled_bytes_per_step": settled_traffic(metrics[run["protocol"]], events),
            "fair_settled_bytes_per_step": None if fair is None else fair / steps,
            "recovery": drift_recovery(metrics[run["protocol"]], events),
            "equal_traffic": None,
        }
        if matched is not None:
            entry["equal_traffic"] = {
                "protocol": matched["protocol"],
                "bytes_sent": matched["bytes_sent"],
                "prequential_accuracy": matched["prequential_accuracy"],
                "recovery": drift_recovery(metrics[matched["protocol"]], events),
            }
        out.append(entry)
    return out


def _cheapest_reaching(runs: list[dict[str, Any]], level: float) -> str | None:
    ok = [r for r in runs if r["prequential_accuracy"] >= level]
    return min(ok, key=lambda r: r["bytes_sent"])["protocol"] if ok else None


def print_comparison(table: list[dict[str, Any]]) -> None:
    for row in table:
        fair, ratio = row["fair_bytes_at_equal_accuracy"], row["ratio"]
        print(
            f"\n{row['protocol']}: prequential {row['prequential_accuracy']:.4f} at "
            f"{row['bytes_sent'] / 1e6:.1f} MB; best fair baseline at that accuracy: "
            + (f"{fair / 1e6:.1f} MB, ratio {ratio:.2f}x" if fair is not None else "not reached")
            + f" (cheapest reaching it: {row['best_fair_reaching']})"
        )
        fair_settled = row["fair_settled_bytes_per_step"]
        print(
            f"  settled traffic {row['settled_bytes_per_step'] / 1e3:.1f} kB/step"
            + (
                f" vs fair baseline {fair_settled / 1e3:.1f} kB/step"
                if fair_settled is not None
                else ""
            )
        )
        matched = row["equal_traffic"]
        if matched is None:
            continue
        print(
            f"  equal traffic: {matched['protocol']} {matched['bytes_sent'] / 1e6:.1f} MB, "
            f"prequential {matched['prequential_accuracy']:.4f}; per drift (step: recovery "
            "steps to 90 % / prequential over the first quarter after), dynamic | baseline:"
        )
        for mine, theirs in zip(row["recovery"], matched["recovery"], strict=True):
            print(
                f"    {mine['step']:6d}: {mine['recovery_steps']} / "
                f"{_fmt(mine['prequential_after'])}  |  {theirs['recovery_steps']} / "
                f"{_fmt(theirs['prequential_after'])}"
            )


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def draw(
    metrics: dict[str, list[dict[str, Any]]],
    shown: list[str],
    events: list[Any],
    path: Path,
    title: str,
    window: int,
) -> None:
    """Prequential accuracy (per evaluation window) and MB per step over time for the
    ``shown`` runs, drifts marked (sudden: dashed line; gradual: band)."""
    fig, (ax_acc, ax_t) = plt.subplots(2, 1, figsize=(11, 7.5), sharex=True)
    for color, name in enumerate(shown):
        rows = metrics[name]
        style = {"color": f"C{color}", "lw": 1}
        label = f"{name}: {rows[-1]['bytes'] / 1e6:.1f} MB"
        ax_acc.plot(
            [r["step"] for r in rows],
            [r["prequential_accuracy"] for r in rows],
            label=label,
            **style,
        )
        sent, edges = per_window(rows, window)
        ax_t.stairs([max(mb / window, 1e-6) for mb in sent], edges, baseline=None, **style)
    for ax in (ax_acc, ax_t):
        for e in events:
            if e.width:
                ax.axvspan(e.step, e.step + e.width, color="red", alpha=0.1)
            else:
                ax.axvline(e.step, c="red", ls="--", lw=1)
        ax.grid(alpha=0.3)
    ax_acc.set(ylabel="prequential accuracy", title="prequential accuracy (per evaluation window)")
    ax_acc.legend(fontsize=8)
    ax_t.set(
        yscale="log",
        xlabel="step",
        ylabel=f"MB per step (mean over {window} steps)",
        title="traffic over time",
    )
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", type=Path)
    parser.add_argument("--out", type=Path, default=Path("runs/stream-fresh"))
    parser.add_argument("--periods", default=",".join(map(str, PERIODS)))
    parser.add_argument(
        "--baselines",
        default=",".join(BASELINES),
        help=f"periodic variants: {', '.join(BASELINES)}",
    )
    parser.add_argument(
        "--dynamic", action="append", default=[], help="dynamic specs (default: dynamic)"
    )
    parser.add_argument(
        "--extra",
        action="append",
        default=[],
        help="more protocols to run, e.g. one baseline variant at a few periods "
        "(periodic runs join the fair baseline)",
    )
    parser.add_argument("--lr-schedule", default=None, help="for every run, e.g. cosine")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument(
        "--resume", action="store_true", help="keep the runs already in OUT/runs.jsonl"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    dynamic = args.dynamic or ["dynamic"]
    periodic = [
        with_keys(f"periodic:b={b}", BASELINES[v])
        for v in args.baselines.split(",")
        for b in args.periods.split(",")
    ]
    protocols = ["none", *periodic, *dynamic, *args.extra]
    overrides = {"protocols": tuple(protocols), "steps": args.steps}
    if args.lr_schedule:
        overrides["lr_schedule"] = args.lr_schedule
    scenario = load_scenario(args.scenario, overrides)
    prepared = prepare(scenario)
    log = RunLog(args.out, args.resume)
    runs: list[dict[str, Any]] = []
    metrics: dict[str, list[dict[str, Any]]] = {}
    for protocol in dict.fromkeys(protocols):
        result = log.run(prepared, protocol)
        metrics[protocol] = result.pop("metrics")
        runs.append(result)
        print(
            f"{protocol:56s} prequential {result['prequential_accuracy']:.4f}  test "
            f"{result['final_accuracy']:.3f}  {result['bytes_sent'] / 1e6:9.1f} MB",
            flush=True,
        )
    events = prepared.dataset.drift.events(scenario.steps) if prepared.dataset.drift else []
    table = compare(runs, metrics, events)
    print_comparison(table)
    summary = {"scenario": scenario.to_dict(), "runs": runs, "comparison": table}
    (args.out / "stream.json").write_text(json.dumps(summary, indent=2) + "\n")
    first = table[0]
    shown = [first["protocol"]]
    for name in ((first["equal_traffic"] or {}).get("protocol"), first["best_fair_reaching"]):
        if name and name not in shown:
            shown.append(name)
    window = max(
        scenario.eval_every, scenario.steps // 100 // scenario.eval_every * scenario.eval_every
    )
    draw(
        metrics,
        shown,
        events,
        args.out / "stream.png",
        f"{prepared.dataset.name} · {scenario.nodes} nodes · {scenario.partition} · "
        f"{len(events)} drifts · lr {scenario.lr_schedule}",
        window,
    )
    print(f"wrote {args.out}/stream.json, stream.png")


if __name__ == "__main__":
    run_script(main)
