"""Peer ids and peer addresses: how a node names itself and where it finds another.

A peer id is the libp2p id of a node's Ed25519 key (``12D3KooW...``); a full peer address is a
multiaddr that ends in that id (``/ip4/<ip>/tcp/<port>/p2p/<peer id>``), the line a node
prints at start and the form of every bootstrap entry. libp2p is imported on first use, so the
command line validates addresses without loading it at start.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from libp2p.crypto.keys import PublicKey
    from libp2p.peer.id import ID
    from libp2p.peer.peerinfo import PeerInfo
    from multiaddr import Multiaddr

ADDRESS_FORM = "/ip4/<ip>/tcp/<port>/p2p/<peer id>"
MAX_ADDRESS_CHARS = 1000


def peer_id_of(public_key: PublicKey) -> str:
    """The peer id of a public key."""
    from libp2p.peer.id import ID

    return str(ID.from_pubkey(public_key))


def parse_peer_address(text: str) -> PeerInfo:
    """The peer id and dialable address of a full peer address; ValueError if ``text`` is not
    one (the message shows the expected form)."""
    from libp2p.peer.peerinfo import info_from_p2p_addr
    from multiaddr import Multiaddr

    try:
        if len(text) > MAX_ADDRESS_CHARS:
            raise ValueError(f"longer than {MAX_ADDRESS_CHARS} characters")
        return info_from_p2p_addr(Multiaddr(text))
    except Exception as exc:  # multiaddr parsing raises many unrelated types
        raise ValueError(
            f"{text!r} is not a full peer address ({exc}); expected {ADDRESS_FORM}"
        ) from None


def peer_of_address(text: str) -> str | None:
    """The peer id a full peer address ends in, None if ``text`` is not one."""
    try:
        return str(parse_peer_address(text).peer_id)
    except ValueError:
        return None


def parse_peer_id(text: str) -> ID:
    """The libp2p id of a peer id string; ValueError if it is not one."""
    from libp2p.peer.id import ID

    try:
        return ID.from_base58(text)
    except Exception as exc:  # base58 and multihash raise several types
        raise ValueError(f"{text!r} is not a valid peer id") from exc


def tcp_listen_address(text: str) -> Multiaddr:
    """A listen address, which must be plain TCP: ``/ip4|ip6/<host>/tcp/<port>``; ValueError
    naming the problem otherwise."""
    from multiaddr import Multiaddr

    try:
        addr = Multiaddr(text)
    except Exception as exc:  # multiaddr parsing raises many unrelated types
        raise ValueError(f"{text!r} is not a multiaddr ({exc})") from None
    protocols = [p.name for p in addr.protocols()]
    if len(protocols) != 2 or protocols[0] not in ("ip4", "ip6") or protocols[1] != "tcp":
        raise ValueError(f"{text!r} must be /ip4/<address>/tcp/<port> (TCP only, e.g. port 0)")
    return addr
