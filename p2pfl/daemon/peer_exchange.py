"""Peer exchange: neighbours tell each other whom they know, and the node remembers it.

Every ``EXCHANGE_EVERY_S`` seconds, and when a connection opens, a node sends each connected
peer a small frame on ``PEX_PROTOCOL``: its own dialable addresses first, then those of the
peers it is connected to (as each advertised them). The receiver keeps them in its
``PeerBook``, hands them to the transport (so a message to a peer it never met, such as one
dynamic's widening picked, can be delivered) and dials from the book while it has fewer than
``target_degree`` neighbours. The book is saved in ``DIR/peers.json``: a node whose
bootstrap peers are all gone finds the network again after a restart.

Nothing in a frame is trusted: it is size-checked and parsed into peer ids and TCP
multiaddrs or refused as a whole (``PeerExchangeError``); a wrong address costs a failed
dial at most (Noise checks that whoever answers holds the peer id's key).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import msgpack
import trio
from libp2p.peer.id import ID
from multiaddr import Multiaddr

from p2pfl.daemon.peers import PeerLedger
from p2pfl.daemon.transport import Transport, TransportError
from p2pfl.files import write_private_atomically
from p2pfl.ratelog import RateLimitedLog

log = logging.getLogger("p2pfl.peers")

PEX_PROTOCOL = "/p2pfl/peers/1.0.0"
EXCHANGE_EVERY_S = 10.0
MAX_ENTRIES = 32
"""Peers in one frame (the sender itself included)."""
MAX_ADDRS = 4
"""Addresses kept per peer."""
MAX_ADDR_CHARS = 200
MAX_FRAME_BYTES = 4 + MAX_ENTRIES * (64 + MAX_ADDRS * (MAX_ADDR_CHARS + 4))
MAX_KNOWN = 512
"""Peers the book holds at most; the one heard of longest ago goes first."""
FORGET_AFTER_S = 7 * 86400.0
"""A peer nobody mentioned (and we did not reach) for this long is forgotten."""
BOOK_FILE = "peers.json"
REDIAL_EVERY_S = 3.0
"""A missing bootstrap peer is dialed again after this long."""
BOOK_REDIAL_EVERY_S = 30.0
"""A peer of the book is dialed again after this long."""
_TRANSPORTS = {"ip4", "ip6", "dns", "dns4", "dns6"}


class PeerExchangeError(ValueError):
    """A peer-exchange frame or book file cannot be used; the message says why."""


Entry = tuple[str, tuple[str, ...]]
"""A peer id and its dialable addresses (``/ip4/<ip>/tcp/<port>``, no ``/p2p`` part)."""


def encode_entries(entries: Iterable[Entry]) -> bytes:
    """A frame of at most MAX_ENTRIES entries (extra ones are left out)."""
    body = [[peer, list(addrs[:MAX_ADDRS])] for peer, addrs in list(entries)[:MAX_ENTRIES]]
    return msgpack.packb(body, use_bin_type=True)


def decode_entries(data: bytes) -> list[Entry]:
    """Parse a frame; raise PeerExchangeError for anything but a list of valid entries."""
    if len(data) > MAX_FRAME_BYTES:
        raise PeerExchangeError(f"frame of {len(data)} bytes exceeds {MAX_FRAME_BYTES}")
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise PeerExchangeError(f"malformed msgpack ({type(exc).__name__})") from None
    if not isinstance(body, list) or len(body) > MAX_ENTRIES:
        raise PeerExchangeError(f"expected a list of at most {MAX_ENTRIES} entries")
    return [_entry(item) for item in body]


def _entry(item: object) -> Entry:
    if not (isinstance(item, list) and len(item) == 2 and isinstance(item[1], list)):
        raise PeerExchangeError("an entry is not [peer id, [addresses]]")
    peer, addrs = item
    if not isinstance(peer, str) or len(peer) > 64:
        raise PeerExchangeError("a peer id is not a string")
    try:
        ID.from_base58(peer)
    except Exception:
        raise PeerExchangeError(f"{peer[:64]!r} is not a peer id") from None
    if len(addrs) > MAX_ADDRS:
        raise PeerExchangeError(f"more than {MAX_ADDRS} addresses for peer {peer}")
    return peer, tuple(check_tcp_addr(a) for a in addrs)


def check_tcp_addr(addr: object) -> str:
    """``addr`` if it is ``/ip4|ip6|dns*/<host>/tcp/<port>``, or that followed by
    ``/p2p/<relay id>/p2p-circuit`` (reachable through that relay), else PeerExchangeError."""
    if not isinstance(addr, str) or len(addr) > MAX_ADDR_CHARS:
        raise PeerExchangeError("an address is not a string of at most 200 characters")
    try:
        names = [p.name for p in Multiaddr(addr).protocols()]
    except Exception:
        raise PeerExchangeError(f"{addr!r} is not a multiaddr") from None
    relayed = names[2:] == ["p2p", "p2p-circuit"]
    if (
        len(names) not in (2, 4)
        or names[0] not in _TRANSPORTS
        or names[1] != "tcp"
        or (len(names) == 4 and not relayed)
    ):
        raise PeerExchangeError(f"{addr!r} is not /ip4|ip6|dns/<host>/tcp/<port>")
    return addr


@dataclass
class Known:
    addrs: tuple[str, ...]
    heard: float
    """Unix time it was last mentioned (or connected)."""
    source: str
    """Who told us: ``bootstrap``, ``peer <id>``, ``itself``, ``mdns``, ``saved``."""


class PeerBook:
    """Dialable addresses of the peers this node heard of, bounded, saved in ``DIR/peers.json``."""

    def __init__(self, own_id: str, home: Path | None = None, max_known: int = MAX_KNOWN) -> None:
        self.own_id = own_id
        self.path = None if home is None else home / BOOK_FILE
        self.max_known = max_known
        self.known: dict[str, Known] = {}
        self._dirty = False

    def add(self, peer: str, addrs: Iterable[str], source: str, now: float | None = None) -> bool:
        """Remember ``addrs`` of ``peer`` (newest first, at most MAX_ADDRS); True if it was
        unknown. Our own id and entries without addresses are ignored."""
        addrs = tuple(dict.fromkeys(addrs))
        if peer == self.own_id or not addrs:
            return False
        now = time.time() if now is None else now
        old = self.known.get(peer)
        merged = tuple(dict.fromkeys(addrs + (old.addrs if old else ())))[:MAX_ADDRS]
        if old is None and len(self.known) >= self.max_known:
            del self.known[min(self.known, key=lambda p: self.known[p].heard)]
        self.known[peer] = Known(merged, now, source)
        self._dirty = True
        return old is None

    def entries(self, peers: Iterable[str]) -> list[Entry]:
        """The known addresses of ``peers`` (those we have any for)."""
        return [(p, self.known[p].addrs) for p in peers if p in self.known]

    def candidates(self, exclude: set[str]) -> list[Entry]:
        """Peers to dial, most recently heard of first."""
        ranked = sorted(self.known.items(), key=lambda kv: -kv[1].heard)
        return [(p, k.addrs) for p, k in ranked if p not in exclude]

    def forget_stale(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        for peer in [p for p, k in self.known.items() if now - k.heard > FORGET_AFTER_S]:
            del self.known[peer]
            self._dirty = True

    # ------------------------------------------------------------------- on disk

    def load(self) -> None:
        """Read the saved book (a damaged file is logged and ignored)."""
        if self.path is None or not self.path.exists():
            return
        try:
            saved = json.loads(self.path.read_text())
            if not isinstance(saved, dict):
                raise PeerExchangeError("not a JSON object")
            for peer, item in saved.items():
                _, addrs = _entry([peer, item["addrs"]])
                self.add(peer, addrs, "saved", float(item["heard"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring the saved peers in %s: %s", self.path, exc)
        self.forget_stale()
        self._dirty = False

    def save(self) -> None:
        """Write the book if it changed since the last save (atomically, mode 0600)."""
        if self.path is None or not self._dirty:
            return
        body = {p: {"addrs": list(k.addrs), "heard": k.heard} for p, k in self.known.items()}
        write_private_atomically(self.path, json.dumps(body, indent=1).encode())
        self._dirty = False


def split_peer_addr(addr: str) -> Entry:
    """``/ip4/…/tcp/…/p2p/<id>`` as (peer id, (the address without /p2p,))."""
    head, _, peer = addr.rpartition("/p2p/")
    return peer, (head,)


class PeerExchange:
    """The node's side of peer exchange: sends and takes frames, keeps the node at its target
    degree by dialing bootstrap peers first, then peers from the book."""

    def __init__(
        self,
        book: PeerBook,
        transport: Transport,
        ledger: PeerLedger,
        bootstrap: Iterable[str],
        target_degree: int,
    ) -> None:
        self.book = book
        self.transport = transport
        self.ledger = ledger
        self.bootstrap = [split_peer_addr(a) for a in bootstrap]
        self.target_degree = target_degree
        self._last_dial: dict[str, float] = {}
        self._nursery: trio.Nursery | None = None
        self._failures = RateLimitedLog(log)
        for peer, addrs in self.bootstrap:
            self.book.add(peer, addrs, "bootstrap")
        for peer, addrs in self.book.candidates(set()):
            transport.add_addresses(peer, addrs)

    def start(self, nursery: trio.Nursery) -> None:
        """Take frames, send ours periodically and keep the neighbours (transport running)."""
        self._nursery = nursery
        self.transport.set_handler(PEX_PROTOCOL, self.on_frame, max_frame_bytes=MAX_FRAME_BYTES)
        nursery.start_soon(self._exchange_periodically)
        nursery.start_soon(self._keep_neighbours)

    def peer_up(self, peer: str) -> None:
        """A connection opened: tell the peer whom we know."""
        if self._nursery is not None:
            self._nursery.start_soon(self._send, peer)

    def _frame(self) -> bytes:
        own = (self.transport.peer_id, tuple(self.transport.advertised_addrs))
        return encode_entries([own, *self.book.entries(self.transport.peers())])

    async def _send(self, peer: str) -> None:
        try:
            await self.transport.send(peer, PEX_PROTOCOL, self._frame())
        except TransportError as exc:
            log.debug("peer exchange with %s failed: %s", peer, exc)

    async def _exchange_periodically(self) -> None:
        while True:
            await trio.sleep(EXCHANGE_EVERY_S)
            async with trio.open_nursery() as sends:
                for peer in self.transport.peers():
                    sends.start_soon(self._send, peer)
            self.book.forget_stale()
            await trio.to_thread.run_sync(self.save_book)

    def save_book(self) -> None:
        """Save the book; a failed write (disk full, read-only home) is logged, rate-limited,
        and tried again at the next exchange (the book stays in memory, the old file stays)."""
        try:
            self.book.save()
        except OSError as exc:
            self._failures.warning(
                "save",
                "peers not saved to %s (%s); retrying every %.0f s: free space or fix the "
                "permissions of its directory",
                self.book.path,
                exc.strerror or exc,
                EXCHANGE_EVERY_S,
            )

    async def on_frame(self, peer: str, payload: bytes) -> None:
        """Handler of PEX_PROTOCOL: remember what ``peer`` says (or refuse it as a whole)."""
        try:
            entries = decode_entries(payload)
        except PeerExchangeError as exc:
            self.ledger.refused(peer, f"unreadable peer exchange: {exc}")
            log.warning("refused peer exchange from peer %s: %s", peer, exc)
            return
        for who, addrs in entries:
            self.heard(who, addrs, "itself" if who == peer else f"peer {peer}")

    def heard(self, peer: str, addrs: Iterable[str], source: str) -> None:
        """Remember the TCP addresses among ``addrs`` of ``peer`` (told by ``source``), for
        the transport and the dialing."""
        usable = []
        for addr in addrs:
            try:
                usable.append(check_tcp_addr(addr))
            except PeerExchangeError:
                continue
        if self.book.add(peer, usable, source):
            log.info("heard of peer %s at %s from %s", peer, ", ".join(usable), source)
        if usable:
            self.transport.add_addresses(peer, usable)

    # --------------------------------------------------------------------- dialing

    def to_dial(self, connected: set[str], now: float) -> list[str]:
        """Full addresses to dial now, up to the room below the target degree: bootstrap
        peers (every REDIAL_EVERY_S), then peers of the book (every BOOK_REDIAL_EVERY_S).
        Each at the newest address the book has for it: a bootstrap peer that came back on
        another port is dialed where it (or a peer) last said it is."""
        room = self.target_degree - len(connected)
        exclude = connected | {self.transport.peer_id}
        picked: list[str] = []
        bootstrap = {p for p, _ in self.bootstrap}
        newest = [(self.book.entries([p]) or [(p, a)])[0] for p, a in self.bootstrap]
        for peer, addrs in newest + self.book.candidates(exclude | bootstrap):
            if len(picked) >= room or peer in exclude:
                continue
            wait = REDIAL_EVERY_S if peer in bootstrap else BOOK_REDIAL_EVERY_S
            if now - self._last_dial.get(peer, -wait) < wait:
                continue
            self._last_dial[peer] = now
            exclude = exclude | {peer}
            picked.append(f"{addrs[0]}/p2p/{peer}")
        return picked

    async def _keep_neighbours(self) -> None:
        while True:
            connected = set(self.transport.peers())
            if len(self._last_dial) > 2 * MAX_KNOWN:
                self._last_dial.clear()
            addrs = self.to_dial(connected, trio.current_time())
            if addrs:
                async with trio.open_nursery() as dials:
                    for addr in addrs:
                        dials.start_soon(self._dial, addr)
            await trio.sleep(REDIAL_EVERY_S)

    async def _dial(self, addr: str) -> None:
        try:
            peer = await self.transport.connect(addr)
        except TransportError as exc:
            log.info("could not reach %s (will retry): %s", addr, exc)
            return
        log.info("connected to %s", peer)
