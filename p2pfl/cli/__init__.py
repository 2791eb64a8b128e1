"""The ``p2pfl`` command line: ``demo``, ``sim``, ``topology``, ``node``, ``community``."""

from __future__ import annotations

import logging
import os

import torch
import typer

from p2pfl.cli import community, node, simulate, topology

app = typer.Typer(
    help="p2pfl: peer-to-peer decentralized learning with dynamic averaging.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.command("sim")(simulate.sim)
app.command("demo")(simulate.demo)
app.add_typer(topology.app, name="topology", help="Inspect and draw topologies.")
app.add_typer(node.app, name="node", help="Run a node daemon.")
app.add_typer(community.app, name="community", help="Create, join, leave and list communities.")


def main() -> None:
    """Console-script entry point.

    Torch runs single-threaded unless ``P2PFL_THREADS`` says otherwise: our models are small,
    so intra-op threads only add spinning (measured 6-10x slower with 2 threads on a loaded
    2-core machine, see the README)."""
    torch.set_num_threads(int(os.environ.get("P2PFL_THREADS", "1")))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()
