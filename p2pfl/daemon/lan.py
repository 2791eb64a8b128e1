"""Finding peers on the local network with mDNS (py-libp2p's ``libp2p.discovery.mdns``).

The node announces its dialable addresses as a ``_p2p._udp.local`` service (libp2p's mDNS
spec: ``dnsaddr=`` TXT records) and listens for other nodes' announcements. A node found this
way goes into the peer book (source ``mdns``) and is dialed while the node has room below
its target degree, like any peer heard of through peer exchange.

zeroconf runs its own threads: its callbacks only hand the finding over to the trio loop,
and its blocking calls (announce, goodbye) run in a worker thread.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from collections.abc import Callable

import trio
from libp2p.abc import PeerInfo
from libp2p.discovery.events.peerDiscovery import peerDiscovery
from libp2p.discovery.mdns.mdns import MDNSDiscovery
from multiaddr import Multiaddr

from p2pfl.daemon.transport import Transport

log = logging.getLogger("p2pfl.lan")

Found = Callable[[str, tuple[str, ...]], None]
"""Called in the trio loop with a peer id and its addresses (``/ip4/…/tcp/…``)."""


def is_lan_listen_addr(listen: str) -> bool:
    """True if ``listen`` (``/ip4|ip6/<host>/tcp/<port>``) is reachable from other machines:
    not a loopback address (mDNS is pointless on 127.0.0.1)."""
    host = Multiaddr(listen).value_for_protocol(Multiaddr(listen).protocols()[0].code)
    return not ipaddress.ip_address(host).is_loopback


class LanDiscovery:
    """Announce this node and hear other nodes on the LAN, while ``run`` runs."""

    def __init__(self, transport: Transport, found: Found) -> None:
        self.transport = transport
        self.found = found
        self._token: trio.lowlevel.TrioToken | None = None

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Announce and listen until cancelled, then say goodbye."""
        self._token = trio.lowlevel.current_trio_token()
        addrs = [a for a in self.transport.advertised_addrs if "/p2p-circuit" not in a]
        port = int(Multiaddr(addrs[0]).value_for_protocol(Multiaddr(addrs[0]).protocols()[1].code))
        network = self.transport.network
        peerDiscovery.register_peer_discovered_handler(self._discovered)
        try:
            try:
                discovery = await trio.to_thread.run_sync(
                    lambda: MDNSDiscovery(network, port=port, listen_addrs=addrs)
                )
            except OSError as exc:  # no multicast on this host: the node runs without
                log.warning("mDNS is off: %s (start with --no-mdns to skip it)", exc)
                task_status.started()
                return
            try:
                await trio.to_thread.run_sync(discovery.broadcaster.register)
                log.info("announcing %s on the local network (mDNS)", ", ".join(addrs))
                task_status.started()
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await trio.to_thread.run_sync(_close, discovery)
        finally:
            peerDiscovery.unregister_peer_discovered_handler(self._discovered)

    def _discovered(self, info: PeerInfo) -> None:
        """zeroconf thread: pass the finding to the trio loop (never raise here)."""
        peer = str(info.peer_id)
        addrs = tuple(str(a) for a in info.addrs)
        if self._token is None or peer == self.transport.peer_id:
            return
        with contextlib.suppress(trio.RunFinishedError, trio.Cancelled, RuntimeError):
            trio.from_thread.run_sync(self._take, peer, addrs, trio_token=self._token)

    def _take(self, peer: str, addrs: tuple[str, ...]) -> None:
        try:
            self.found(peer, addrs)
        except Exception:  # a bad announcement must not take the node down
            log.exception("could not use the mDNS announcement of peer %s", peer)


def _close(discovery: MDNSDiscovery) -> None:
    discovery.broadcaster.unregister()
    discovery.listener.stop()
    discovery.zeroconf.close()
