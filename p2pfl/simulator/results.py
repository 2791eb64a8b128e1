"""Running a scenario end to end and writing its results: ``summary.json``,
``metrics.jsonl``, ``report.png``, and the comparison table printed to the terminal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from p2pfl.simulator.engine import Simulation, prepare
from p2pfl.simulator.report import draw_report
from p2pfl.simulator.scenario import Scenario


def run_scenario(
    scenario: Scenario, out: Path | None, console: Console | None = None, progress: bool = True
) -> dict[str, Any]:
    """Run every protocol of ``scenario`` on identical data, graph, initial model and seed;
    write the results into ``out`` (if given) and return the summary."""
    console = console or Console(stderr=True)
    prepared = prepare(scenario)
    runs = []
    with Progress(
        TextColumn("{task.description:<28}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not progress,
    ) as bar:
        for protocol in scenario.protocols:
            task = bar.add_task(protocol, total=scenario.steps)
            sim = Simulation(prepared, protocol)
            runs.append(sim.run(lambda t, task=task: bar.update(task, completed=t)))
    summary = {
        "scenario": scenario.to_dict(),
        "graph": {
            "nodes": prepared.graph.number_of_nodes(),
            "edges": prepared.graph.number_of_edges(),
        },
        "model_params": sum(p.numel() for p in prepared.model.parameters()),
        "runs": [{k: v for k, v in r.items() if k != "metrics"} for r in runs],
    }
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
    title = f"{s['dataset']} · {s['nodes']} nodes · {s['topology']} · {s['partition']}"
    draw_report(runs, out / "report.png", title)


def comparison_table(summary: dict[str, Any]) -> Table:
    """The runs side by side, with bytes relative to the largest sender."""
    runs = summary["runs"]
    most = max((r["bytes_sent"] for r in runs), default=0) or 1
    table = Table(title="p2pfl simulation")
    for col in ("protocol", "accuracy", "MB sent", "vs max", "messages", "syncs", "wall s"):
        table.add_column(col, justify="left" if col == "protocol" else "right")
    for r in runs:
        table.add_row(
            r["protocol"],
            f"{r['final_accuracy']:.3f}",
            f"{r['bytes_sent'] / 1e6:,.1f}",
            f"{r['bytes_sent'] / most:.3f}",
            f"{r['messages']:,}",
            f"{r['syncs']:,}",
            f"{r['wall_seconds']:.1f}",
        )
    return table
