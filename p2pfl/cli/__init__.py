"""The ``p2pfl`` command line: ``demo``, ``sim``, ``topology``, ``node``, ``community``.

Errors end a command in one place, ``exits.py``, with the exit codes of ``p2pfl.errors``."""

from __future__ import annotations

import logging

from p2pfl.cli import community, node, simulate, topology
from p2pfl.cli.exits import command_group

app = command_group(
    help="p2pfl: peer-to-peer decentralized learning with dynamic averaging.",
    no_args_is_help=True,
)
app.command("sim")(simulate.sim)
app.command("demo")(simulate.demo)
app.add_typer(topology.app, name="topology", help="Inspect and draw topologies.")
app.add_typer(node.app, name="node", help="Run a node daemon.")
app.add_typer(community.app, name="community", help="Create, join, leave and list communities.")


def main() -> None:
    """Console-script entry point.

    Commands import their heavy modules (torch, matplotlib, libp2p) when they run, so ``--help``
    and the control commands start fast; the commands that train set torch's thread count
    (``P2PFL_THREADS``, default 1) through ``p2pfl.cli.torch_threads.use_torch``."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()
