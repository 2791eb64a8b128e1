"""Byte transport of the daemon: one libp2p host (TCP + Noise + yamux) moving framed messages.

Every message travels on its own stream as one frame: a 4-byte big-endian length, then the
payload. The receiver reads the whole frame into memory at once (yamux resets a sender left
waiting 5 s for window updates), answers one acknowledgement byte, closes the stream, and only
then hands the payload to the protocol handler; `send` returns once the acknowledgement arrives.
A refused frame (too large, over the peer's rate or concurrency limit) is reset instead. A
libp2p reset reads as a plain EOF on the sender's side, hence the explicit byte.

Nothing a peer sends can raise out of a stream handler: py-libp2p (0.8.1) tears the whole host
down when that happens.

With ``pubsub=True`` the host also runs GossipSub for small signed announcements (never model
parameters: py-libp2p drops pubsub messages over 1 MiB silently and queues 32 per topic).

The framing helpers are in ``framing.py``, the limits in ``limits.py``, the node key in
``identity.py``. This module is over 400 lines because ``Transport`` is one object with one
state (host, address book, routes, per-peer buckets and stream counts): its lifecycle, outbound
sends and dials, inbound streams under the limits, and pubsub share that state, and each
py-libp2p sharp edge it works around is documented where it is handled.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import dataclass
from functools import partial
from types import TracebackType

import trio
from libp2p import new_host
from libp2p.abc import IHost, INetConn, INetStream, INetwork, INotifee
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.stream.exceptions import StreamEOF, StreamReset
from libp2p.network.swarm import Swarm
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.pubsub.gossipsub import PROTOCOL_ID as GOSSIPSUB_PROTOCOL_ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11 as GOSSIPSUB_PROTOCOL_ID_V11
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.pubsub.subscription import TrioSubscriptionAPI
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.tools.anyio_service import background_trio_service
from libp2p.transport.tcp.tcp import TCP
from libp2p.utils.address_validation import expand_wildcard_address
from multiaddr import Multiaddr
from multiaddr.protocols import P_P2P

from p2pfl.daemon.framing import (
    ACK,
    CLEANUP_TIMEOUT_S,
    HEADER,
    MAX_FRAME_BYTES,
    FrameRefused,
    cleanup,
    read_exactly,
    why,
    widen_receive_window,
)
from p2pfl.daemon.limits import Limits, TokenBucket
from p2pfl.daemon.peers import PeerLedger
from p2pfl.errors import OperationError
from p2pfl.peers import parse_peer_address, parse_peer_id, tcp_listen_address
from p2pfl.ratelog import RateLimitedLog

log = logging.getLogger("p2pfl.transport")

Handler = Callable[[str, bytes], Awaitable[None]]
"""Protocol handler: awaited with (sender peer id, payload) once per received frame."""

PeerCallback = Callable[[str], None]
"""Called with a peer id when its first connection opens or its last one closes."""


_MAX_IDLE_BUCKETS = 1024
_GOSSIP_HEARTBEAT_S = 1
"""GossipSub heartbeat: meshes form and repair within about a second (libp2p's default 120 s
suits long-lived networks, not peers that join a community and want to be found now)."""


class TransportError(OperationError):
    """A connect or send failed; the message names the peer and the reason."""


@dataclass(frozen=True)
class _Route:
    protocol: str
    handler: Handler
    max_frame_bytes: int


class _PeerEvents(INotifee):
    """Turns libp2p connection notifications into peer up/down callbacks."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        self._transport._peer_up(str(conn.muxed_conn.peer_id))

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        peer = conn.muxed_conn.peer_id
        if not network.get_connections(peer):
            self._transport._peer_down(str(peer))

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def listen(self, network: INetwork, multiaddr: Multiaddr) -> None:
        return None

    async def listen_close(self, network: INetwork, multiaddr: Multiaddr) -> None:
        return None


class Subscription:
    """Messages other peers published on one pubsub topic, as (origin peer id, data).

    The origin is the signer of the message (py-libp2p verifies the signature). Iteration ends
    when the topic is unsubscribed.
    """

    def __init__(self, subscription: TrioSubscriptionAPI, own_peer_id: str) -> None:
        self._subscription, self._own = subscription, own_peer_id

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> tuple[str, bytes]:
        while True:
            try:
                message = await self._subscription.get()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                raise StopAsyncIteration from None
            try:
                origin = str(ID(message.from_id))
            except Exception:
                continue
            if origin != self._own:
                return origin, bytes(message.data)


class Transport:
    """One libp2p host (TCP + Noise + yamux) sending and receiving length-prefixed frames.

    Use as `async with Transport(key_pair, listen=[...]) as t:`; a transport runs once.
    """

    def __init__(
        self,
        key_pair: KeyPair,
        listen: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",),
        limits: Limits | None = None,
        on_peer_connected: PeerCallback | None = None,
        on_peer_disconnected: PeerCallback | None = None,
        pubsub: bool = False,
        ledger: PeerLedger | None = None,
    ) -> None:
        self.limits = limits or Limits()
        self.ledger = ledger if ledger is not None else PeerLedger()
        """Per-peer bytes, connection state and refusals."""
        self.relay_dialer: CircuitV2Transport | None = None
        """Dials ``/p2p-circuit`` addresses once ``relay.Relaying`` runs."""
        self.circuit_addrs: list[str] = []
        """``<relay address>/p2p-circuit`` of each relay holding a reservation for us."""
        self.on_peer_connected = on_peer_connected
        self.on_peer_disconnected = on_peer_disconnected
        self.bytes_sent = 0
        """Frame bytes (prefix + payload) of sends the receiver confirmed."""
        self.bytes_received = 0
        """Frame bytes (prefix + payload) of inbound frames read completely."""
        self._refusals = RateLimitedLog(log)
        self._listen = [tcp_listen_address(a) for a in listen]
        noise = NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)
        self._host = new_host(
            key_pair=key_pair,
            sec_opt={NOISE_PROTOCOL_ID: noise},
            muxer_opt={YAMUX_PROTOCOL_ID: Yamux},
            transports=[TCP()],
        )
        self._host.get_network().register_notifee(_PeerEvents(self))
        self._address_book: dict[str, list[Multiaddr]] = {}
        self._dial_locks: dict[str, trio.Lock] = {}
        self._inbound: dict[str, int] = {}
        self._buckets: dict[str, TokenBucket] = {}
        self._up: set[str] = set()
        self._run: AbstractAsyncContextManager[None] | None = None
        self._services = AsyncExitStack()
        self._cleanup_scope: trio.CancelScope | None = None
        self._gossipsub: GossipSub | None = None
        self._pubsub: Pubsub | None = None
        if pubsub:
            # Built before the host runs, so its notifee sees every connection.
            self._gossipsub = GossipSub(
                protocols=[GOSSIPSUB_PROTOCOL_ID_V11, GOSSIPSUB_PROTOCOL_ID],
                degree=6,
                degree_low=4,
                degree_high=12,
                heartbeat_initial_delay=0.1,
                heartbeat_interval=_GOSSIP_HEARTBEAT_S,
            )
            self._pubsub = Pubsub(self._host, self._gossipsub)

    # ----------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> Transport:
        if self._run is not None:
            raise RuntimeError("a Transport runs once; create a new one")
        self._run = self._host.run(listen_addrs=self._listen)
        await self._run.__aenter__()
        network = self._host.get_network()
        if isinstance(network, Swarm):
            # Neighbours are the protocol's choice: libp2p's auto-connector would dial any peer
            # in its peerstore every 30 s, trying to hold 50 connections.
            await network.auto_connector.stop()
        if self._pubsub is not None and self._gossipsub is not None:
            try:
                self._cleanup_scope = self._services.enter_context(trio.CancelScope())
                await self._services.enter_async_context(background_trio_service(self._pubsub))
                await self._services.enter_async_context(background_trio_service(self._gossipsub))
                await self._pubsub.wait_until_ready()
            except BaseException as exc:
                await self.__aexit__(type(exc), exc, exc.__traceback__)
                raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        # The services' nurseries were opened in __aenter__, inside ``_cleanup_scope``: close
        # them at that same nesting level (under a new cancel scope, trio would find its scope
        # stack corrupted), shielded from outer cancellation and bounded in time.
        if self._cleanup_scope is not None:
            self._cleanup_scope.shield = True
            self._cleanup_scope.deadline = trio.current_time() + CLEANUP_TIMEOUT_S
        await self._services.aclose()
        # Leaving host.run() alone leaks listeners and connections: close inside it.
        with trio.move_on_after(CLEANUP_TIMEOUT_S, shield=True) as scope:
            await self._host.close()
        if scope.cancelled_caught:
            log.warning("host %s did not close within %.0f s", self.peer_id, CLEANUP_TIMEOUT_S)
        assert self._run is not None, "__aexit__ without __aenter__"
        return await self._run.__aexit__(exc_type, exc, tb)

    # ---------------------------------------------------------------- properties

    @property
    def peer_id(self) -> str:
        """This host's peer id (base58)."""
        return str(self._host.get_id())

    @property
    def listen_addrs(self) -> list[str]:
        """Full dialable addresses, each ending in /p2p/<peer id>."""
        return [str(a) for a in self._host.get_addrs()]

    @property
    def advertised_addrs(self) -> list[str]:
        """Addresses other peers can dial, without the /p2p part: a wildcard listen address
        (0.0.0.0, ::) becomes one address per local interface; then our relay circuits."""
        out: list[str] = []
        for addr in self._host.get_addrs():
            bare = addr.decapsulate_code(P_P2P) if _has_p2p(addr) else addr
            expanded = expand_wildcard_address(bare) if _is_wildcard(bare) else [bare]
            out.extend(str(a) for a in expanded if str(a) not in out)
        return out + self.circuit_addrs

    @property
    def host(self) -> IHost:
        """The libp2p host (for py-libp2p services: mDNS discovery, circuit relay)."""
        return self._host

    @property
    def network(self) -> INetwork:
        """The libp2p swarm."""
        return self._host.get_network()

    def peers(self) -> list[str]:
        """Peer ids with at least one open connection."""
        return [str(p) for p in self._host.get_connected_peers()]

    def add_addresses(self, peer_id: str, addrs: Sequence[str]) -> None:
        """Remember dialable addresses of a peer (``/ip4/…/tcp/…``, or a relay circuit)
        without dialing: a later ``send`` to it dials them if no connection is open."""
        if peer_id == self.peer_id:
            return
        known = self._address_book.setdefault(peer_id, [])
        for text in addrs:
            addr = Multiaddr(text)
            if addr not in known:
                known.append(addr)

    # ------------------------------------------------------------------ outbound

    async def connect(self, multiaddr: str) -> str:
        """Dial `/ip4/.../tcp/.../p2p/<id>`, remember the address, and return the peer id.

        The dial is always attempted, even if the peer failed recently: libp2p would refuse it
        for 60 s (its negative cache); callers that retry pace themselves.
        """
        try:
            info = parse_peer_address(multiaddr)
        except ValueError as exc:
            raise TransportError(f"bad peer address: {exc}") from None
        peer = str(info.peer_id)
        if peer == self.peer_id:
            raise TransportError(f"refusing to connect to our own address {multiaddr}")
        known = self._address_book.setdefault(peer, [])
        known.extend(a for a in info.addrs if a not in known)
        network = self._host.get_network()
        if isinstance(network, Swarm):
            network.unblock_peer(info.peer_id)
        await self._dial(info.peer_id)
        return peer

    async def send(self, peer_id: str, protocol: str, payload: bytes) -> None:
        """Deliver one frame on a new stream; return once the receiver acknowledged all of it.

        Re-dials from the address book when no connection is open. Raises TransportError.
        """
        if len(payload) > MAX_FRAME_BYTES:
            raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_FRAME_BYTES}")
        peer = self._peer(peer_id)
        try:
            with trio.fail_after(self.limits.io_timeout_s + self.limits.dial_timeout_s):
                if not self._host.get_network().get_connections(peer):
                    await self._dial(peer)
                stream = await self._host.new_stream(peer, [TProtocol(protocol)])
                try:
                    await stream.write(HEADER.pack(len(payload)))
                    await stream.write(payload)
                    await stream.close_write()
                    await _await_ack(stream)
                except BaseException:
                    await cleanup(stream.reset)
                    raise
                await cleanup(stream.close)
        except TransportError:
            raise
        except trio.TooSlowError as exc:
            raise TransportError(f"send to {peer_id} on {protocol} timed out") from exc
        except Exception as exc:
            raise TransportError(f"send to {peer_id} on {protocol} failed: {why(exc)}") from exc
        self.bytes_sent += HEADER.size + len(payload)
        self.ledger.sent(peer_id, HEADER.size + len(payload))

    async def disconnect(self, peer_id: str) -> None:
        """Close every connection to `peer_id`; its address stays in the address book."""
        with trio.move_on_after(CLEANUP_TIMEOUT_S, shield=True):
            await self._host.disconnect(self._peer(peer_id))

    @staticmethod
    def _peer(peer_id: str) -> ID:
        try:
            return parse_peer_id(peer_id)
        except ValueError as exc:
            raise TransportError(str(exc)) from None

    async def _dial(self, peer: ID) -> None:
        """Open a connection to `peer` from the address book (one dial per peer at a time)."""
        key = str(peer)
        addrs = self._address_book.get(key)
        if not addrs:
            raise TransportError(f"no address known for peer {key}; call connect() first")
        lock = self._dial_locks.setdefault(key, trio.Lock())
        async with lock:
            if self._host.get_network().get_connections(peer):
                return
            direct = [a for a in addrs if not _is_circuit(a)]
            relayed = [a for a in addrs if _is_circuit(a)] if self.relay_dialer else []
            try:
                if not relayed:
                    with trio.fail_after(self.limits.dial_timeout_s):
                        await self._host.connect(PeerInfo(peer, direct))
                    return
                # direct addresses first (behind a NAT they may never answer), then each
                # relay; each phase has the whole dial timeout
                if direct:
                    with trio.move_on_after(self.limits.dial_timeout_s):
                        with contextlib.suppress(Exception):
                            await self._host.connect(PeerInfo(peer, direct))
                            return
                with trio.fail_after(self.limits.dial_timeout_s):
                    await self._dial_relayed(peer, relayed)
            except trio.TooSlowError as exc:
                raise TransportError(
                    f"dial of peer {key} at {[str(a) for a in addrs]} timed out after "
                    f"{self.limits.dial_timeout_s:.0f} s"
                ) from exc
            except Exception as exc:
                raise TransportError(
                    f"dial of peer {key} at {[str(a) for a in addrs]} failed: {why(exc)}"
                ) from exc

    async def _dial_relayed(self, peer: ID, circuits: list[Multiaddr]) -> None:
        """Open a connection to ``peer`` through the first relay that splices it."""
        assert self.relay_dialer is not None
        problem: Exception | None = None
        for circuit in circuits:
            try:
                await self.relay_dialer.dial(circuit.encapsulate(Multiaddr(f"/p2p/{peer}")))
                return
            except Exception as exc:  # py-libp2p raises many types
                problem = exc
        assert problem is not None
        raise problem

    # -------------------------------------------------------------------- pubsub

    async def subscribe(self, topic: str) -> Subscription:
        """Join a pubsub topic (needs ``pubsub=True``); iterate the result for messages."""
        pubsub = self._require_pubsub()
        subscription = await pubsub.subscribe(topic)
        assert isinstance(subscription, TrioSubscriptionAPI)
        return Subscription(subscription, self.peer_id)

    async def unsubscribe(self, topic: str) -> None:
        """Leave a pubsub topic: its Subscription ends, peers learn we left it."""
        await self._require_pubsub().unsubscribe(topic)

    async def publish(self, topic: str, data: bytes) -> None:
        """Sign and publish a small message on a topic; raises TransportError on failure."""
        try:
            await self._require_pubsub().publish(topic, data)
        except Exception as exc:
            raise TransportError(f"publish on {topic} failed: {why(exc)}") from exc

    def _require_pubsub(self) -> Pubsub:
        if self._pubsub is None:
            raise RuntimeError("this Transport was created without pubsub=True")
        return self._pubsub

    # ------------------------------------------------------------------- inbound

    def set_handler(
        self, protocol: str, handler: Handler, *, max_frame_bytes: int | None = None
    ) -> None:
        """Deliver frames received on `protocol` to `handler`.

        `max_frame_bytes` overrides `Limits.max_frame_bytes` for this protocol.
        """
        limit = self.limits.max_frame_bytes if max_frame_bytes is None else max_frame_bytes
        if not 0 <= limit <= MAX_FRAME_BYTES:
            raise ValueError(f"max_frame_bytes must be in [0, {MAX_FRAME_BYTES}]")
        route = _Route(protocol, handler, limit)
        self._host.set_stream_handler(TProtocol(protocol), partial(self._on_stream, route))

    async def _on_stream(self, route: _Route, stream: INetStream) -> None:
        """libp2p stream handler: must never raise (an escaping error kills the host)."""
        try:
            await self._serve(route, stream)
        except Exception:
            log.exception("internal error serving a stream on %s", route.protocol)
            await cleanup(stream.reset)

    async def _serve(self, route: _Route, stream: INetStream) -> None:
        """Admit one inbound stream under the per-peer limits and receive its frame."""
        peer = str(stream.muxed_conn.peer_id)
        refusal = self._admit(peer)
        if refusal is not None:
            self._refusals.warning(
                ("refused", peer, route.protocol),
                "refused message from peer %s on %s: %s",
                peer,
                route.protocol,
                refusal,
            )
            self.ledger.refused(peer, refusal)
            await cleanup(stream.reset)
            return
        self._inbound[peer] = self._inbound.get(peer, 0) + 1
        try:
            await self._receive(peer, route, stream)
        finally:
            self._inbound[peer] -= 1
            if not self._inbound[peer]:
                del self._inbound[peer]

    def _admit(self, peer: str) -> str | None:
        """Apply the per-peer rate and concurrency limits; return a refusal reason or None."""
        now = trio.current_time()
        bucket = self._buckets.get(peer)
        if bucket is None:
            if len(self._buckets) >= _MAX_IDLE_BUCKETS:
                self._forget_idle_buckets(now)
            bucket = TokenBucket(self.limits.messages_per_s, self.limits.burst, now)
            self._buckets[peer] = bucket
        if not bucket.take(now):
            return (
                f"rate limit exceeded ({self.limits.messages_per_s:g} msg/s, "
                f"burst {self.limits.burst})"
            )
        if self._inbound.get(peer, 0) >= self.limits.max_inbound_streams_per_peer:
            return (
                f"too many concurrent inbound messages "
                f"(limit {self.limits.max_inbound_streams_per_peer} per peer)"
            )
        return None

    def _forget_idle_buckets(self, now: float) -> None:
        """Drop buckets that have refilled completely: they carry no state worth keeping."""
        for peer, bucket in list(self._buckets.items()):
            bucket.refill(now)
            if bucket.tokens >= bucket.size:
                del self._buckets[peer]

    async def _receive(self, peer: str, route: _Route, stream: INetStream) -> None:
        """Read one frame completely, close the stream, then run the handler."""
        try:
            with trio.fail_after(self.limits.io_timeout_s):
                (size,) = HEADER.unpack(await read_exactly(stream, HEADER.size))
                if size > route.max_frame_bytes:
                    raise FrameRefused(
                        f"frame of {size} bytes exceeds the limit of {route.max_frame_bytes}"
                    )
                widen_receive_window(stream, size)
                payload = await read_exactly(stream, size)
                await stream.write(ACK)
                await stream.close()
        except FrameRefused as exc:
            self._refusals.warning(
                ("refused", peer, route.protocol),
                "refused message from peer %s on %s: %s",
                peer,
                route.protocol,
                exc,
            )
            self.ledger.refused(peer, str(exc))
            await cleanup(stream.reset)
            return
        except trio.TooSlowError:
            self._refusals.warning(
                ("slow", peer, route.protocol),
                "dropped message from peer %s on %s: not received within %.0f s",
                peer,
                route.protocol,
                self.limits.io_timeout_s,
            )
            await cleanup(stream.reset)
            return
        except Exception as exc:
            log.warning("dropped message from peer %s on %s: %s", peer, route.protocol, why(exc))
            await cleanup(stream.reset)
            return
        self.bytes_received += HEADER.size + len(payload)
        self.ledger.received(peer, HEADER.size + len(payload))
        try:
            await route.handler(peer, payload)
        except Exception:
            log.exception(
                "handler for %s failed on a %d-byte message from peer %s",
                route.protocol,
                len(payload),
                peer,
            )

    # ---------------------------------------------------------------- peer events

    def _peer_up(self, peer: str) -> None:
        if peer not in self._up:
            self._up.add(peer)
            self.ledger.connection(peer, True)
            self._notify(self.on_peer_connected, peer)

    def _peer_down(self, peer: str) -> None:
        if peer in self._up:
            self._up.discard(peer)
            self.ledger.connection(peer, False)
            self._notify(self.on_peer_disconnected, peer)

    def _notify(self, callback: PeerCallback | None, peer: str) -> None:
        if callback is None:
            return
        try:
            callback(peer)
        except Exception:
            log.exception("peer event callback %r failed for peer %s", callback, peer)


# ------------------------------------------------------------------------ helpers


async def _await_ack(stream: INetStream) -> None:
    """Wait for the receiver's one-byte acknowledgement that it read the whole frame."""
    try:
        reply = await stream.read(1)
    except (StreamEOF, StreamReset) as exc:
        raise TransportError("receiver refused or dropped the message (see its log)") from exc
    if reply != ACK:
        raise TransportError(f"receiver sent {reply!r} instead of the acknowledgement")


def _has_p2p(addr: Multiaddr) -> bool:
    return any(p.code == P_P2P for p in addr.protocols())


def _is_circuit(addr: Multiaddr) -> bool:
    return any(p.name == "p2p-circuit" for p in addr.protocols())


def _is_wildcard(addr: Multiaddr) -> bool:
    host = str(addr).split("/")[2]
    return host in ("0.0.0.0", "::")


def check_can_listen(addr: str) -> None:
    """Raise OSError if TCP address ``addr`` (``/ip4|ip6/<host>/tcp/<port>``) cannot be
    listened on now, e.g. its port is in use. libp2p itself only logs a failed listener and
    runs on with no address at all."""
    maddr = tcp_listen_address(addr)
    port = int(maddr.value_for_protocol("tcp"))
    if port == 0:
        return
    ip6 = "ip6" in {p.name for p in maddr.protocols()}
    host = maddr.value_for_protocol("ip6" if ip6 else "ip4")
    with socket.socket(socket.AF_INET6 if ip6 else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
