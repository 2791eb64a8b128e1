"""Admission to a community, sans-I/O: which peers may sync the community's part with this
node. The same object runs in the daemon (over libp2p) and in the simulator (over its links).

``Admission`` is the membership protocol of one community at one node. Events in: ``greet``
(a peer to say hello to: connected, announced or a bootstrap member), ``on_hello`` (a peer's
hello, answer or refusal), ``on_frame`` (a sync frame arrived: may it pass?),
``on_disconnected`` (the connection closed or a send failed) and ``leave``. Actions out:
``SendHello`` (a hello, answer or refusal notice to send), ``Admitted`` and ``Dropped`` and
``Refused`` (a hello or frame refused: count it; hellos are logged here, frames by the
driver, which also refuses frames it cannot decode).

``Gate`` carries out those actions for a driver: the community's core hears only of admitted
peers (``Admitted``/``Dropped`` become its ``peer_up``/``peer_down``), a sync frame passes
only if ``frame`` says so, and the driver sends the community's part only to peers ``admits``
names (a send to anyone else fails), so the part never goes to a non-member.

The rule is ``check_credential``: a hello's credential must prove membership with a proof
bound to the sender (the connection's authenticated peer id) and to this node. Its result is
cached with the peer until the invite expires (or the peer's hello, connection or refusal
ends it), so a sync frame costs a dictionary lookup, not two signature checks; a repeated
hello with the same credential is not verified again either. Admission lasts as long as the
connection and the invite: the first frame after the expiry drops the peer.

Refusals are answered with the reason (a hello with ``refused``) at most once per
``REFUSAL_EVERY_S`` per peer and community (``RefusalNotices``, one per node), so a peer that
keeps sending cannot make this node talk as much.

Time (``now``) is unix seconds, the clock invites expire on; the simulator passes its virtual
clock from a fixed epoch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from p2pfl.community import CommunityError
from p2pfl.community.fields import format_time
from p2pfl.community.invite import HeldInvite, check_credential
from p2pfl.community.manifest import Manifest
from p2pfl.wire.community import LEFT, MAX_REASON_CHARS, Hello

log = logging.getLogger("p2pfl.admission")

REFUSAL_EVERY_S = 10.0
"""At most one refusal notice per peer and community every 10 s."""
MAX_REFUSALS_REMEMBERED = 1024
NOT_A_MEMBER = "this node is not a member of that community"


@dataclass(frozen=True)
class SendHello:
    """Send ``hello`` to peer ``to`` on the hello protocol."""

    to: str
    hello: Hello


@dataclass(frozen=True)
class Admitted:
    """``peer`` proved its membership: the community's core may sync with it."""

    peer: str


@dataclass(frozen=True)
class Dropped:
    """``peer`` is no longer admitted (left, refused us, disconnected, invite expired)."""

    peer: str


@dataclass(frozen=True)
class Refused:
    """A hello or frame from ``peer`` was refused for ``reason`` (already logged)."""

    peer: str
    reason: str


AdmissionAction = SendHello | Admitted | Dropped | Refused


class RefusalNotices:
    """One node's refusal notices, rate-limited per peer and community."""

    def __init__(self, every_s: float = REFUSAL_EVERY_S) -> None:
        self.every_s = every_s
        self._last: dict[tuple[str, str], float] = {}

    def notice(self, now: float, peer: str, community: str, reason: str) -> list[SendHello]:
        """The notice telling ``peer`` why ``community`` refuses it, unless one went out less
        than ``every_s`` ago."""
        if len(self._last) > MAX_REFUSALS_REMEMBERED:
            self._last = {k: t for k, t in self._last.items() if now - t < self.every_s}
        if now - self._last.get((peer, community), -self.every_s) < self.every_s:
            return []
        self._last[(peer, community)] = now
        notice = Hello(community, answer=True, refused=reason[:MAX_REASON_CHARS])
        return [SendHello(peer, notice)]


@dataclass
class _Member:
    credential: bytes | None
    until: float
    """Unix seconds after which the credential no longer admits the peer."""


@dataclass
class Admission:
    """Admission to ``manifest``'s community at node ``me``, which proves its own membership
    with ``invite`` (None: the founder, or an open community)."""

    manifest: Manifest
    me: str
    invite: HeldInvite | None
    notices: RefusalNotices = field(default_factory=RefusalNotices)
    greeted: set[str] = field(default_factory=set, init=False)
    """Peers we said hello to on their current connection."""
    _members: dict[str, _Member] = field(default_factory=dict, init=False, repr=False)

    @property
    def community(self) -> str:
        return self.manifest.id

    @property
    def label(self) -> str:
        return f"{self.manifest.name!r} ({self.community[:12]})"

    @property
    def admitted(self) -> dict[str, bytes | None]:
        """Admitted peers with the credential they presented."""
        return {peer: m.credential for peer, m in self._members.items()}

    def is_admitted(self, peer: str) -> bool:
        return peer in self._members

    def credential_for(self, peer: str) -> bytes | None:
        """What this node shows ``peer``: a proof bound to both peer ids (None if no invite
        is needed)."""
        return None if self.invite is None else self.invite.prove(self.me, peer)

    # ------------------------------------------------------------------------------ events

    def greet(self, now: float, peer: str) -> list[AdmissionAction]:
        """Say hello to ``peer``, once per connection."""
        if peer == self.me or peer in self.greeted or peer in self._members:
            return []
        self.greeted.add(peer)
        return [SendHello(peer, Hello(self.community, self.credential_for(peer)))]

    def on_hello(self, now: float, peer: str, hello: Hello) -> list[AdmissionAction]:
        """``peer`` (authenticated by the connection) said ``hello`` for this community."""
        if hello.refused is not None:
            if hello.refused == LEFT:
                log.info("member %s left community %s", peer, self.label)
            else:
                log.warning(
                    "peer %s refused us in community %s: %s", peer, self.label, hello.refused
                )
            self.greeted.add(peer)  # do not greet it again on this connection
            return self._drop(peer)
        member = self._members.get(peer)
        if member is None or member.credential != hello.credential or now >= member.until:
            try:
                until = check_credential(self.manifest, peer, self.me, hello.credential, int(now))
            except CommunityError as exc:
                return self._drop(peer) + self._refuse(now, peer, str(exc))
            member = _Member(hello.credential, until)
        actions: list[AdmissionAction] = []
        if peer not in self._members:
            log.info("community %s: admitted member %s", self.label, peer)
            actions.append(Admitted(peer))
        self._members[peer] = member
        if not hello.answer:  # answers are not answered: no ping-pong
            self.greeted.add(peer)
            answer = Hello(self.community, self.credential_for(peer), answer=True)
            actions.append(SendHello(peer, answer))
        return actions

    def on_frame(self, now: float, peer: str) -> list[AdmissionAction]:
        """A sync frame from ``peer`` arrived: no action if it may pass, else ``Refused`` (the
        driver logs and counts it: it also refuses frames it cannot decode), the notice, and
        ``Dropped`` if the peer's invite just expired."""
        member = self._members.get(peer)
        if member is None:
            return [Refused(peer, "not admitted (no valid hello on this connection)")] + list(
                self.notices.notice(
                    now, peer, self.community, "not admitted: say hello with a valid invite first"
                )
            )
        if now >= member.until:
            reason = (
                f"the invite of peer {peer} to {self.manifest.name!r} expired at "
                f"{format_time(int(member.until))}; ask the founder for a new one"
            )
            notice = self.notices.notice(now, peer, self.community, reason)
            return self._drop(peer) + [Refused(peer, reason)] + list(notice)
        return []

    def on_disconnected(self, now: float, peer: str) -> list[AdmissionAction]:
        """The connection to ``peer`` closed (or a send to it failed): its admission ends;
        a new connection says hello again."""
        self.greeted.discard(peer)
        return self._drop(peer)

    def leave(self, now: float) -> list[AdmissionAction]:
        """This node leaves: tell every admitted member, forget them all."""
        byes: list[AdmissionAction] = [
            SendHello(peer, Hello(self.community, answer=True, refused=LEFT))
            for peer in self._members
        ]
        self._members.clear()
        self.greeted.clear()
        return byes

    # ------------------------------------------------------------------------------ helpers

    def _drop(self, peer: str) -> list[AdmissionAction]:
        if self._members.pop(peer, None) is None:
            return []
        return [Dropped(peer)]

    def _refuse(self, now: float, peer: str, reason: str) -> list[AdmissionAction]:
        """Refuse ``peer``'s hello: logged, counted (``Refused``) and told (rate-limited)."""
        log.warning("refused peer %s in community %s: %s", peer, self.label, reason)
        refused: list[AdmissionAction] = [Refused(peer, reason)]
        return refused + list(self.notices.notice(now, peer, self.community, reason))


class Members(Protocol):
    """Whom a ``Gate`` tells about admitted and dropped peers: the channel's core (runtime)."""

    def peer_up(self, now: float, peer: str) -> None: ...

    def peer_down(self, now: float, peer: str) -> None: ...


class GateDriver(Protocol):
    """What a ``Gate`` needs of its driver: send hellos, count refusals."""

    def send_hello(self, now: float, to: str, hello: Hello) -> None: ...

    def refused(self, now: float, peer: str, reason: str) -> None: ...


class Gate:
    """Carries out the actions of one node's ``admission`` in one community: the one place
    that interprets them, for the daemon and the simulator. ``members`` hears who is admitted
    and dropped (under ``core_name(peer)``, the peer's name in the channel's core: its peer id
    in the daemon, its node index in the simulator); ``driver`` sends hellos and counts
    refusals of hellos. Before passing a sync frame on, ask ``frame``; before sending the
    channel's part, ask ``admits``."""

    def __init__(
        self,
        admission: Admission,
        members: Members,
        driver: GateDriver,
        core_name: Callable[[str], str] = str,
    ) -> None:
        self.admission, self.members, self.driver = admission, members, driver
        self.core_name = core_name

    def admits(self, peer: str) -> bool:
        """Whether the channel's part may go to ``peer``."""
        return self.admission.is_admitted(peer)

    def greet(self, now: float, peer: str) -> None:
        self._run(now, self.admission.greet(now, peer))

    def hello(self, now: float, peer: str, hello: Hello) -> None:
        self._run(now, self.admission.on_hello(now, peer, hello))

    def frame(self, now: float, peer: str) -> str | None:
        """A sync frame from ``peer`` arrived: None if it may pass, else why it is refused (the
        caller logs and counts the refusal; the notice and any drop are carried out here)."""
        actions = self.admission.on_frame(now, peer)
        refusals = [a for a in actions if isinstance(a, Refused)]
        self._run(now, [a for a in actions if not isinstance(a, Refused)])
        return refusals[0].reason if refusals else None

    def disconnected(self, now: float, peer: str) -> None:
        self._run(now, self.admission.on_disconnected(now, peer))

    def leave(self, now: float) -> None:
        self._run(now, self.admission.leave(now))

    def _run(self, now: float, actions: list[AdmissionAction]) -> None:
        for action in actions:
            if isinstance(action, SendHello):
                self.driver.send_hello(now, action.to, action.hello)
            elif isinstance(action, Admitted):
                self.members.peer_up(now, self.core_name(action.peer))
            elif isinstance(action, Dropped):
                self.members.peer_down(now, self.core_name(action.peer))
            elif isinstance(action, Refused):
                self.driver.refused(now, action.peer, action.reason)
