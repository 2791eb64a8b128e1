"""Keys and signatures of communities: Ed25519 keys parsed once per key, and signature checks
that never raise (peer ids are in ``p2pfl.peers``)."""

from __future__ import annotations

import functools

from libp2p.crypto.keys import PublicKey
from libp2p.crypto.serialization import deserialize_public_key

ED25519_KEY_PREFIX = b"\x08\x01\x12\x20"
"""Protobuf header of a serialized libp2p Ed25519 public key (type 1, 32 bytes)."""
SIGNATURE_BYTES = 64


@functools.lru_cache(maxsize=256)
def ed25519_public_key(data: bytes) -> PublicKey:
    """A serialized libp2p Ed25519 public key, parsed (ValueError if it is not one)."""
    if len(data) != len(ED25519_KEY_PREFIX) + 32 or not data.startswith(ED25519_KEY_PREFIX):
        raise ValueError("not an Ed25519 key")
    try:
        return deserialize_public_key(data)
    except Exception as exc:  # libp2p raises protobuf/nacl/crypto errors on bad keys
        raise ValueError(str(exc)) from None


def verify_signature(key: PublicKey, data: bytes, signature: bytes) -> bool:
    """True if ``signature`` is ``key``'s signature of ``data``; never raises (nacl raises on
    malformed signatures)."""
    try:
        return bool(key.verify(data, signature))
    except Exception:  # a malformed signature is a failed check, whatever the library raises
        return False
