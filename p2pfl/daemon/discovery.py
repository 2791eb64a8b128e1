"""How the members of one community find each other over libp2p.

Each member announces itself (peer id and addresses, no secret) on the community's GossipSub
topic every ``ANNOUNCE_EVERY_S``; a member that hears an unknown peer dials it, and so it does
with the bootstrap addresses of its membership. Whom to greet is all discovery decides: the
hello (``p2pfl.protocol.admission``) decides who is a member, since anyone can announce.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection

import trio

from p2pfl.community.store import Membership
from p2pfl.daemon.transport import Transport, TransportError
from p2pfl.peers import peer_of_address
from p2pfl.wire.codec import WireError
from p2pfl.wire.community import MAX_ANNOUNCED_ADDRS, Announcement, topic_of

log = logging.getLogger("p2pfl.communities")

ANNOUNCE_EVERY_S = 5.0
"""Announcements per community and node: one every 5 s, a few hundred bytes each."""
MAINTAIN_EVERY_S = 1.0
REDIAL_EVERY_S = 3.0
"""At most one dial per peer and community every 3 s."""
KNOWN_MEMBER_TTL_S = 60.0
"""An announced peer is dialled while its announcements are at most this old."""
MAX_ANNOUNCED_PEERS = 256
"""Announced peers remembered per community (announcements prove no membership)."""


class Discovery:
    """Finds peers for one community and asks ``greet(peer)`` to say hello to the connected
    ones; ``admitted()`` are the peers it need not look for any more."""

    def __init__(
        self,
        membership: Membership,
        me: str,
        transport: Transport,
        target_degree: int,
        greet: Callable[[str], None],
        admitted: Callable[[], Collection[str]],
    ) -> None:
        self.membership, self.me, self.transport = membership, me, transport
        self.target_degree = target_degree
        self._greet, self._admitted = greet, admitted
        self.label = f"{membership.manifest.name!r} ({membership.id[:12]})"
        self.topic = topic_of(membership.id)
        self.announced: dict[str, tuple[tuple[str, ...], float]] = {}
        """Peers heard on the topic (members, as they say): their addresses and when (trio
        clock)."""
        self._last_dial: dict[str, float] = {}

    def bootstrap_peers(self) -> dict[str, str]:
        """Peer id -> address of the membership's bootstrap list."""
        peers = {peer_of_address(addr): addr for addr in self.membership.bootstrap}
        return {peer: addr for peer, addr in peers.items() if peer is not None}

    def knows(self, peer: str) -> bool:
        """Whether ``peer`` is a bootstrap member or announced itself."""
        return peer in self.announced or peer in self.bootstrap_peers()

    def forget(self, peer: str) -> None:
        """``peer`` refused us or left: stop dialling it."""
        self.announced.pop(peer, None)

    async def run(self) -> None:
        """Announce, listen for announcements and reach members until cancelled."""
        try:
            subscription = await self.transport.subscribe(self.topic)
        except Exception as exc:
            log.warning("cannot subscribe to %s: %s", self.topic, exc)
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._announce)
            nursery.start_soon(self._maintain, nursery)
            async for origin, data in subscription:
                self.on_announcement(origin, data)

    async def unsubscribe(self) -> None:
        try:
            await self.transport.unsubscribe(self.topic)
        except Exception as exc:
            log.debug("unsubscribing %s failed: %s", self.label, exc)

    def on_announcement(self, origin: str, data: bytes) -> None:
        """A peer announced itself: remember it (the maintenance loop dials it and the hello
        decides whether it is a member)."""
        try:
            announcement = Announcement.from_bytes(data)
            if announcement.peer != origin:
                raise WireError(f"it names peer {announcement.peer}, not its signer")
        except WireError as exc:
            log.info("ignored announcement from %s on %s: %s", origin, self.label, exc)
            return
        addrs = tuple(a for a in announcement.addrs if peer_of_address(a) == origin)
        if origin not in self.announced:
            if len(self.announced) >= MAX_ANNOUNCED_PEERS:
                log.debug("community %s: too many announced peers, ignored %s", self.label, origin)
                return
            if origin not in self._admitted():
                log.info("community %s: heard of peer %s", self.label, origin)
        self.announced[origin] = (addrs, trio.current_time())

    async def _announce(self) -> None:
        while True:
            await trio.sleep(ANNOUNCE_EVERY_S if self._admitted() else MAINTAIN_EVERY_S)
            addrs = tuple(self.transport.listen_addrs[:MAX_ANNOUNCED_ADDRS])
            try:
                await self.transport.publish(self.topic, Announcement(self.me, addrs).to_bytes())
            except TransportError as exc:
                log.debug("announcement for %s not published: %s", self.label, exc)

    async def _maintain(self, nursery: trio.Nursery) -> None:
        """Dial bootstrap and announced members; greet connected ones."""
        while True:
            now = trio.current_time()
            connected = set(self.transport.peers())
            admitted = self._admitted()
            candidates = dict(self.bootstrap_peers())
            for peer, (addrs, heard) in list(self.announced.items()):
                if now - heard > KNOWN_MEMBER_TTL_S:
                    del self.announced[peer]
                elif addrs and len(admitted) < self.target_degree:
                    candidates.setdefault(peer, addrs[0])
            for peer, addr in candidates.items():
                if peer == self.me or peer in admitted:
                    continue
                if peer in connected:
                    self._greet(peer)
                elif now - self._last_dial.get(peer, -REDIAL_EVERY_S) >= REDIAL_EVERY_S:
                    self._last_dial[peer] = now
                    nursery.start_soon(self._dial, peer, addr)
            await trio.sleep(MAINTAIN_EVERY_S)

    async def _dial(self, peer: str, addr: str) -> None:
        try:
            await self.transport.connect(addr)
        except TransportError as exc:
            log.info("community %s: could not reach %s (will retry): %s", self.label, peer, exc)
            return
        self._greet(peer)
