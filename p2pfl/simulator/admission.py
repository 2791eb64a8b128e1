"""Admission in simulated communities: the daemon's membership protocol
(``p2pfl.protocol.admission``) over the simulated links.

A community with ``admission = "invite"`` (or ``"open"``) gets a real signed manifest, founded
by its first member. Every member has an Ed25519 identity derived from the scenario seed
(``node_identity``); invited members hold an invite from the founder, ``uninvited`` members a
forged one (signed with their own key). Members start knowing nobody: at the first tick each
greets its neighbours in the community's graph, hellos travel over the simulated network with
their real size, and a core hears of a neighbour only once the hello admits it. A member never
sends the community's part to a peer it has not admitted, and a frame from such a peer is
refused (and counted) before it reaches the core: refused peers exchange no model bytes.

Admission runs on unix time (invites expire on it): the simulated clock from ``SIM_EPOCH``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair

from p2pfl.community.invite import HeldInvite, Invite, issue_invite
from p2pfl.community.manifest import Manifest, sign_manifest
from p2pfl.community.sharing import SharedPart
from p2pfl.peers import peer_id_of
from p2pfl.protocol.admission import Admission, Gate, RefusalNotices
from p2pfl.wire.community import Hello

if TYPE_CHECKING:
    import networkx as nx

    from p2pfl.simulator.scenario import CommunityConfig

SIM_EPOCH = 1_767_225_600.0
"""Unix time of simulated time 0 (2026-01-01 00:00 UTC)."""


def node_identity(seed: int, node: int) -> KeyPair:
    """Simulated node ``node``'s Ed25519 key pair under the run's ``seed``."""
    return create_new_key_pair(hashlib.sha256(f"p2pfl-sim:{seed}:{node}".encode()).digest())


@dataclass(frozen=True)
class ChannelAdmission:
    """A simulated community's signed manifest and what each member holds to prove it."""

    manifest: Manifest
    peer_ids: dict[int, str]
    """Member -> peer id."""
    invites: dict[int, HeldInvite | None]
    """Member -> its invite (None: the founder, or any member of an open community)."""
    uninvited: tuple[int, ...]


def channel_admission(
    config: CommunityConfig,
    part: SharedPart,
    model: str,
    input_shape: Sequence[int],
    classes: int,
    seed: int,
) -> ChannelAdmission:
    """The manifest of ``config`` (founded by its first member) and its members' invites."""
    assert config.admission is not None
    keys = {i: node_identity(seed, i) for i in config.members}
    founder = config.members[0]
    manifest = sign_manifest(
        keys[founder],
        f"community {config.name!r}",
        name=config.name,
        description="simulated community",
        model=model,
        input_shape=tuple(input_shape),
        classes=classes,
        shared=config.shared,
        schema=part.schema,
        protocol=config.protocol,
        admission=config.admission,
        created=int(SIM_EPOCH),
    )
    peer_ids = {i: peer_id_of(key.public_key) for i, key in keys.items()}
    invites: dict[int, HeldInvite | None] = {}
    for i in config.members:
        if i == founder or config.admission == "open":
            invites[i] = None
        elif i in config.uninvited:
            invites[i] = _forged_invite(manifest, keys[i])
        else:
            invites[i] = issue_invite(manifest, keys[founder], peer_ids[i], None)
    return ChannelAdmission(manifest, peer_ids, invites, config.uninvited)


def _forged_invite(manifest: Manifest, key: KeyPair) -> HeldInvite:
    """An invite that claims the founder issued it, signed with ``key`` instead."""
    invite_keys = create_new_key_pair()
    public = invite_keys.public_key.to_bytes()
    unsigned = Invite(manifest.id, manifest.founder, None, None, public, b"")
    signature = key.private_key.sign(unsigned.signed_bytes())
    invite = dataclasses.replace(unsigned, signature=signature)
    return HeldInvite(invite, invite_keys.private_key.to_bytes())


class GateHost(Protocol):
    """What the simulation does for the gates of channel ``channel``'s member ``node``."""

    def core_peer_up(self, now: float, channel: int, node: int, peer: int) -> None: ...

    def core_peer_down(self, now: float, channel: int, node: int, peer: int) -> None: ...

    def send_hello(self, now: float, channel: int, src: int, dst: int, hello: Hello) -> None: ...


class SimGates:
    """The ``Gate`` of every member of every channel with admission (``gates[c]`` is empty for
    channels without): the simulation asks them what to send and let through."""

    def __init__(
        self,
        admissions: Sequence[ChannelAdmission | None],
        graphs: Sequence[nx.Graph],
        host: GateHost,
    ) -> None:
        self.admissions, self.graphs, self.host = admissions, graphs, host
        self.refused = [0] * len(admissions)
        """Refused hellos and frames, per channel (frames counted by the caller of ``frame``)."""
        self.gates: list[dict[int, Gate]] = []
        self.node_of: list[dict[str, int]] = []
        """Per channel: peer id -> node."""
        notices: dict[int, RefusalNotices] = {}  # one per node, as in a daemon
        for c, admission in enumerate(admissions):
            gates: dict[int, Gate] = {}
            node_of: dict[str, int] = {}
            if admission is not None:
                node_of = {peer: node for node, peer in admission.peer_ids.items()}
                for node, peer_id in admission.peer_ids.items():
                    core = Admission(
                        admission.manifest,
                        peer_id,
                        admission.invites[node],
                        notices.setdefault(node, RefusalNotices()),
                    )
                    link = _Link(self, c, node)
                    gates[node] = Gate(core, link, link, lambda p, n=node_of: str(n[p]))
            self.gates.append(gates)
            self.node_of.append(node_of)

    def gated(self, channel: int) -> bool:
        return bool(self.gates[channel])

    def start(self, now: float) -> None:
        """Every member greets its neighbours in its channel's graph."""
        for c, gates in enumerate(self.gates):
            for node, gate in gates.items():
                for peer in sorted(self.graphs[c].neighbors(node)):
                    gate.greet(SIM_EPOCH + now, self._peer(c, peer))

    def hello(self, now: float, channel: int, src: int, dst: int, hello: Hello) -> None:
        self.gates[channel][dst].hello(SIM_EPOCH + now, self._peer(channel, src), hello)

    def frame(self, now: float, channel: int, src: int, dst: int) -> str | None:
        """Why ``dst`` refuses a sync frame from ``src`` (None: it may pass; always, without
        admission). The caller counts the refusal in ``refused``."""
        gate = self.gates[channel].get(dst)
        return None if gate is None else gate.frame(SIM_EPOCH + now, self._peer(channel, src))

    def admits(self, channel: int, src: int, dst: int) -> bool:
        """May ``src`` send its part to ``dst`` (always, without admission)?"""
        gate = self.gates[channel].get(src)
        return gate is None or gate.admits(self._peer(channel, dst))

    def went_down(self, now: float, channel: int, node: int) -> None:
        """``node`` went offline: its connections to its neighbours end, on both sides."""
        gates, at = self.gates[channel], SIM_EPOCH + now
        for peer in self.graphs[channel].neighbors(node):
            gates[peer].disconnected(at, self._peer(channel, node))
            gates[node].disconnected(at, self._peer(channel, peer))

    def came_up(self, now: float, channel: int, node: int) -> None:
        """``node`` is back: it and its neighbours say hello again."""
        for peer in sorted(self.graphs[channel].neighbors(node)):
            self.gates[channel][node].greet(SIM_EPOCH + now, self._peer(channel, peer))

    def _peer(self, channel: int, node: int) -> str:
        admission = self.admissions[channel]
        assert admission is not None
        return admission.peer_ids[node]


class _Link:
    """One member's gate driver and core events in one channel, as simulation callbacks."""

    __slots__ = ("gates", "channel", "node")

    def __init__(self, gates: SimGates, channel: int, node: int) -> None:
        self.gates, self.channel, self.node = gates, channel, node

    def peer_up(self, now: float, peer: str) -> None:
        self.gates.host.core_peer_up(now - SIM_EPOCH, self.channel, self.node, int(peer))

    def peer_down(self, now: float, peer: str) -> None:
        self.gates.host.core_peer_down(now - SIM_EPOCH, self.channel, self.node, int(peer))

    def send_hello(self, now: float, to: str, hello: Hello) -> None:
        dst = self.gates.node_of[self.channel][to]
        self.gates.host.send_hello(now - SIM_EPOCH, self.channel, self.node, dst, hello)

    def refused(self, now: float, peer: str, reason: str) -> None:
        self.gates.refused[self.channel] += 1
