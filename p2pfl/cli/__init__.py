"""The ``p2pfl`` command line: ``demo``, ``sim``, ``topology``."""

from __future__ import annotations

import logging

import typer

from p2pfl.cli import node, simulate, topology

app = typer.Typer(
    help="p2pfl: peer-to-peer decentralized learning with dynamic averaging.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.command("sim")(simulate.sim)
app.command("demo")(simulate.demo)
app.add_typer(topology.app, name="topology", help="Inspect and draw topologies.")
app.add_typer(node.app, name="node", help="Run a node daemon.")


def main() -> None:
    """Console-script entry point."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()
