"""The accuracy-vs-bytes frontier, made fair: dynamic averaging against the *best fair
baseline*, the cheapest fixed schedule (periodic among every b with and without the drift
correction and with and without the outer optimizer, the mechanisms that do not depend on
*when* a node talks, and gossip if swept) on identical data, initial model and seed.

    .venv/bin/python sim/pareto.py sim/pareto-dirichlet05.toml --out runs/pareto-dirichlet05

Writes ``pareto.json`` and ``pareto.png`` (frontier, and traffic over time) into ``--out``
and prints, for target accuracies (95 % and 99 % of ``continuous`` without correction), the
fewest bytes ``dynamic`` (default mechanisms, Δ swept) needed, the fewest of the best fair
baseline (and of plain periodic averaging) and their ratios, and the 2×2 ablation trigger
(periodic / dynamic) × drift correction (off / on). Accuracy is measured fairly: the mean of
evaluations at prime-numbered steps in the last tenth of the run (no period divides them).
``--lr-schedule`` gives every run the same learning-rate schedule
(docs/fair-comparison.md, table 1b).

With concept drift in the scenario it also runs the periodic schedule whose traffic matches
the default ``dynamic`` and writes ``drift.png`` (accuracy, cumulative bytes and bytes per
window over steps, the drift step marked) and, for every run, the steps it took after the
drift to get back to 95 % of its own pre-drift accuracy.
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

from p2pfl.cli.exits import run_script
from p2pfl.protocol.config import DYNAMIC_DEFAULTS, parse_protocol  # noqa: E402
from p2pfl.simulator.engine import Simulation, prepare  # noqa: E402
from p2pfl.simulator.scenario import load_scenario  # noqa: E402

PERIODS = (2, 5, 10, 20, 50, 100, 200, 500, 1000)
RELS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
DYNAMIC_BS = (DYNAMIC_DEFAULTS["b"],)
OUTER = "outer_lr=0.7,outer_momentum=0.9"  # DiLoCo's values
AGREEMENT = "agreement=4"  # the drift correction's gain scaled by its lessons' agreement
# The baseline schedules: periodic averaging with each combination of the shared mechanisms.
BASELINES = {
    "plain": "correction=0",
    "correction": "",
    "outer": f"correction=0,{OUTER}",
    "correction+outer": OUTER,
    "agreement": AGREEMENT,
}
REFERENCE = "continuous:correction=0"  # averaging every step, the classical reference
RECOVERY_SHARE = 0.95
TRAFFIC_LINES = ("continuous", "periodic:b=10", "dynamic")


def with_keys(spec: str, keys: str) -> str:
    """``spec`` with more ``key=value`` arguments (none if ``keys`` is empty)."""
    if not keys:
        return spec
    return f"{spec}{',' if ':' in spec else ':'}{keys}"


def mechanisms(protocol: str) -> tuple[str, bool, bool]:
    """(trigger, correction on, outer optimizer on) of a run's protocol spec; the trigger is
    ``periodic`` (continuous included), ``dynamic``, ``gossip`` or ``none``."""
    config = parse_protocol(protocol)
    return config.kind, config.correction > 0, config.outer is not None


def family(protocol: str) -> str:
    """The trigger of a spec (see ``mechanisms``)."""
    return mechanisms(protocol)[0]


def sweep_protocols(
    periods: list[int],
    rels: list[float],
    bs: list[int],
    baselines: list[str],
    dynamic_keys: str = "",
    ablation: bool = True,
) -> list[str]:
    """Both continuous (with and without correction); every baseline variant at every
    period; the default ``dynamic``, dynamic at each (rel, b) that differs from the default;
    if ``ablation``, the same dynamic runs without correction; and ``none``."""
    protocols = [REFERENCE, "continuous"]
    protocols += [with_keys(f"periodic:b={b}", BASELINES[v]) for v in baselines for b in periods]
    dynamic = ["dynamic"]
    for b in bs:
        for rel in rels:
            if (rel, b) == (DYNAMIC_DEFAULTS["rel"], DYNAMIC_DEFAULTS["b"]):
                continue
            dynamic.append(f"dynamic:rel={rel}" + (f",b={b}" if b != DYNAMIC_DEFAULTS["b"] else ""))
    dynamic = [with_keys(d, dynamic_keys) for d in dynamic]
    ablated = [with_keys(d, "correction=0") for d in dynamic] if ablation else []
    return protocols + dynamic + ablated + ["none"]


def cheapest(
    runs: list[dict[str, Any]],
    target: float,
    trigger: str | tuple[str, ...],
    correction: bool | None = None,
    outer: bool | None = None,
) -> dict[str, Any] | None:
    """The run with ``trigger`` (one of them, if several; and the given mechanisms; None:
    either) that reaches ``target`` accuracy with the fewest bytes."""
    triggers = (trigger,) if isinstance(trigger, str) else trigger
    ok = []
    for r in runs:
        kind, corr, out = mechanisms(r["protocol"])
        if (
            kind in triggers
            and r["final_accuracy"] >= target
            and correction in (None, corr)
            and outer in (None, out)
        ):
            ok.append(r)
    return min(ok, key=lambda r: r["bytes_sent"], default=None)


def _entry(run: dict[str, Any] | None) -> tuple[str, int, int] | None:
    return run and (run["protocol"], run["bytes_sent"], run["bytes_last_20pct"])


def _ratio(base: dict[str, Any] | None, dyn: dict[str, Any] | None, key: str) -> float | None:
    return base[key] / max(dyn[key], 1) if base and dyn else None


def frontier_table(runs: list[dict[str, Any]], reference: float) -> list[dict[str, Any]]:
    """For 95 % and 99 % of the reference accuracy: the cheapest dynamic run with the drift
    correction, the best fair baseline (cheapest fixed schedule: periodic of any variant, or
    gossip: the small merges of a session are not the trigger's idea), plain
    periodic averaging (no correction, no outer) and, if swept, gossip, with the ratios of
    their bytes (whole run and last 20 %); and the 2×2 ablation trigger × correction (each
    cell: its cheapest run, outer optimizer on or off)."""
    rows = []
    for share in (0.95, 0.99):
        target = share * reference
        dyn = cheapest(runs, target, "dynamic", correction=True)
        row: dict[str, Any] = {"target": f"{share:.0%} of continuous ({target:.3f})"}
        row["dynamic"] = _entry(dyn)
        for key, base in (
            ("best_fair", cheapest(runs, target, ("periodic", "gossip"))),
            ("plain_periodic", cheapest(runs, target, "periodic", False, False)),
            ("gossip", cheapest(runs, target, "gossip")),
        ):
            row[key] = _entry(base)
            row[f"ratio_{key}"] = _ratio(base, dyn, "bytes_sent")
            row[f"tail_ratio_{key}"] = _ratio(base, dyn, "bytes_last_20pct")
        row["ablation"] = {
            f"{trigger}/correction {'on' if corr else 'off'}": _entry(
                cheapest(runs, target, trigger, corr)
            )
            for trigger in ("periodic", "dynamic")
            for corr in (False, True)
        }
        rows.append(row)
    return rows


def print_table(table: list[dict[str, Any]], reference: float) -> None:
    def mb(entry: tuple[str, int, int] | None) -> str:
        return f"{entry[0]} {entry[1] / 1e6:.1f} MB" if entry else "not reached"

    print(f"\ncontinuous without correction ({REFERENCE}): {reference:.3f}")
    for row in table:
        print(f"{row['target']}: dynamic {mb(row['dynamic'])}")
        for key in ("best_fair", "plain_periodic", "gossip"):
            ratio, tail = row[f"ratio_{key}"], row[f"tail_ratio_{key}"]
            print(
                f"  {key}: {mb(row[key])}, bytes ratio {ratio and round(ratio, 1)}, "
                f"last-20% ratio {tail and round(tail, 1)}"
            )
        print("  ablation (cheapest run reaching the target; outer optimizer on or off):")
        for cell, entry in row["ablation"].items():
            print(f"    {cell:28s} {mb(entry)}")


# -- concept drift -----------------------------------------------------------------------------
def recovery(
    rows: list[dict[str, Any]], drift_at: int, window: int, common: float | None = None
) -> dict[str, Any]:
    """Pre-drift accuracy (mean of evaluations in the ``window`` steps up to the drift); the
    steps after the drift until an evaluation is back at ``RECOVERY_SHARE`` of it; and the
    steps until it reaches the ``common`` accuracy level (None: never)."""

    def steps_to(level: float) -> int | None:
        back = (r["step"] for r in rows if r["step"] > drift_at and r["accuracy"] >= level)
        step = next(back, None)
        return None if step is None else step - drift_at

    before = [r["accuracy"] for r in rows if drift_at - window < r["step"] <= drift_at]
    level = sum(before) / len(before)
    return {
        "pre_drift_accuracy": level,
        "recovery_steps": steps_to(RECOVERY_SHARE * level),
        "steps_to_common_level": None if common is None else steps_to(common),
    }


def matched_period(runs: list[dict[str, Any]], target_bytes: int) -> int:
    """The period b whose periodic schedule sends about ``target_bytes`` (a periodic round
    costs the same every time, so its bytes scale as 1/b)."""
    every_step = next(r["bytes_sent"] for r in runs if r["protocol"] == REFERENCE)
    return max(1, round(every_step / max(target_bytes, 1)))


def per_window(rows: list[dict[str, Any]], window: int) -> tuple[list[float], list[int]]:
    """MB sent in each ``window`` steps (from the evaluations at multiples of ``window``),
    with the window edges."""
    marks = [{"step": 0, "bytes": 0}] + [r for r in rows if r["step"] % window == 0]
    sent = [(b["bytes"] - a["bytes"]) / 1e6 for a, b in zip(marks, marks[1:], strict=False)]
    return sent, [m["step"] for m in marks]


def draw_drift(
    metrics: dict[str, list[dict[str, Any]]],
    recoveries: dict[str, dict[str, Any]],
    drift_at: int,
    window: int,
    common: float,
    path: Path,
    title: str,
) -> None:
    """Accuracy (every run), cumulative MB and MB per window (all but ``continuous``, which
    would flatten the others) over steps, with the drift step marked."""
    fig, (ax_acc, ax_cum, ax_win) = plt.subplots(3, 1, figsize=(9, 10), sharex=True)
    for color, (name, rows) in enumerate(metrics.items()):
        steps = [r["step"] for r in rows]
        rec = recoveries[name]
        label = (
            f"{name}: {rows[-1]['bytes'] / 1e6:.1f} MB; back to {RECOVERY_SHARE:.0%} of own "
            f"pre-drift in {rec['recovery_steps']} steps, to {common:.3f} in "
            f"{rec['steps_to_common_level']}"
        )
        style = {"label": name, "color": f"C{color}"}
        ax_acc.plot(steps, [r["accuracy"] for r in rows], **(style | {"label": label}))
        if name == "continuous":
            continue
        ax_cum.plot(steps, [r["bytes"] / 1e6 for r in rows], **style)
        ax_win.stairs(*per_window(rows, window), baseline=None, **style)
    ax_acc.axhline(common, c="gray", ls=":", lw=1)
    ax_acc.set(ylabel="mean accuracy", title="accuracy")
    ax_cum.set(ylabel="MB sent (cumulative)", title="cumulative traffic")
    ax_win.set(xlabel="step", ylabel=f"MB per {window} steps", title="traffic per window")
    for ax in (ax_acc, ax_cum, ax_win):
        ax.axvline(drift_at, c="red", ls="--", lw=1, label="concept drift")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the frontier plot -----------------------------------------------------------------------
def draw(
    runs: list[dict[str, Any]],
    metrics: dict[str, list[dict]],
    path: Path,
    title: str,
    window: int,
    drift_at: int | None,
) -> None:
    """The frontier (accuracy vs MB, one curve per family) and the traffic over time of
    ``TRAFFIC_LINES`` (MB per step, averaged over each ``window`` steps; a silent window
    drops to the bottom of the axis)."""
    fig, (ax, ax_t) = plt.subplots(1, 2, figsize=(13, 4.8))
    curves: dict[str, list[tuple[float, float, str]]] = {}
    for r in runs:
        trigger, corr, outer = mechanisms(r["protocol"])
        if r["bytes_sent"] > 0:
            name = trigger + (" + correction" if corr else "") + (" + outer" if outer else "")
            curves.setdefault(name, []).append(
                (r["bytes_sent"] / 1e6, r["final_accuracy"], r["protocol"])
            )
    for name, pts in sorted(curves.items()):
        pts.sort()
        style = "s-" if name.startswith("dynamic") else "o--"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, ms=4, label=name)
        if name.startswith("dynamic"):
            for x, y, protocol in pts:
                ax.annotate(protocol.split(":", 1)[-1], (x, y), fontsize=5, alpha=0.6)
    for r in runs:
        if r["bytes_sent"] == 0:
            ax.axhline(r["final_accuracy"], ls=":", c="gray", label=f"{r['protocol']} (0 bytes)")
    ax.set(xscale="log", xlabel="MB sent (log)", ylabel="final accuracy", title="frontier")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    for name in (n for n in TRAFFIC_LINES if n in metrics):
        sent, edges = per_window(metrics[name], window)
        ax_t.stairs([max(mb / window, 1e-5) for mb in sent], edges, baseline=None, label=name)
    if drift_at is not None:
        ax_t.axvline(drift_at, c="red", ls="--", lw=1, label="concept drift")
    ax_t.set(
        yscale="log",
        ylim=(1e-5, None),
        xlabel="step",
        ylabel=f"MB per step (log; mean over {window} steps)",
        title="traffic over time",
    )
    ax_t.grid(alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class RunLog:
    """The runs of one sweep, appended to ``OUT/runs.jsonl`` as each finishes; with
    ``resume`` the runs already in that file are taken from it instead of run again."""

    def __init__(self, out: Path, resume: bool) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "runs.jsonl"
        self.done: dict[str, dict[str, Any]] = {}
        if resume and self.path.exists():
            for line in self.path.read_text().splitlines():
                self.done[json.loads(line)["protocol"]] = json.loads(line)
        elif self.path.exists():
            self.path.unlink()

    def run(self, prepared: Any, protocol: str) -> dict[str, Any]:
        """The result of ``protocol`` on ``prepared`` (from the log, or run and logged)."""
        if protocol in self.done:
            return dict(self.done[protocol])
        result = Simulation(prepared, protocol).run()
        with self.path.open("a") as f:
            f.write(json.dumps(result) + "\n")
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", type=Path)
    parser.add_argument("--out", type=Path, default=Path("runs/pareto"))
    parser.add_argument("--periods", default=",".join(map(str, PERIODS)))
    parser.add_argument("--rels", default=",".join(map(str, RELS)))
    parser.add_argument("--bs", default=",".join(map(str, DYNAMIC_BS)), help="dynamic b values")
    parser.add_argument(
        "--baselines",
        default=",".join(BASELINES),
        help=f"periodic variants: {', '.join(BASELINES)}",
    )
    parser.add_argument(
        "--dynamic-keys",
        default="",
        help="keys added to every dynamic spec, e.g. condition=coherent",
    )
    parser.add_argument(
        "--no-ablation",
        action="store_true",
        help="skip the dynamic runs without correction (the ablation's column)",
    )
    parser.add_argument(
        "--lr-schedule",
        default=None,
        help="learning-rate schedule for every run alike, e.g. cosine:min=0.1 "
        "(default: the scenario's)",
    )
    parser.add_argument("--gossip", default="", help="also gossip:b=B for these B (comma list)")
    parser.add_argument("--extra", action="append", default=[], help="more protocols to run")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None, help="override the scenario's seed")
    parser.add_argument(
        "--resume", action="store_true", help="keep the runs already in OUT/runs.jsonl"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    protocols = (
        sweep_protocols(
            [int(b) for b in args.periods.split(",")],
            [float(r) for r in args.rels.split(",") if r],
            [int(b) for b in args.bs.split(",")],
            args.baselines.split(","),
            args.dynamic_keys,
            not args.no_ablation,
        )
        + [f"gossip:b={b}" for b in args.gossip.split(",") if b]
        + args.extra
    )
    scenario = load_scenario(
        args.scenario,
        {
            "protocols": tuple(protocols),
            "steps": args.steps,
            "seed": args.seed,
            "lr_schedule": args.lr_schedule,
        },
    )
    prepared = prepare(scenario)
    drift = prepared.dataset.drift
    log = RunLog(args.out, args.resume)
    runs: list[dict[str, Any]] = []
    metrics: dict[str, list[dict[str, Any]]] = {}

    def run(protocol: str) -> dict[str, Any]:
        result = log.run(prepared, protocol)
        metrics[protocol] = result.pop("metrics")
        runs.append(result)
        print(
            f"{protocol:52s} acc {result['final_accuracy']:.3f}  "
            f"{result['bytes_sent'] / 1e6:9.1f} MB  last 20%: "
            f"{result['bytes_last_20pct'] / 1e6:8.1f} MB",
            flush=True,
        )
        return result

    for protocol in dict.fromkeys(scenario.protocols):
        run(protocol)
    reference = next(r["final_accuracy"] for r in runs if r["protocol"] == REFERENCE)
    table = frontier_table(runs, reference)
    print_table(table, reference)
    title = f"{scenario.dataset} · {scenario.partition} · lr {scenario.lr_schedule}"
    every = scenario.eval_every
    window = max(every, scenario.steps // 30 // every * every)  # traffic-over-time windows
    summary: dict[str, Any] = {"scenario": scenario.to_dict(), "runs": runs, "frontier": table}
    metrics["continuous"] = metrics[REFERENCE]
    if drift is not None:
        dynamic = next(r for r in runs if r["protocol"] == "dynamic")
        matched = f"periodic:b={matched_period(runs, dynamic['bytes_sent'])}"
        if matched not in metrics:
            run(matched)
        pre_window = scenario.steps // 10
        pre = recovery(metrics["continuous"], drift.at_step, pre_window)["pre_drift_accuracy"]
        common = RECOVERY_SHARE * pre
        recoveries = {
            name: recovery(rows, drift.at_step, pre_window, common)
            for name, rows in metrics.items()
        }
        for r in runs:
            r.update(recoveries[r["protocol"]])
        shown = ("continuous", matched, "dynamic")
        print(
            f"\ndrift at step {drift.at_step}; steps to {RECOVERY_SHARE:.0%} of own pre-drift "
            f"accuracy / to {common:.3f} ({RECOVERY_SHARE:.0%} of continuous's):"
        )
        for name in shown:
            rec = recoveries[name]
            print(
                f"  {name:20s} {metrics[name][-1]['bytes'] / 1e6:8.1f} MB  pre-drift acc "
                f"{rec['pre_drift_accuracy']:.3f}  recovery {rec['recovery_steps']} / "
                f"{rec['steps_to_common_level']} steps"
            )
        summary["drift"] = {
            "at_step": drift.at_step,
            "matched_periodic": matched,
            "common_level": common,
        }
        summary["drift_metrics"] = {name: metrics[name] for name in shown}
        draw_drift(
            {name: metrics[name] for name in shown},
            recoveries,
            drift.at_step,
            window,
            common,
            args.out / "drift.png",
            f"{title} · concept drift at step {drift.at_step}",
        )
    (args.out / "pareto.json").write_text(json.dumps(summary, indent=2) + "\n")
    draw(runs, metrics, args.out / "pareto.png", title, window, drift and drift.at_step)
    print(f"wrote {args.out}/pareto.json, pareto.png" + (", drift.png" if drift else ""))


if __name__ == "__main__":
    run_script(main)
