"""Scenario files (TOML) and their validation; command-line flags override file values.

A scenario either runs ``protocols`` side by side over the whole model and one graph, or
declares ``[[communities]]``: each has a ``name``, ``members`` (node indices, or ranges such as
``"0-11"``), the parameters it ``shared`` (name globs, e.g. ``["fc1.*"]``), a ``protocol``
(default ``dynamic``) and a ``topology`` among its members (default ``complete`` up to 8
members, else ``small-world:k=4,p=0.2``); optionally ``admission`` (``invite`` or ``open``:
members run the membership protocol, founded by the first member) and ``uninvited`` (members
holding a forged invite, whom the others refuse). Such a scenario runs "alone" against
"communities".
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pfl.errors import P2pflError
from p2pfl.learning.schedule import parse_lr_schedule
from p2pfl.protocol.config import parse_protocol
from p2pfl.spec import SpecError


class ScenarioError(P2pflError, ValueError):
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


COMMUNITY_KEYS = ("name", "members", "shared", "protocol", "topology", "admission", "uninvited")
ADMISSIONS = ("open", "invite")
SMALL_COMMUNITY = 8
PER_COMMUNITY = "(per community)"
COMMUNITY_RUNS = ("alone", "communities")


@dataclass(frozen=True)
class CommunityConfig:
    """One community of a scenario: its members sync the ``shared`` part of their models."""

    name: str
    members: tuple[int, ...]
    shared: tuple[str, ...]
    protocol: str = "dynamic"
    topology: str = "complete"
    admission: str | None = None
    """None: members are wired to their neighbours from the start; ``open`` or ``invite``:
    they run the membership protocol first (``p2pfl.simulator.admission``)."""
    uninvited: tuple[int, ...] = ()
    """Members without a valid invite (they hold a forged one); only with ``invite``."""


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
    lr_schedule: str = "constant"
    """Learning-rate schedule (``p2pfl.learning.schedule``); cosine runs over ``steps``."""
    momentum: float = 0.0
    seed: int = 0
    eval_every: int = 50
    learner: str = "batched"
    allow_disconnected: bool = False
    data_poor_max: int = 50
    """Nodes with at most this many train samples count as data-poor in community summaries."""
    network: NetworkConfig = field(default_factory=NetworkConfig)
    communities: tuple[CommunityConfig, ...] = ()
    byzantine: str = ""
    """``K:ATTACK``: K nodes (chosen by the seed) lie (see ``p2pfl.protocol.byzantine``)."""

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
    tables = raw.pop("communities", [])
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
    communities = _communities(tables)
    if communities:
        for key in ("protocols", "topology"):
            if key in values:
                raise ScenarioError(
                    f"scenario key {key!r} does not apply with [[communities]]: give each "
                    f"community its own {key.removesuffix('s')!r} key instead"
                )
        values |= {"protocols": COMMUNITY_RUNS, "topology": PER_COMMUNITY}
    scenario = Scenario(**values, network=network, communities=communities)
    _validate(scenario)
    return scenario


def _communities(tables: Any) -> tuple[CommunityConfig, ...]:
    """Parse the ``[[communities]]`` tables (node ranges are checked in ``_validate``)."""
    if not isinstance(tables, list | tuple) or not all(isinstance(t, dict) for t in tables):
        raise ScenarioError(
            "scenario key 'communities' must be a list of tables: write [[communities]] "
            "with name, members, shared (and optionally protocol, topology)"
        )
    parsed: list[CommunityConfig] = []
    for i, table in enumerate(tables):
        where = f"communities[{i}]" + (f" ({table['name']!r})" if "name" in table else "")
        unknown = sorted(set(table) - set(COMMUNITY_KEYS))
        if unknown:
            raise ScenarioError(
                f"{where}: unknown key(s) {unknown}; known: {', '.join(COMMUNITY_KEYS)}"
            )
        for key in ("name", "members", "shared"):
            if key not in table:
                raise ScenarioError(f"{where}: missing key {key!r}; {_COMMUNITY_HINTS[key]}")
        name = table["name"]
        if not isinstance(name, str) or not name.strip():
            raise ScenarioError(f"{where}: 'name' must be a non-empty string")
        if any(c.name == name for c in parsed):
            raise ScenarioError(f"{where}: community name {name!r} is used twice; rename one")
        members = _members(where, table["members"])
        shared = table["shared"]
        shared = [shared] if isinstance(shared, str) else shared
        if (
            not isinstance(shared, list)
            or not shared
            or not all(isinstance(g, str) and g for g in shared)
        ):
            raise ScenarioError(f"{where}: 'shared' {_COMMUNITY_HINTS['shared']}")
        protocol = table.get("protocol", "dynamic")
        topology = table.get("topology")
        if topology is None:
            topology = "complete" if len(members) <= SMALL_COMMUNITY else "small-world:k=4,p=0.2"
        if not isinstance(protocol, str) or not isinstance(topology, str):
            raise ScenarioError(f"{where}: 'protocol' and 'topology' are spec strings")
        try:
            config = parse_protocol(protocol)
        except SpecError as exc:
            raise ScenarioError(f"{where}: protocol {exc}") from None
        if config.kind == "none":
            raise ScenarioError(
                f"{where}: protocol 'none' shares nothing; pick a syncing protocol such as "
                "'dynamic' or 'periodic:b=10', or drop the community"
            )
        admission, uninvited = _admission(where, table, members)
        parsed.append(
            CommunityConfig(name, members, tuple(shared), protocol, topology, admission, uninvited)
        )
    return tuple(parsed)


def _admission(
    where: str, table: dict[str, Any], members: tuple[int, ...]
) -> tuple[str | None, tuple[int, ...]]:
    """A community's ``admission`` and ``uninvited`` keys."""
    admission = table.get("admission")
    if admission is not None and admission not in ADMISSIONS:
        raise ScenarioError(
            f"{where}: 'admission' must be 'invite' or 'open' (members run the membership "
            "protocol first), or absent (members are wired from the start)"
        )
    uninvited = _members(where, table["uninvited"], "uninvited", 1) if "uninvited" in table else ()
    if uninvited and admission != "invite":
        raise ScenarioError(
            f"{where}: 'uninvited' needs admission = \"invite\" (an open community admits anyone)"
        )
    outside = sorted(set(uninvited) - set(members))
    if outside:
        raise ScenarioError(f"{where}: 'uninvited' nodes {outside} are not in 'members'")
    if members and set(uninvited) >= {members[0]}:
        raise ScenarioError(
            f"{where}: its first member ({members[0]}) founds it and cannot be uninvited"
        )
    return admission, uninvited


_COMMUNITY_HINTS = {
    "name": 'e.g. name = "vision"',
    "members": 'node indices, e.g. members = [0, 3, 5] or members = "0-11" or "0-5,12-17"',
    "shared": 'must list parameter name globs, e.g. shared = ["fc1.*"] (the model\'s layers '
    "are fc1, fc2, ..., head)",
}


def _members(where: str, raw: Any, key: str = "members", least: int = 2) -> tuple[int, ...]:
    """Node indices from a list of ints or a string of ranges such as ``"0-5,12,14-17"``."""
    hint = _COMMUNITY_HINTS["members"]
    nodes: list[int] = []
    if isinstance(raw, str):
        for item in raw.split(","):
            first, dash, last = item.strip().partition("-")
            if not (first.strip().isdigit() and (not dash or last.strip().isdigit())):
                raise ScenarioError(f"{where}: '{key}' {raw!r} is not understood; {hint}")
            low, high = int(first), int(last) if dash else int(first)
            if high < low:
                raise ScenarioError(f"{where}: '{key}' range {item.strip()!r} runs backwards")
            nodes.extend(range(low, high + 1))
    elif isinstance(raw, list) and all(isinstance(n, int) and not isinstance(n, bool) for n in raw):
        nodes = list(raw)
    else:
        raise ScenarioError(f"{where}: '{key}' {raw!r} is not understood; {hint}")
    if len(set(nodes)) != len(nodes):
        raise ScenarioError(f"{where}: '{key}' lists a node twice; list each node once")
    if len(nodes) < least:
        what = "a community needs at least 2 members" if key == "members" else f"{key!r} is empty"
        raise ScenarioError(f"{where}: {what}, got {len(nodes)}")
    return tuple(sorted(nodes))


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
        (0 <= s.seed < 2**32, "seed must be in [0, 2**32)"),
        (s.batch_size >= 1, "batch_size must be >= 1"),
        (s.lr > 0, "lr must be > 0"),
        (0 <= s.momentum < 1, "momentum must be in [0, 1)"),
        (s.eval_every >= 1, "eval_every must be >= 1"),
        (s.learner in ("batched", "per-node"), "learner must be 'batched' or 'per-node'"),
        (len(s.protocols) >= 1, "give at least one protocol"),
        (s.data_poor_max >= 0, "data_poor_max must be >= 0"),
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
    try:
        parse_lr_schedule(s.lr_schedule)
    except SpecError as exc:
        raise ScenarioError(f"lr_schedule {exc}") from None
    from p2pfl.protocol.byzantine import parse_byzantine  # imports torch: not at CLI start

    try:
        parse_byzantine(s.byzantine, s.nodes)
    except SpecError as exc:
        raise ScenarioError(str(exc)) from None
    for i, community in enumerate(s.communities):
        outside = [n for n in community.members if not 0 <= n < s.nodes]
        if outside:
            raise ScenarioError(
                f"communities[{i}] ({community.name!r}): member {outside[0]} is out of range: "
                f"nodes are 0..{s.nodes - 1}; list only nodes below nodes={s.nodes} or raise nodes"
            )
    if s.communities:
        return
    for text in s.protocols:
        try:
            parse_protocol(text)
        except SpecError as exc:
            raise ScenarioError(f"protocol {exc}") from None
