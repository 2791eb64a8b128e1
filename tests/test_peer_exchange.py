"""Peer exchange: the frame format never lets garbage through, the book stays bounded and
survives restarts, dialing is paced, and three real transports find each other through one
bootstrap peer (the multi-process repair after the bootstrap node dies is in
test_daemon_network.py)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import msgpack
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from p2pfl.daemon.peer_exchange import (
    BOOK_FILE,
    BOOK_REDIAL_EVERY_S,
    FORGET_AFTER_S,
    MAX_ADDRS,
    MAX_ENTRIES,
    PeerBook,
    PeerExchange,
    PeerExchangeError,
    decode_entries,
    encode_entries,
)
from p2pfl.daemon.peers import PeerLedger
from p2pfl.daemon.transport import Transport

PEERS = [str(ID.from_pubkey(create_new_key_pair().public_key)) for _ in range(6)]
ADDR = "/ip4/10.0.0.{}/tcp/4001"
NOW = time.time()


def test_frames_round_trip_and_are_bounded():
    entries = [(p, (ADDR.format(i), f"/ip6/::1/tcp/{4000 + i}")) for i, p in enumerate(PEERS)]
    assert decode_entries(encode_entries(entries)) == entries
    many = [(PEERS[0], tuple(ADDR.format(i) for i in range(10)))] * (MAX_ENTRIES + 5)
    decoded = decode_entries(encode_entries(many))
    assert len(decoded) == MAX_ENTRIES and len(decoded[0][1]) == MAX_ADDRS


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"a": 1}, "expected a list"),
        ([["not-a-peer", []]], "is not a peer id"),
        ([[PEERS[0], ["/ip4/1.2.3.4/udp/1"]]], "tcp/<port>"),
        ([[PEERS[0], ["/ip4/1.2.3.4/tcp/1/p2p/" + PEERS[1]]]], "tcp/<port>"),
        ([[PEERS[0], ["nonsense"]]], "is not a multiaddr"),
        ([[PEERS[0], [ADDR.format(1)] * 5]], "more than 4 addresses"),
        ([[PEERS[0]]], "is not [peer id"),
    ],
)
def test_bad_frames_are_refused_whole(body, reason):
    with pytest.raises(PeerExchangeError, match=reason.replace("[", r"\[")):
        decode_entries(msgpack.packb(body))


MSGPACK_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.text(max_size=60)
    | st.binary(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.binary(max_size=300), MSGPACK_VALUES.map(msgpack.packb)))
def test_random_frames_raise_only_peer_exchange_errors(data):
    try:
        entries = decode_entries(data)
    except PeerExchangeError:
        return
    assert decode_entries(encode_entries(entries)) == entries


def test_book_is_bounded_saved_and_reloaded(tmp_path: Path):
    book = PeerBook(PEERS[0], tmp_path, max_known=3)
    assert not book.add(PEERS[0], [ADDR.format(0)], "itself")  # never ourselves
    for i, peer in enumerate(PEERS[1:5], start=1):
        assert book.add(peer, [ADDR.format(i)], "peer x", now=NOW + i)
    assert set(book.known) == set(PEERS[2:5])  # the one heard of longest ago went
    assert not book.add(PEERS[4], [ADDR.format(9)], "peer y", now=NOW + 100)
    assert book.known[PEERS[4]].addrs == (ADDR.format(9), ADDR.format(4))
    assert [p for p, _ in book.candidates({PEERS[3]})] == [PEERS[4], PEERS[2]]
    book.save()
    assert (tmp_path / BOOK_FILE).stat().st_mode & 0o777 == 0o600

    again = PeerBook(PEERS[0], tmp_path)
    again.load()
    assert {p: k.addrs for p, k in again.known.items()} == {
        p: k.addrs for p, k in book.known.items()
    }
    assert {k.source for k in again.known.values()} == {"saved"}
    again.forget_stale(now=NOW + 3 + FORGET_AFTER_S + 1)  # nobody mentioned PEERS[3] since
    assert set(again.known) == {PEERS[4]}


def test_a_damaged_book_is_ignored_with_a_warning(tmp_path: Path, caplog):
    (tmp_path / BOOK_FILE).write_text(json.dumps({PEERS[1]: {"addrs": ["bad"], "heard": 1}}))
    book = PeerBook(PEERS[0], tmp_path)
    with caplog.at_level(logging.WARNING, logger="p2pfl.peers"):
        book.load()
    assert book.known == {} and "ignoring the saved peers" in caplog.text


def test_dialing_fills_the_room_bootstrap_first_and_is_paced():
    class FakeTransport:
        peer_id = PEERS[0]

        def add_addresses(self, peer, addrs):
            pass

    bootstrap = [f"{ADDR.format(1)}/p2p/{PEERS[1]}"]
    book = PeerBook(PEERS[0])
    for i in (2, 3, 4):
        book.add(PEERS[i], [ADDR.format(i)], "peer x", now=float(i))
    pex = PeerExchange(book, FakeTransport(), PeerLedger(), bootstrap, target_degree=3)  # type: ignore[arg-type]
    assert pex.to_dial(set(), now=100.0) == [
        bootstrap[0],
        f"{ADDR.format(4)}/p2p/{PEERS[4]}",
        f"{ADDR.format(3)}/p2p/{PEERS[3]}",
    ]
    # 3.5 s later: the bootstrap peer is due again, and the book's peer left out for lack
    # of room; the two dialed book peers wait 30 s
    assert pex.to_dial(set(), now=103.5) == [bootstrap[0], f"{ADDR.format(2)}/p2p/{PEERS[2]}"]
    assert pex.to_dial({PEERS[1], PEERS[4]}, now=100 + BOOK_REDIAL_EVERY_S + 1) == [
        f"{ADDR.format(3)}/p2p/{PEERS[3]}"
    ]
    assert pex.to_dial({PEERS[1], PEERS[2], PEERS[3]}, now=1000.0) == []  # no room
    # the bootstrap peer came back on another port and said so: dialed there
    pex.heard(PEERS[1], ["/ip4/10.0.0.1/tcp/5001"], "itself")
    assert pex.to_dial({PEERS[2], PEERS[3]}, now=2000.0) == [
        f"/ip4/10.0.0.1/tcp/5001/p2p/{PEERS[1]}"
    ]


def test_three_transports_find_each_other_through_one_bootstrap_peer(tmp_path: Path):
    """B and C only know A; peer exchange makes B dial C, and B can send to C (as dynamic's
    widening would) before it ever connected to it. A garbage frame is refused and counted."""

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nodes = []
            for name in "abc":
                holder: dict[str, PeerExchange] = {}
                transport = Transport(
                    create_new_key_pair(),
                    on_peer_connected=lambda p, h=holder: h["pex"].peer_up(p),
                )
                await nursery.start(_serve, transport)
                pex = PeerExchange(
                    PeerBook(transport.peer_id, tmp_path / name),
                    transport,
                    transport.ledger,
                    [] if name == "a" else [nodes[0][0].listen_addrs[0]],
                    target_degree=4,
                )
                holder["pex"] = pex
                (tmp_path / name).mkdir()
                nodes.append((transport, pex))
            a, b, c = (t for t, _ in nodes)
            inbox: trio.MemorySendChannel[bytes]
            inbox, received = trio.open_memory_channel[bytes](1)

            async def deliver(peer: str, payload: bytes) -> None:
                await inbox.send(payload)

            c.set_handler("/p2pfl/test/1", deliver)
            for _, pex in nodes:
                pex.start(nursery)
            with trio.fail_after(30):
                while c.peer_id not in b.peers():
                    await trio.sleep(0.1)
            assert b.peer_id in c.peers()
            book = nodes[1][1].book
            assert book.known[c.peer_id].source in ("itself", f"peer {a.peer_id}")
            await b.send(c.peer_id, "/p2pfl/test/1", b"hello")
            assert await received.receive() == b"hello"
            await a.send(b.peer_id, "/p2pfl/peers/1.0.0", b"\xc1")
            record = b.ledger.get(a.peer_id)
            assert record is not None and record.refused == 1
            assert (
                record.last_refusal is not None
                and "unreadable peer exchange" in record.last_refusal
            )
            nursery.cancel_scope.cancel()

    trio.run(main)


async def _serve(transport: Transport, task_status=trio.TASK_STATUS_IGNORED) -> None:
    async with transport:
        task_status.started()
        await trio.sleep_forever()
