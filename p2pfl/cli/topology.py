"""``p2pfl topology``: inspect a network topology before running on it."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from p2pfl.cli.exits import command_group
from p2pfl.cli.jsonout import JSON, print_json

app = command_group(no_args_is_help=True)

DEFAULT_NODES = 16


@app.callback()
def topology() -> None:
    """Inspect network topologies (generators such as small-world:k=4,p=0.2, or TOML files)."""


@app.command()
def show(
    spec: str = typer.Argument(
        ..., help="Topology spec, e.g. ring, torus, regular:d=4, or a .toml"
    ),
    nodes: int | None = typer.Option(
        None, "--nodes", "-n", help="Number of nodes [default: 16, or the file's own count]"
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of random generators"),
    png: Path | None = typer.Option(None, "--png", help="Also draw the graph to this PNG file"),
    allow_disconnected: bool = typer.Option(
        False, "--allow-disconnected", help="Accept a graph that falls apart into pieces"
    ),
    as_json: bool = JSON,
) -> None:
    """Print nodes, edges, degrees and diameter of a topology; optionally draw it."""
    from p2pfl.topology import build_topology, describe_topology, draw_topology

    out = Console()
    is_file = spec.strip().lower().endswith(".toml")
    count = nodes if nodes is not None or is_file else DEFAULT_NODES
    graph = build_topology(spec, count, seed, allow_disconnected=allow_disconnected)
    info = describe_topology(graph)
    if png is not None:
        draw_topology(graph, png)  # an OSError exits 1 with its message (``p2pfl.cli.exits``)
    if as_json:
        print_json({"spec": spec, **info, "png": None if png is None else str(png)})
        return
    table = Table(title=f"topology {escape(spec)}", show_header=False)
    table.add_row("nodes", str(info["nodes"]))
    table.add_row("edges", str(info["edges"]))
    table.add_row(
        "degree min / mean / max",
        f"{info['degree_min']} / {info['degree_mean']:.2f} / {info['degree_max']}",
    )
    table.add_row("connected", "yes" if info["connected"] else "[red]no[/red]")
    table.add_row("diameter", "-" if info["diameter"] is None else str(info["diameter"]))
    out.print(table)
    if png is not None:
        out.print(f"drawn to {escape(str(png))}")
