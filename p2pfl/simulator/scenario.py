"""Scenario files (TOML) and their validation; command-line flags override file values."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pfl.protocol.config import parse_protocol
from p2pfl.spec import SpecError


class ScenarioError(ValueError):
    """A scenario file or flag is invalid; the message names the key and the fix."""


@dataclass(frozen=True)
class NetworkConfig:
    """The simulated network and machines. Times in seconds, bandwidth in bytes/s."""

    step_time: float = 0.01
    latency: float = 0.002
    jitter: float = 0.0
    bandwidth: float = 125e6
    loss: float = 0.0
    speed_spread: float = 0.0
    churn: float = 0.0
    rejoin: float = 0.05


@dataclass(frozen=True)
class Scenario:
    """One experiment: data, model, graph and the protocols to compare on them."""

    nodes: int = 16
    topology: str = "small-world:k=4,p=0.2"
    dataset: str = "digits"
    partition: str = "iid"
    model: str = "mlp"
    protocols: tuple[str, ...] = ("none", "continuous", "periodic:b=10", "dynamic")
    steps: int = 1000
    batch_size: int = 16
    lr: float = 0.1
    momentum: float = 0.0
    seed: int = 0
    eval_every: int = 50
    learner: str = "batched"
    allow_disconnected: bool = False
    network: NetworkConfig = field(default_factory=NetworkConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FIELDS = {f.name: f for f in dataclasses.fields(Scenario)}
_NET_FIELDS = {f.name: f for f in dataclasses.fields(NetworkConfig)}


def load_scenario(path: Path | None, overrides: dict[str, Any]) -> Scenario:
    """Read ``path`` (if any), apply non-None ``overrides`` and validate the result."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ScenarioError(f"scenario file {path} not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ScenarioError(f"scenario file {path} is not valid TOML: {exc}") from None
    raw.update({k: v for k, v in overrides.items() if v is not None and v != ()})
    net = raw.pop("network", {})
    unknown = sorted(set(raw) - set(_FIELDS)) + [
        f"network.{k}" for k in set(net) - set(_NET_FIELDS)
    ]
    if unknown:
        raise ScenarioError(
            f"unknown scenario key(s) {unknown}; known: {', '.join(sorted(_FIELDS))}, "
            f"network.{{{', '.join(sorted(_NET_FIELDS))}}}"
        )
    values = {k: _coerce(k, _FIELDS[k].type, v) for k, v in raw.items()}
    network = NetworkConfig(**{k: _coerce(f"network.{k}", "float", v) for k, v in net.items()})
    scenario = Scenario(**values, network=network)
    _validate(scenario)
    return scenario


def _coerce(key: str, kind: object, value: Any) -> Any:
    text = str(kind)
    try:
        if "tuple" in text:
            items = [value] if isinstance(value, str) else list(value)
            return tuple(str(v) for v in items)
        if text == "int":
            if isinstance(value, bool) or int(value) != value:
                raise ValueError
            return int(value)
        if text == "float":
            return float(value)
        if text == "bool":
            if not isinstance(value, bool):
                raise ValueError
            return value
        return str(value)
    except (TypeError, ValueError):
        raise ScenarioError(f"scenario key {key!r}: {value!r} is not a valid {text}") from None


def _validate(s: Scenario) -> None:
    checks = [
        (s.nodes >= 1, "nodes must be >= 1"),
        (s.steps >= 1, "steps must be >= 1"),
        (s.batch_size >= 1, "batch_size must be >= 1"),
        (s.lr > 0, "lr must be > 0"),
        (0 <= s.momentum < 1, "momentum must be in [0, 1)"),
        (s.eval_every >= 1, "eval_every must be >= 1"),
        (s.learner in ("batched", "per-node"), "learner must be 'batched' or 'per-node'"),
        (len(s.protocols) >= 1, "give at least one protocol"),
        (s.network.step_time > 0, "network.step_time must be > 0"),
        (s.network.bandwidth > 0, "network.bandwidth must be > 0"),
        (0 <= s.network.loss < 1, "network.loss must be in [0, 1)"),
        (0 <= s.network.speed_spread < 1, "network.speed_spread must be in [0, 1)"),
        (0 <= s.network.churn <= 1 and 0 <= s.network.rejoin <= 1, "churn/rejoin are in [0, 1]"),
        (s.network.latency >= 0 and s.network.jitter >= 0, "latency/jitter must be >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ScenarioError(message)
    for text in s.protocols:
        try:
            parse_protocol(text)
        except SpecError as exc:
            raise ScenarioError(f"protocol {exc}") from None
