"""The node's settings: ``DIR/config.toml`` values, overridden by command-line flags.

Every value is checked here, before anything starts; a bad one raises ``ConfigError`` naming
the key, where it came from, and how to fix it.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pfl.errors import P2pflError
from p2pfl.learning.schedule import LRSchedule, parse_lr_schedule
from p2pfl.peers import parse_peer_address, tcp_listen_address
from p2pfl.protocol.config import ProtocolConfig, parse_protocol
from p2pfl.spec import SpecError, finite_number, whole_number

CONFIG_FILE = "config.toml"
KEY_FILE = "identity.key"

CONFIG_TEMPLATE = """\
# p2pfl node configuration. Command-line flags override these values.
# Uncomment a line to change its default.

# Address to listen on (TCP only; port 0 picks a free port).
# listen = "/ip4/127.0.0.1/tcp/0"

# Peers to join, as full addresses printed by `p2pfl node start`.
# bootstrap = ["/ip4/192.0.2.10/tcp/4001/p2p/12D3KooW..."]

# This node's data: a .npz file (arrays x, y) or a slice of a built-in set,
# e.g. "digits:part=3/8,alpha=0.5,seed=1" (node 3 of 8, Dirichlet label skew 0.5).
# data = "digits"

# Model architecture: logistic, mlp, mlp:hidden=64x32, cnn, or module:function.
# Every node of a network must use the same model (and seed, for a common start).
# model = "mlp"

# Sync protocol: none, continuous, periodic:b=10, gossip:b=5, dynamic, dynamic:rel=0.002,b=2.
# protocol = "dynamic"

# Local SGD steps to train (0 = until stopped); the node keeps serving its peers afterwards.
# steps = 0

# lr = 0.1
# batch_size = 32

# Learning-rate schedule over the node's own steps: constant, cosine[:min=0.01] (over
# `steps`, or cosine:steps=T when training until stopped), step:every=N,gamma=0.5,
# restarts:period=N (SGDR), each with warmup=W.
# lr_schedule = "constant"

# Seed of the model initialisation (keep it equal across the network); the node's own
# sampling is seeded from it and the node's peer id.
# seed = 0

# Seconds between two local steps.
# step_interval = 0.01

# Number of neighbours to keep connected: the node redials address-book peers below it.
# target_degree = 8

# Port of a Prometheus metrics endpoint on 127.0.0.1 (0 = off).
# metrics_port = 0

# Port of the dashboard, a web page on 127.0.0.1 showing the node's progress, peers and
# communities: "auto" (any free port), a number, or 0 = off. Its URL, with the access token
# kept in DIR/dashboard.token, is printed at start and by `p2pfl node status`.
# dashboard_port = "auto"

# Find peers on the local network with mDNS (only when listening on a non-loopback
# address, e.g. /ip4/0.0.0.0/tcp/4001); false turns it off.
# mdns = true

# Serve as a circuit relay: nodes behind NAT reserve a slot here and are reached through it.
# relay_service = false

# Relays this node reserves a slot on (full addresses of nodes running relay_service), so
# that peers can reach it behind a NAT at <relay address>/p2p-circuit.
# relay = ["/ip4/203.0.113.7/tcp/4001/p2p/12D3KooW..."]
"""


class ConfigError(P2pflError, ValueError):
    """A setting cannot be used; the message names the key, its source and the fix."""


@dataclass(frozen=True)
class NodeConfig:
    """Validated settings of one node daemon."""

    home: Path
    listen: str = "/ip4/127.0.0.1/tcp/0"
    bootstrap: tuple[str, ...] = ()
    data: str = "digits"
    model: str = "mlp"
    protocol: str = "dynamic"
    steps: int = 0
    lr: float = 0.1
    lr_schedule: str = "constant"
    batch_size: int = 32
    seed: int = 0
    step_interval: float = 0.01
    target_degree: int = 8
    metrics_port: int = 0
    dashboard_port: int | str = "auto"
    """A port on 127.0.0.1, "auto" for any free one, or 0 for no dashboard."""
    mdns: bool = True
    """Announce and find peers with mDNS when listening on a non-loopback address."""
    relay_service: bool = False
    """Relay for nodes behind NAT (circuit relay v2 hop)."""
    relay: tuple[str, ...] = ()
    """Relays to hold a reservation on (full peer addresses)."""
    protocol_config: ProtocolConfig = field(default=parse_protocol("dynamic"), compare=False)

    @property
    def schedule(self) -> LRSchedule:
        """The learning-rate schedule (a cosine without its own length spans ``steps``)."""
        return parse_lr_schedule(self.lr_schedule).with_horizon(self.steps)

    @property
    def key_file(self) -> Path:
        return self.home / KEY_FILE


def _str(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a non-empty string")
    return value.strip()


def _listen(value: Any) -> str:
    text = _str(value)
    tcp_listen_address(text)
    return text


def _peer_addr(value: Any) -> str:
    text = _str(value)
    try:
        parse_peer_address(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a full peer address; copy the /ip4/<ip>/tcp/<port>/p2p/<peer id> "
            "line another node printed at start"
        ) from None
    return text


def _bootstrap(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple):
        raise ValueError("must be a list of peer addresses")
    return tuple(_peer_addr(v) for v in value)


def _dashboard_port(value: Any) -> int | str:
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return "auto"
        if text == "off":
            return 0
        if not text.isdigit():
            raise ValueError(f"must be 'auto', 'off' or a port number, got {value!r}")
        value = int(text)
    return whole_number(0, 65535)(value)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {value!r}")
    return value


def _protocol(value: Any) -> str:
    text = _str(value)
    if parse_protocol(text).local:
        raise ValueError(
            "local= is not supported for a node's whole-model protocol yet; to keep BatchNorm "
            "layers on the node, share the rest through a community (its shared globs, or "
            "local=bn in its policy), or use the simulator"
        )
    return text


def _lr_schedule(value: Any) -> str:
    text = _str(value)
    parse_lr_schedule(text)
    return text


CHECKS: dict[str, Callable[[Any], Any]] = {
    "listen": _listen,
    "bootstrap": _bootstrap,
    "data": _str,
    "model": _str,
    "protocol": _protocol,
    "steps": whole_number(0),
    "lr": finite_number(positive=True),
    "lr_schedule": _lr_schedule,
    "batch_size": whole_number(1),
    "seed": whole_number(0, 2**63 - 1),
    "step_interval": finite_number(positive=True),
    "target_degree": whole_number(1),
    "metrics_port": whole_number(0, 65535),
    "dashboard_port": _dashboard_port,
    "mdns": _bool,
    "relay_service": _bool,
    "relay": _bootstrap,
}
"""Every key a config file or flag may set, with its converter (raises ValueError)."""


def write_template(home: Path) -> Path:
    """Create ``home`` (0700) and its commented config template unless one exists."""
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = home / CONFIG_FILE
    if not path.exists():
        path.write_text(CONFIG_TEMPLATE)
    return path


def load_config(home: Path, flags: Mapping[str, Any] | None = None) -> NodeConfig:
    """Read ``home/config.toml`` (if any), apply the non-None ``flags``, validate everything."""
    path = home / CONFIG_FILE
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if path.exists():
        try:
            values = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"{path}: not valid TOML ({exc}); fix the file or re-create it "
                "with `p2pfl node init`"
            ) from None
        sources = {key: str(path) for key in values}
    unknown = sorted(set(values) - set(CHECKS))
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r}; known keys: {', '.join(CHECKS)}")
    for key, value in (flags or {}).items():
        if value is None or value == () or value == []:
            continue
        values[key] = value
        sources[key] = f"--{key.replace('_', '-')}"
    checked: dict[str, Any] = {}
    for key, value in values.items():
        try:
            checked[key] = CHECKS[key](value)
        except (ValueError, SpecError) as exc:
            raise ConfigError(f"bad value for {key!r} (from {sources[key]}): {exc}") from None
    protocol = parse_protocol(checked.get("protocol", NodeConfig.protocol))
    config = NodeConfig(home=home, protocol_config=protocol, **checked)
    schedule = parse_lr_schedule(config.lr_schedule)
    if schedule.kind == "cosine" and schedule.steps is None and not config.steps:
        raise ConfigError(
            f"bad value for 'lr_schedule' (from {sources['lr_schedule']}): a cosine schedule "
            "needs a length: set steps, or write cosine:steps=T"
        )
    return config
