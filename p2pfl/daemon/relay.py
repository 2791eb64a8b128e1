"""Reaching nodes behind NAT through a circuit relay (py-libp2p's ``libp2p.relay.circuit_v2``).

- A node started with ``--relay-service`` relays for others (the relay v2 *hop* protocol,
  within py-libp2p's default limits: reservations, circuits and bytes per circuit bounded).
- A node started with ``--relay ADDR`` (a relay's full address) keeps a connection and a
  reservation on that relay (renewed before it expires) and advertises
  ``ADDR/p2p-circuit`` through peer exchange. A peer dials that address: the relay splices
  the two connections, and Noise + yamux run end to end over it (the relay sees only
  ciphertext). The node also accepts relayed connections (the *stop* protocol).
- ``Transport`` dials ``/p2p-circuit`` addresses with the relay transport built here.
"""

from __future__ import annotations

import logging

import trio
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.tools.anyio_service import background_trio_service

from p2pfl.daemon.transport import Transport

log = logging.getLogger("p2pfl.relay")

RETRY_EVERY_S = 10.0
"""A relay that cannot be reached or refuses a reservation is tried again after this long."""


class Relaying:
    """This node's part in circuit relaying: dialing ``/p2p-circuit`` addresses and taking
    relayed connections (every node), serving as a relay, holding reservations."""

    def __init__(self, transport: Transport, serve: bool, relays: tuple[str, ...]) -> None:
        self.transport = transport
        self.serve = serve
        self.relays = relays
        self.reserved: dict[str, bool] = {addr: False for addr in relays}

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the relay protocol (hop if serving, stop always), keep the reservations."""
        host = self.transport.host
        protocol = CircuitV2Protocol(host, allow_hop=self.serve)
        roles = RelayRole.STOP | RelayRole.CLIENT | (RelayRole.HOP if self.serve else RelayRole(0))
        async with background_trio_service(protocol), trio.open_nursery() as nursery:
            await protocol.event_started.wait()
            dialer = CircuitV2Transport(host, protocol, RelayConfig(roles=roles))
            self.transport.relay_dialer = dialer
            if self.serve:
                log.info("serving as a circuit relay for nodes behind NAT")
            for addr in self.relays:
                nursery.start_soon(self._keep_reservation, dialer, addr, nursery)
            task_status.started()
            await trio.sleep_forever()

    async def _keep_reservation(
        self, dialer: CircuitV2Transport, addr: str, nursery: trio.Nursery
    ) -> None:
        """Hold a reservation on the relay at ``addr``: reserve, and reserve again whenever
        the connection to the relay is lost (py-libp2p renews a live reservation itself, at
        80 % of its lifetime, in a task of ``nursery``)."""
        circuit = f"{addr}/p2p-circuit"
        relay = addr.rsplit("/p2p/", 1)[1]
        while True:
            if relay in self.transport.peers() and self.reserved[addr]:
                await trio.sleep(RETRY_EVERY_S)
                continue
            if self.reserved[addr]:
                log.warning("lost the connection to relay %s; reserving again", addr)
                self.reserved[addr] = False
                self.transport.circuit_addrs.remove(circuit)
            try:
                await self.transport.connect(addr)
                stream = await self.transport.host.new_stream(
                    ID.from_base58(relay), [HOP_PROTOCOL_ID]
                )
                self.reserved[addr] = await dialer.reserve(stream, ID.from_base58(relay), nursery)
                reason = "the relay refused the reservation"
            except Exception as exc:  # py-libp2p raises many types here
                reason = f"{type(exc).__name__}: {exc}"
            if self.reserved[addr]:
                self.transport.circuit_addrs.append(circuit)
                log.info("reserved a slot on relay %s: reachable at %s", addr, circuit)
            else:
                log.warning("no reservation on relay %s (%s); retrying in %.0f s", addr, reason,
                            RETRY_EVERY_S)  # fmt: skip
            await trio.sleep(RETRY_EVERY_S)
