"""Sync channels: which part of the model a group of nodes syncs, over which graph, under
which protocol. The plain simulation is one channel (the whole model, the scenario graph);
a scenario with communities has one channel per community, each sharing only its globs, and
with its admission (``admission.py``) if the community declares one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import networkx as nx
from torch import nn

from p2pfl.community.sharing import SharedPart, SharingError, check_disjoint, shared_part
from p2pfl.learning.params import ParamSchema
from p2pfl.models import local_parameters
from p2pfl.protocol.config import ProtocolConfig, parse_protocol
from p2pfl.runtime import WHOLE_MODEL_CHANNEL
from p2pfl.simulator.admission import ChannelAdmission, channel_admission
from p2pfl.simulator.scenario import CommunityConfig, ScenarioError
from p2pfl.spec import SpecError
from p2pfl.topology import build_topology

COMMUNITY_SEED_STRIDE = 1_000


@dataclass(frozen=True)
class Channel:
    """The members of ``graph`` (global node indices) sync ``part`` of their models with their
    neighbours in ``graph`` under ``protocol``."""

    name: str
    graph: nx.Graph
    part: SharedPart
    protocol: ProtocolConfig
    admission: ChannelAdmission | None = None
    """The community's manifest and invites if its members run the membership protocol."""

    @property
    def members(self) -> list[int]:
        return sorted(self.graph.nodes)


def whole_model_channel(graph: nx.Graph, model: nn.Module, protocol: str) -> Channel:
    """Every node of ``graph`` syncs its whole model (but what ``local=`` keeps): the plain
    simulation."""
    config = parse_protocol(protocol)
    part = shared_part(ParamSchema.from_module(model), ["*"], local_parameters(model, config.local))
    return Channel(WHOLE_MODEL_CHANNEL, graph, part, config)


class ModelInfo(NamedTuple):
    """What a community's manifest says of the model: its spec, inputs and classes."""

    spec: str
    input_shape: tuple[int, ...]
    classes: int


def community_channels(
    communities: Sequence[CommunityConfig],
    schema: ParamSchema,
    nodes: int,
    seed: int,
    allow_disconnected: bool = False,
    model: ModelInfo | None = None,
    module: nn.Module | None = None,
) -> list[Channel]:
    """One channel per community; a node in several communities must share disjoint parts.
    Communities with ``admission`` get a manifest signed for ``model``; ``module`` (the
    model itself) names what a community's ``local=`` keeps on the node.

    Raises ``ScenarioError`` naming the community and key to fix."""
    channels = []
    for i, community in enumerate(communities):
        where = f"communities[{i}] ({community.name!r})"
        protocol = parse_protocol(community.protocol)
        local = local_parameters(module, protocol.local) if module is not None else []
        try:
            part = shared_part(schema, community.shared, local)
        except SharingError as exc:
            raise ScenarioError(f"{where}, key 'shared': {exc}") from None
        try:
            local = build_topology(
                community.topology,
                len(community.members),
                seed + COMMUNITY_SEED_STRIDE * (i + 1),
                allow_disconnected,
            )
        except SpecError as exc:
            raise ScenarioError(f"{where}, key 'topology': {exc}") from None
        graph = nx.relabel_nodes(local, dict(enumerate(community.members)))
        admission = None
        if community.admission is not None:
            if model is None:
                raise ValueError("a community with admission needs the model's ModelInfo")
            admission = channel_admission(community, part, *model, seed)
        channels.append(Channel(community.name, graph, part, protocol, admission))
    for node in range(nodes):
        mine = [(repr(c.name), c.part) for c in channels if node in c.graph]
        try:
            check_disjoint(mine)
        except SharingError as exc:
            raise ScenarioError(
                f"node {node} is in several communities whose 'shared' globs overlap: {exc}"
            ) from None
    return channels


def union_graph(channels: Sequence[Channel], nodes: int) -> nx.Graph:
    """All nodes, and an edge wherever some channel links two of them (the network's links)."""
    graph = nx.Graph()
    graph.add_nodes_from(range(nodes))
    for channel in channels:
        graph.add_edges_from(channel.graph.edges)
    return graph
