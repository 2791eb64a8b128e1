"""``p2pfl sim`` and ``p2pfl demo``: run protocols side by side in the simulator."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from p2pfl.cli.jsonout import print_json
from p2pfl.cli.torch_threads import use_torch
from p2pfl.simulator.scenario import load_scenario

DEMO_SCENARIO = Path(__file__).resolve().parents[1] / "scenarios" / "demo.toml"
"""The built-in demo, shipped inside the package (package data), so an installed p2pfl runs
it from anywhere."""

# Options both commands take (one declaration each).
QUIET = typer.Option(False, "--quiet", help="No progress bar.")
AS_JSON = typer.Option(
    False, "--json", help="Print the run's summary (as summary.json) on stdout instead."
)
SHARDS = typer.Option(
    1, "--shards", help="Split the nodes over this many Ray workers (needs p2pfl[ray])."
)
RAY_ADDRESS = typer.Option(
    None,
    "--ray-address",
    help="Ray cluster to shard on (e.g. ray://head:10001 or auto); "
    "default: a local cluster started for the run.",
)


def sim(
    scenario: Path | None = typer.Argument(None, help="Scenario TOML file (flags override it)."),
    nodes: int | None = typer.Option(None, "--nodes", help="Number of nodes."),
    topology: str | None = typer.Option(None, "--topology", help="e.g. small-world:k=4,p=0.2"),
    dataset: str | None = typer.Option(
        None, "--dataset", help="digits, digits:drift_every=N, synthetic:..., x.npz"
    ),
    partition: str | None = typer.Option(
        None, "--partition", help="iid, dirichlet:alpha=0.5, labels:k=4,min=10,max=200"
    ),
    model: str | None = typer.Option(None, "--model", help="logistic, mlp:hidden=64x32, cnn"),
    protocol: list[str] = typer.Option([], "--protocol", help="Repeat to compare protocols."),
    steps: int | None = typer.Option(None, "--steps", help="Steps per node."),
    batch_size: int | None = typer.Option(None, "--batch-size"),
    lr: float | None = typer.Option(None, "--lr", help="SGD learning rate."),
    lr_schedule: str | None = typer.Option(
        None,
        "--lr-schedule",
        help="constant, cosine[:min=0.01], step:every=N,gamma=0.5, restarts:period=N "
        "(each with warmup=W)",
    ),
    seed: int | None = typer.Option(None, "--seed"),
    allow_disconnected: bool = typer.Option(
        False, "--allow-disconnected", help="Accept a topology that is not connected."
    ),
    byzantine: str | None = typer.Option(
        None,
        "--byzantine",
        help="K:ATTACK, K nodes lie: signflip, scale, noise, replay, flood, fake-average.",
    ),
    out: Path = typer.Option(Path("runs/sim"), "--out", help="Directory for the results."),
    quiet: bool = QUIET,
    as_json: bool = AS_JSON,
    shards: int = SHARDS,
    ray_address: str | None = RAY_ADDRESS,
) -> None:
    """Simulate nodes on a graph and compare protocols on identical data and seed; with
    \\[\\[communities]] in the scenario, compare joining them against training alone."""
    overrides = {
        "nodes": nodes,
        "topology": topology,
        "dataset": dataset,
        "partition": partition,
        "model": model,
        "protocols": tuple(protocol),
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "lr_schedule": lr_schedule,
        "seed": seed,
        "allow_disconnected": allow_disconnected or None,
        "byzantine": byzantine,
    }
    _run(scenario, overrides, out, quiet, as_json, shards, ray_address)


def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Directory for the results."),
    steps: int | None = typer.Option(
        None, "--steps", help="Steps per node [default: 2,000]; fewer for a quick look."
    ),
    quiet: bool = QUIET,
    as_json: bool = AS_JSON,
    shards: int = SHARDS,
    ray_address: str | None = RAY_ADDRESS,
) -> None:
    """Run the built-in demo (p2pfl/scenarios/demo.toml): digits on 16 nodes, non-IID, four
    protocols."""
    _run(DEMO_SCENARIO, {"steps": steps}, out, quiet, as_json, shards, ray_address)


def _run(
    path: Path | None,
    overrides: dict[str, object],
    out: Path,
    quiet: bool,
    as_json: bool,
    shards: int = 1,
    ray_address: str | None = None,
) -> None:
    use_torch()
    from p2pfl.simulator.results import (
        communities_table,
        comparison_table,
        joining_table,
        run_scenario,
    )

    console = Console()
    scenario = load_scenario(path, overrides)
    summary = run_scenario(
        scenario, out, progress=not quiet, shards=shards, ray_address=ray_address
    )
    if as_json:
        print_json(summary)
        return
    console.print(comparison_table(summary))
    if "joining" in summary:
        console.print(joining_table(summary))
        console.print(communities_table(summary))
    console.print(f"results in {out}/ (summary.json, metrics.jsonl, report.png)")
