"""``p2pfl node init|start|status|stop``: run one participant as a foreground daemon."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.table import Table

from p2pfl.cli.exits import command_group
from p2pfl.cli.jsonout import JSON, print_json
from p2pfl.cli.torch_threads import use_torch
from p2pfl.daemon.config import KEY_FILE, ConfigError, load_config, write_template
from p2pfl.daemon.control import ControlError, request, socket_path
from p2pfl.errors import P2pflError
from p2pfl.files import writable_problem

if TYPE_CHECKING:
    from p2pfl.daemon.node import NodeDaemon

app = command_group(no_args_is_help=True)

HOME = typer.Option(..., "--home", help="The node's directory (identity, config, checkpoints).")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@app.command()
def init(home: Path = HOME, as_json: bool = JSON) -> None:
    """Create DIR with a private identity key and a commented config.toml."""

    from p2pfl.daemon.identity import load_or_create_identity
    from p2pfl.peers import peer_id_of

    config = write_template(home)
    key_pair = load_or_create_identity(home / KEY_FILE)
    peer_id = peer_id_of(key_pair.public_key)
    if as_json:
        print_json({"peer_id": peer_id, "home": str(home), "config": str(config)})
        return
    print(f"peer id {peer_id}")
    print(f"edit {config}, then run: p2pfl node start --home {home}")


@app.command()
def start(
    home: Path = HOME,
    listen: str | None = typer.Option(None, "--listen", help="e.g. /ip4/0.0.0.0/tcp/4001"),
    bootstrap: list[str] = typer.Option([], "--bootstrap", help="Peer address; repeatable."),
    data: str | None = typer.Option(None, "--data", help="x.npz or digits:part=3/8,alpha=0.5"),
    model: str | None = typer.Option(None, "--model", help="logistic, mlp, cnn, ..."),
    protocol: str | None = typer.Option(None, "--protocol", help="dynamic, periodic:b=10, ..."),
    steps: int | None = typer.Option(None, "--steps", help="Steps to train (0 = no limit)."),
    lr: float | None = typer.Option(None, "--lr"),
    batch_size: int | None = typer.Option(None, "--batch-size"),
    seed: int | None = typer.Option(None, "--seed"),
    step_interval: float | None = typer.Option(None, "--step-interval", help="Seconds."),
    target_degree: int | None = typer.Option(None, "--target-degree"),
    metrics_port: int | None = typer.Option(None, "--metrics-port", help="0 = off."),
    dashboard_port: str | None = typer.Option(
        None, "--dashboard-port", help="Dashboard on 127.0.0.1: auto (default), a port, 0 = off."
    ),
    mdns: bool | None = typer.Option(
        None, "--mdns/--no-mdns", help="Find peers on the LAN (non-loopback --listen only)."
    ),
    relay_service: bool | None = typer.Option(
        None, "--relay-service/--no-relay-service", help="Relay for nodes behind NAT."
    ),
    relay: list[str] = typer.Option(
        [], "--relay", help="A relay's address: be reachable through it behind NAT; repeatable."
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Once listening, print one JSON line (peer id, addresses, URL)."
    ),
) -> None:
    """Run the node in the foreground until SIGINT/SIGTERM or `p2pfl node stop`.

    Prints its full addresses (one per line) once it listens; the dashboard's URL is logged."""
    flags: dict[str, Any] = {
        "listen": listen,
        "bootstrap": bootstrap,
        "data": data,
        "model": model,
        "protocol": protocol,
        "steps": steps,
        "lr": lr,
        "batch_size": batch_size,
        "seed": seed,
        "step_interval": step_interval,
        "target_degree": target_degree,
        "metrics_port": metrics_port,
        "dashboard_port": dashboard_port,
        "mdns": mdns,
        "relay_service": relay_service,
        "relay": relay,
    }
    if not home.is_dir():
        raise ConfigError(f"{home} does not exist; create it with `p2pfl node init --home {home}`")
    config = load_config(home, flags)
    problem = writable_problem(home)
    if problem is not None:
        raise ConfigError(
            f"cannot write in {home} ({problem}); the node keeps its log, control socket and "
            "checkpoints there: make it writable (e.g. chmod u+w, or remount read-write) or "
            "use another --home"
        )
    use_torch()
    import trio

    from p2pfl.daemon.identity import load_or_create_identity
    from p2pfl.daemon.node import NodeDaemon

    handlers = _setup_logging(home)
    try:
        key_pair = load_or_create_identity(config.key_file)
        daemon = NodeDaemon(config, key_pair)
        trio.run(daemon.run, lambda addrs: _print_listening(daemon, addrs, as_json))
    except P2pflError as exc:  # the CLI prints it and exits; the node's log keeps it too
        _write_to_log_file(handlers, exc)
        raise
    finally:
        _remove_logging(handlers)


def _print_listening(daemon: NodeDaemon, addrs: list[str], as_json: bool) -> None:
    if as_json:
        fields = {"peer_id": daemon.peer_id, "listen_addrs": addrs, "home": str(daemon.config.home)}
        print(json.dumps({**fields, "dashboard_url": daemon.dashboard_url}), flush=True)
        return
    for addr in addrs:
        print(addr, flush=True)


def _setup_logging(home: Path) -> list[logging.Handler]:
    """Send INFO and above of p2pfl to stderr and DIR/node.log, and py-libp2p's warnings
    there too, one line each; return the new handlers."""
    from p2pfl.daemon.logformat import LogFile, condense_library_logs

    root = logging.getLogger("p2pfl")
    root.setLevel(logging.INFO)
    root.propagate = False
    formatter = logging.Formatter(LOG_FORMAT)
    handlers: list[logging.Handler] = [
        logging.StreamHandler(sys.stderr),
        LogFile(home / "node.log"),
    ]
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    return handlers + condense_library_logs(handlers, LOG_FORMAT)


def _write_to_log_file(handlers: list[logging.Handler], exc: Exception) -> None:
    """Record ``exc`` in DIR/node.log only (the CLI prints it on stderr)."""
    file_handler = next(h for h in handlers if isinstance(h, logging.FileHandler))
    file_handler.handle(
        logging.LogRecord("p2pfl.daemon", logging.ERROR, __file__, 0, "%s", (exc,), None)
    )


def _remove_logging(handlers: list[logging.Handler]) -> None:
    """Undo ``_setup_logging`` (matters when the CLI runs in-process, e.g. in tests)."""
    root = logging.getLogger("p2pfl")
    for handler in handlers:
        root.removeHandler(handler)
        logging.getLogger("libp2p").removeHandler(handler)
        handler.close()
    root.propagate = True
    root.setLevel(logging.NOTSET)


@app.command()
def status(
    home: Path = HOME,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Show the running node's peers, progress, traffic and accuracy."""
    reply = request(home, "status")
    if as_json:
        print_json(reply)
        return
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in reply.items():
        if key == "communities" and isinstance(value, list):
            value = "\n".join(_community_line(entry) for entry in value) or "-"
        elif isinstance(value, list):
            value = "\n".join(map(str, value)) or "-"
        elif isinstance(value, float):
            value = f"{value:.4f}"
        elif isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        table.add_row(key, str(value))
    Console().print(table)


def _community_line(entry: dict[str, Any]) -> str:
    """One community of the status reply on one line."""
    return (
        f"{entry['name']} ({entry['id'][:12]}): {len(entry['members'])} members, "
        f"{entry['syncs']} syncs, sent {entry['bytes_sent']:,} B, "
        f"received {entry['bytes_received']:,} B, rejected {entry['rejected']}"
    )


@app.command()
def stop(
    home: Path = HOME,
    timeout: float = typer.Option(30.0, "--timeout", help="Seconds to wait for the exit."),
) -> None:
    """Stop the running node gracefully (it writes a final checkpoint)."""
    request(home, "stop")
    deadline = time.monotonic() + timeout
    while socket_path(home).exists():
        if time.monotonic() > deadline:
            raise ControlError(f"the node in {home} did not stop within {timeout:.0f} s")
        time.sleep(0.1)
    print("stopped")
