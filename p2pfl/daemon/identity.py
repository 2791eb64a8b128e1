"""The node's identity: its Ed25519 key pair in a private file (its peer id follows from it,
``peers.peer_id_of``)."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

from libp2p.crypto.ed25519 import create_new_key_pair as create_ed25519_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.identity_utils import load_identity

from p2pfl.errors import P2pflError
from p2pfl.files import write_private_atomically

log = logging.getLogger("p2pfl.transport")


class IdentityError(P2pflError, ValueError):
    """The node's identity key file cannot be read; the message says how to recover."""


def load_or_create_identity(path: Path) -> KeyPair:
    """Load the node key at `path`, or create an Ed25519 key there (mode 0600, atomic)."""
    if path.exists():
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            log.warning("identity file %s has mode %o; run: chmod 600 %s", path, mode, path)
        try:
            return load_identity(path)
        except ValueError as exc:
            raise IdentityError(
                f"{exc}. Restore {path} from a backup, or delete it to create a new identity "
                "(this node then gets a new peer id)."
            ) from exc
    key_pair = create_ed25519_key_pair()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_private_atomically(path, key_pair.private_key.serialize())
    return key_pair
