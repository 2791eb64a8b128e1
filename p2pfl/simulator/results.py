"""Running a scenario end to end and writing its results: ``summary.json``,
``metrics.jsonl``, ``report.png``, and the tables printed to the terminal.

A scenario with communities runs twice, "alone" (every node on its own data) and
"communities" (each node syncing its communities' parts), and its summary gains a
``joining`` section: per node, own-objective accuracy with communities against alone."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from p2pfl.data import Dataset
from p2pfl.simulator.channels import Channel
from p2pfl.simulator.engine import Simulation, prepare
from p2pfl.simulator.joining import compare_joining
from p2pfl.simulator.report import draw_joining, draw_report
from p2pfl.simulator.scenario import Scenario
from p2pfl.simulator.sharding import ShardedRun


def run_scenario(
    scenario: Scenario,
    out: Path | None,
    console: Console | None = None,
    progress: bool = True,
    shards: int = 1,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Run every protocol of ``scenario`` (or, with communities, "alone" and "communities") on
    identical data, graph, initial model and seed; write the results into ``out`` (if given)
    and return the summary. With ``shards`` > 1 each run is split over that many Ray workers
    (``sharding.py``; the same summary)."""
    console = console or Console(stderr=True)
    prepared = prepare(scenario)
    plan: list[tuple[str, list[Channel] | None]] = [(p, None) for p in scenario.protocols]
    if scenario.communities:
        plan = [("alone", []), ("communities", prepared.communities)]
    runs = []
    with Progress(
        TextColumn("{task.description:<28}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not progress,
    ) as bar:
        for name, channels in plan:
            task = bar.add_task(name, total=scenario.steps)
            on_tick = lambda t, task=task: bar.update(task, completed=t)  # noqa: E731
            if shards == 1:
                runs.append(Simulation(prepared, name, channels).run(on_tick))
                continue
            sharded = ShardedRun(prepared, name, shards, address=ray_address)
            try:
                runs.append(sharded.run(on_tick))
            finally:
                sharded.close()
    summary = {
        "scenario": scenario.to_dict(),
        "graph": {
            "nodes": prepared.graph.number_of_nodes(),
            "edges": prepared.graph.number_of_edges(),
        },
        "model_params": sum(p.numel() for p in prepared.model.parameters()),
        "drift_events": drift_events(prepared.dataset, scenario.steps),
        "runs": [{k: v for k, v in r.items() if k != "metrics"} for r in runs],
    }
    if scenario.communities:
        summary["joining"] = compare_joining(prepared, runs[0], runs[1])
    if out is not None:
        write_results(out, summary, runs)
    return summary


def write_results(out: Path, summary: dict[str, Any], runs: list[dict[str, Any]]) -> None:
    """Write ``summary.json``, ``metrics.jsonl`` and ``report.png`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    with (out / "metrics.jsonl").open("w") as fh:
        for run in runs:
            for row in run["metrics"]:
                fh.write(json.dumps(row, sort_keys=True) + "\n")
    s = summary["scenario"]
    if "joining" in summary:
        title = (
            f"{s['dataset']} · {s['nodes']} nodes · {len(s['communities'])} communities · "
            f"{s['partition']} · {s['model']}"
        )
        draw_joining(summary["joining"], runs, out / "report.png", title)
        return
    title = f"{s['dataset']} · {s['nodes']} nodes · {s['topology']} · {s['partition']}"
    draw_report(runs, out / "report.png", title, summary["drift_events"])


def drift_events(dataset: Dataset, steps: int) -> list[dict[str, int]]:
    """The run's concept drifts: after which step, to which concept, over how many steps."""
    return [] if dataset.drift is None else [asdict(e) for e in dataset.drift.events(steps)]


def comparison_table(summary: dict[str, Any]) -> Table:
    """The runs side by side: accuracy (mean of the local models on the test set), the
    average model's accuracy and the prequential accuracy (each batch scored before training
    on it, over the whole run)."""
    runs = summary["runs"]
    own = all("final_own_accuracy" in r for r in runs)
    table = Table(title="p2pfl simulation", box=box.SIMPLE_HEAD, pad_edge=False, padding=0)
    columns = [
        "protocol",
        "accuracy",
        "avg\nmodel",
        "preq.\nacc",
        "MB sent",
        "messages",
        "syncs",
        "wall\ns",
    ]
    if own:
        columns[1:2] = ["own acc", "test acc"]
    liars = any(r.get("byzantine_nodes") for r in runs)
    if liars:
        columns.insert(columns.index("MB sent"), "honest acc")
    for col in columns:
        if col == "protocol":
            table.add_column(col, overflow="fold")
        else:
            table.add_column(col, justify="right")
    for r in runs:
        accuracy = [f"{r['final_accuracy']:.3f}"]
        if own:
            accuracy.insert(0, f"{r['final_own_accuracy']:.3f}")
        prequential = r["prequential_accuracy"]
        accuracy += [
            f"{r['average_model_accuracy']:.3f}",
            "-" if prequential is None else f"{prequential:.3f}",
        ]
        if liars:
            accuracy.append(f"{r['honest_accuracy']:.3f}")
        table.add_row(
            r["protocol"],
            *accuracy,
            f"{r['bytes_sent'] / 1e6:,.1f}",
            f"{r['messages']:,}",
            f"{r['syncs']:,}",
            f"{r['wall_seconds']:.1f}",
        )
    return table


def joining_table(summary: dict[str, Any]) -> Table:
    """Own-objective accuracy alone and with communities, for data-poor and data-rich members."""
    joining = summary["joining"]
    poor = joining["data_poor_max"]
    table = Table(title="the value of joining: own-objective accuracy, communities vs alone")
    columns = ("group", "nodes", "alone", "communities", "mean gain", "worst gain", "gaining")
    for col in columns:
        table.add_column(col, justify="left" if col == "group" else "right")
    labels = {
        "data_poor": f"data-poor (<={poor})",
        "data_rich": f"data-rich (>{poor})",
        "members": "all members",
    }
    for key, label in labels.items():
        g = joining["groups"][key]
        if not g["nodes"]:
            table.add_row(label, "0", *["-"] * 5)
            continue
        table.add_row(
            label,
            str(g["nodes"]),
            f"{g['mean_accuracy_alone']:.3f}",
            f"{g['mean_accuracy_communities']:.3f}",
            f"{g['mean_gain']:+.3f}",
            f"{g['worst_gain']:+.3f}",
            f"{g['share_gaining']:.0%}",
        )
    return table


def communities_table(summary: dict[str, Any]) -> Table:
    """What each community shared and what its syncing cost."""
    table = Table(title="communities")
    for col in ("community", "members", "shared", "params", "protocol", "MB sent", "syncs"):
        table.add_column(
            col, justify="right" if col in ("members", "params", "MB sent", "syncs") else "left"
        )
    globs = {c["name"]: c["shared"] for c in summary["scenario"]["communities"]}
    for c in summary["joining"]["communities"]:
        table.add_row(
            c["name"],
            str(c["members"]),
            ", ".join(globs[c["name"]]),
            f"{c['shared_params']:,}",
            c["protocol"],
            f"{c['bytes_sent'] / 1e6:,.1f}",
            f"{c['syncs']:,}",
        )
    return table
