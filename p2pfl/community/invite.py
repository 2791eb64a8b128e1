"""Invites and membership credentials: proof of possession, never a bearer secret on the wire.

``issue_invite`` makes a fresh Ed25519 *invite key pair*; the founder signs the invite's public
part (``Invite``: community id, issuer, optionally the one peer it is for, optionally an
expiry, and the invite public key). The invitee gets a *token* (``make_token``): that public
part, the invite private key and the signed manifest, so a token alone suffices to join; its
membership keeps the ``HeldInvite`` (public part + private key) in a 0600 file.

The invite private key never leaves the member's node. What a member shows a peer is a
*credential* (``make_credential``): the public part plus a *proof*, the invite key's signature
over a domain-separated binding of (community id, prover peer id, verifier peer id). A
credential therefore only convinces the one verifier it was made for, and only of the one
prover it names, which the verifier compares with the Noise-authenticated peer id of the
stream: whoever captures it (the verifier itself included) cannot replay it to a third node.
``check_credential`` is the one membership rule, at join time and at every hello (admission,
``p2pfl.protocol.admission``, caches its result until the invite expires). The
founder needs no credential (its peer id proves it); an open community admits anyone.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import base58
import msgpack
from libp2p.crypto.ed25519 import Ed25519PrivateKey, Ed25519PublicKey, create_new_key_pair
from libp2p.crypto.keys import KeyPair

from p2pfl.community import CommunityError
from p2pfl.community.fields import MAX_MANIFEST_CHARS, MAX_PEER_ID_CHARS, MAX_TIME, format_time
from p2pfl.community.keys import verify_signature
from p2pfl.community.manifest import Manifest, founder_public_key, load_manifest
from p2pfl.peers import peer_id_of

if TYPE_CHECKING:
    from p2pfl.community.store import Membership

INVITE_FORMAT = "p2pfl-invite-v2"
INVITE_DOMAIN = INVITE_FORMAT.encode()
"""Prefix of the bytes the founder signs, so an invite signature can never pass for anything
else (v1 invites had no invite key and were bearer credentials)."""
PROOF_DOMAIN = b"p2pfl-membership-proof-v1"
"""Prefix of the bytes an invite key signs: a proof can never pass for anything else."""
TOKEN_PREFIX = "p2pfl-invite:"
MAX_TOKEN_CHARS = 64 * 1024
MAX_INVITE_BYTES = 512
MAX_CREDENTIAL_BYTES = 1024
INVITE_KEY_BYTES = 32
"""Raw Ed25519 key size (public key; the private key is stored as its 32-byte seed)."""
_SIGNATURE_BYTES = 64
_TOKEN_KEYS = frozenset({"invite", "key", "manifest"})
_V1_TOKEN_KEYS = frozenset({"invite", "manifest"})
_COMMUNITY_ID = re.compile(r"[0-9a-f]{32}")
_BASE58 = re.compile(r"[1-9A-HJ-NP-Za-km-z]+")


@dataclass(frozen=True)
class Invite:
    """The public part of an invite, signed by the founder: who may be a member, until when,
    and the invite public key whose signatures prove it."""

    community: str
    """Community id."""
    issuer: str
    """Peer id of the founder who signed it."""
    for_peer: str | None
    """The one peer it admits, or None for whoever holds the invite private key."""
    expires: int | None
    """Unix seconds after which it admits nobody, or None for never."""
    key: bytes
    """The invite public key (raw Ed25519, 32 bytes)."""
    signature: bytes

    def signed_bytes(self) -> bytes:
        """What the issuer signs: a domain prefix, then msgpack of every field but the
        signature."""
        body = [self.community, self.issuer, self.for_peer, self.expires, self.key]
        return INVITE_DOMAIN + msgpack.packb(body, use_bin_type=True)

    def to_bytes(self) -> bytes:
        """The compact form (msgpack), as it travels in tokens and credentials."""
        body = [self.community, self.issuer, self.for_peer, self.expires, self.key, self.signature]
        return msgpack.packb(body, use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> Invite:
        """Parse the compact form; anything malformed raises ``CommunityError``."""
        if not isinstance(data, bytes):
            raise CommunityError("an invite must be bytes")
        if len(data) > MAX_INVITE_BYTES:
            raise CommunityError(
                f"invite of {len(data)} bytes is larger than any invite ({MAX_INVITE_BYTES})"
            )
        fields = _unpack(data, "invite")
        if not isinstance(fields, list) or len(fields) != 6:
            raise CommunityError(
                "not an invite of this p2pfl version (expected 6 fields); ask the founder for "
                "a new invite"
            )
        community, issuer, for_peer, expires, key, signature = fields
        if not isinstance(community, str) or not _COMMUNITY_ID.fullmatch(community):
            raise CommunityError("invite: community must be a 32-hex-digit community id")
        if not _is_peer_id_text(issuer):
            raise CommunityError("invite: issuer must be a peer id")
        if for_peer is not None and not _is_peer_id_text(for_peer):
            raise CommunityError("invite: for_peer must be a peer id or nil")
        if expires is not None and not _is_time(expires):
            raise CommunityError("invite: expires must be unix seconds or nil")
        if not isinstance(key, bytes) or len(key) != INVITE_KEY_BYTES:
            raise CommunityError(f"invite: key must be a {INVITE_KEY_BYTES}-byte Ed25519 key")
        if not isinstance(signature, bytes) or len(signature) != _SIGNATURE_BYTES:
            raise CommunityError(f"invite: signature must be {_SIGNATURE_BYTES} bytes")
        return cls(community, issuer, for_peer, expires, key, signature)


@dataclass(frozen=True)
class HeldInvite:
    """An invite as its invitee holds it: the signed public part and the invite private key.
    Build it with ``held_invite`` (which checks that the two belong together)."""

    invite: Invite
    private_key: bytes = field(repr=False)
    """The invite private key (32-byte Ed25519 seed): secret, it never leaves the node."""

    def prove(self, prover: str, verifier: str) -> bytes:
        """A credential for ``prover`` to show ``verifier`` (useless to anyone else)."""
        proof = Ed25519PrivateKey.from_bytes(self.private_key).sign(
            proof_bytes(self.invite.community, prover, verifier)
        )
        return msgpack.packb([self.invite.to_bytes(), proof], use_bin_type=True)


def held_invite(invite: Invite, private_key: bytes) -> HeldInvite:
    """``HeldInvite(invite, private_key)`` if ``private_key`` is the private half of the
    invite's key, else ``CommunityError``."""
    if not isinstance(private_key, bytes) or len(private_key) != INVITE_KEY_BYTES:
        raise CommunityError(
            f"the invite private key must be {INVITE_KEY_BYTES} bytes; copy the whole token again"
        )
    public = Ed25519PrivateKey.from_bytes(private_key).get_public_key().to_bytes()
    if public != invite.key:
        raise CommunityError(
            "the invite private key does not belong to the invite (its public key differs): "
            "the token or membership file was altered; ask the founder for a new invite"
        )
    return HeldInvite(invite, private_key)


def proof_bytes(community: str, prover: str, verifier: str) -> bytes:
    """What an invite key signs to prove membership: a domain prefix, then msgpack of the
    community id, the prover's and the verifier's peer ids."""
    return PROOF_DOMAIN + msgpack.packb([community, prover, verifier], use_bin_type=True)


def issue_invite(
    manifest: Manifest, key_pair: KeyPair, for_peer: str | None, expires: int | None
) -> HeldInvite:
    """Make a fresh invite key pair and sign an invite to ``manifest``'s community with its
    public key; only the founder (``key_pair``) may."""
    issuer = peer_id_of(key_pair.public_key)
    if issuer != manifest.founder:
        raise CommunityError(
            f"only the founder ({manifest.founder}) can invite to community {manifest.name!r}; "
            f"this node is {issuer}"
        )
    if for_peer is not None:
        check_peer_id(for_peer)
    if expires is not None and not _is_time(expires):
        raise CommunityError(f"invite expiry {expires} is not a valid time")
    invite_keys = create_new_key_pair()
    key = invite_keys.public_key.to_bytes()
    unsigned = Invite(manifest.id, issuer, for_peer, expires, key, b"")
    signature = key_pair.private_key.sign(unsigned.signed_bytes())
    invite = Invite(manifest.id, issuer, for_peer, expires, key, signature)
    return held_invite(invite, invite_keys.private_key.to_bytes())


def make_token(held: HeldInvite, manifest: Manifest) -> str:
    """``p2pfl-invite:`` + base64url of msgpack ``{invite, key, manifest}``: all a peer needs
    to join. It holds the invite private key: hand it to the invitee only."""
    if held.invite.community != manifest.id:
        raise CommunityError("the invite is for another community than the manifest")
    body = {
        "invite": held.invite.to_bytes(),
        "key": held.private_key,
        "manifest": manifest.to_toml(),
    }
    packed = msgpack.packb(body, use_bin_type=True)
    token = TOKEN_PREFIX + base64.urlsafe_b64encode(packed).decode("ascii").rstrip("=")
    if len(token) > MAX_TOKEN_CHARS:
        raise CommunityError(
            f"the manifest is too large for an invite token ({len(token):,} characters, at "
            f"most {MAX_TOKEN_CHARS:,}); make the manifest smaller"
        )
    return token


def read_token(token: str) -> tuple[HeldInvite, Manifest]:
    """Decode an invite token; verifies the manifest, that the founder signed the invite for
    that community and that the private key is the invite's (who may use it, and until when,
    is ``check_credential``'s job)."""
    if not isinstance(token, str):
        raise CommunityError("an invite token must be text")
    if len(token) > MAX_TOKEN_CHARS:
        raise CommunityError(
            f"invite token of {len(token):,} characters is longer than any valid token "
            f"({MAX_TOKEN_CHARS:,}); copy it again"
        )
    text = token.strip()
    if not text.startswith(TOKEN_PREFIX):
        raise CommunityError(f"not an invite token: it must start with {TOKEN_PREFIX!r}")
    payload = text.removeprefix(TOKEN_PREFIX)
    try:
        padded = payload + "=" * (-len(payload) % 4)
        packed = base64.b64decode(padded, altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise CommunityError("invite token is damaged (not base64url); copy it again") from None
    body = _unpack(packed, "invite token")
    if isinstance(body, dict) and set(body) == _V1_TOKEN_KEYS:
        raise CommunityError(
            "this invite token is from an older p2pfl (a bearer invite without an invite key), "
            "which peers no longer accept; ask the founder for a new one"
        )
    if (
        not isinstance(body, dict)
        or set(body) != _TOKEN_KEYS
        or not isinstance(body["invite"], bytes)
        or not isinstance(body["key"], bytes)
        or not isinstance(body["manifest"], str)
        or len(body["manifest"]) > MAX_MANIFEST_CHARS
    ):
        raise CommunityError("invite token is damaged (wrong structure); copy it again")
    invite = Invite.from_bytes(body["invite"])
    held = held_invite(invite, body["key"])
    manifest = load_manifest(body["manifest"], "the invite token's manifest")
    verify_invite(manifest, invite)
    return held, manifest


def verify_invite(manifest: Manifest, invite: Invite) -> None:
    """Check that ``invite`` is for ``manifest``'s community and signed by its founder."""
    if invite.community != manifest.id:
        raise CommunityError(
            f"the invite is for another community ({invite.community}), not for "
            f"{manifest.name!r} ({manifest.id}); ask its founder for an invite"
        )
    key = founder_public_key(manifest, f"community {manifest.name!r}")
    if invite.issuer != manifest.founder or not verify_signature(
        key, invite.signed_bytes(), invite.signature
    ):
        raise CommunityError(
            f"the invite to {manifest.name!r} is forged or was altered after signing: its "
            f"signature is not the founder's ({manifest.founder}); ask the founder for a new one"
        )


def check_invite(manifest: Manifest, invite: Invite, peer_id: str, now: int) -> None:
    """Raise ``CommunityError`` unless ``invite`` admits ``peer_id`` to ``manifest``'s
    community at time ``now`` (founder's signature, community, peer, expiry)."""
    verify_invite(manifest, invite)
    if invite.for_peer is not None and invite.for_peer != peer_id:
        raise CommunityError(
            f"the invite to {manifest.name!r} was issued for peer {invite.for_peer}, not for "
            f"{peer_id}; ask the founder for an invite for this node"
        )
    if invite.expires is not None and now >= invite.expires:
        raise CommunityError(
            f"the invite to {manifest.name!r} expired at {format_time(invite.expires)}; "
            "ask the founder for a new one"
        )


def make_credential(membership: Membership, prover: str, verifier: str) -> bytes | None:
    """What ``prover`` (this node) shows ``verifier`` to prove its membership: the invite's
    public part and a proof bound to both peer ids; None if the membership holds no invite
    (the founder, or a member of an open community: none is needed)."""
    if membership.invite is None:
        return None
    return membership.invite.prove(prover, verifier)


def check_credential(
    manifest: Manifest, prover: str, verifier: str, credential: bytes | None, now: int
) -> float:
    """The membership rule: raise ``CommunityError`` unless ``prover`` (the authenticated peer
    id of the stream) may be a member of ``manifest``'s community at time ``now``, as shown to
    ``verifier`` (this node) by ``credential`` (from ``make_credential``). Returns until when
    (unix seconds, ``math.inf`` for ever) the credential admits ``prover``: the invite's expiry."""
    if prover == manifest.founder or manifest.admission == "open":
        return math.inf
    if credential is None:
        raise CommunityError(
            f"peer {prover} has no invite to {manifest.name!r}, which is invite-only; "
            f"ask the founder ({manifest.founder}) for one"
        )
    invite, proof = _parse_credential(credential)
    check_invite(manifest, invite, prover, now)
    if not verify_signature(
        Ed25519PublicKey.from_bytes(invite.key),
        proof_bytes(invite.community, prover, verifier),
        proof,
    ):
        raise CommunityError(
            f"the credential peer {prover} showed for {manifest.name!r} holds no proof bound to "
            f"this peer and verifier ({prover} -> {verifier}): it was captured from another "
            "exchange, or made without the invite's private key; a member proves itself with "
            "the invite private key from its token"
        )
    return math.inf if invite.expires is None else float(invite.expires)


def check_membership(membership: Membership, peer_id: str, now: int) -> None:
    """Raise ``CommunityError`` unless peers will admit ``peer_id`` with ``membership`` at
    ``now``: the rule its peers run, on a credential made for itself."""
    credential = make_credential(membership, peer_id, peer_id)
    check_credential(membership.manifest, peer_id, peer_id, credential, now)


def check_peer_id(text: str) -> str:
    """Return ``text`` if it is a libp2p peer id, else raise ``CommunityError``."""
    if not _is_peer_id_text(text) or not _is_multihash(base58.b58decode(text)):
        raise CommunityError(
            f"{text!r} is not a peer id (12D3KooW... or Qm...); copy it from "
            "`p2pfl node init` or `p2pfl node status`"
        )
    return text


def _parse_credential(data: bytes) -> tuple[Invite, bytes]:
    if not isinstance(data, bytes):
        raise CommunityError("a credential must be bytes")
    if len(data) > MAX_CREDENTIAL_BYTES:
        raise CommunityError(
            f"credential of {len(data)} bytes is larger than any credential "
            f"({MAX_CREDENTIAL_BYTES})"
        )
    fields = _unpack(data, "credential")
    if (
        not isinstance(fields, list)
        or len(fields) != 2
        or not isinstance(fields[0], bytes)
        or not isinstance(fields[1], bytes)
    ):
        raise CommunityError(
            "credential is not an invite with a membership proof (a bare or older-format "
            "invite is not accepted); the member needs a current p2pfl and invite"
        )
    invite = Invite.from_bytes(fields[0])
    if len(fields[1]) != _SIGNATURE_BYTES:
        raise CommunityError(f"credential: the proof must be {_SIGNATURE_BYTES} bytes")
    return invite, fields[1]


def _is_multihash(raw: bytes) -> bool:
    """An identity multihash (inlined key, e.g. Ed25519) or a sha2-256 one (e.g. RSA)."""
    identity = len(raw) >= 2 and raw[0] == 0x00 and raw[1] == len(raw) - 2
    sha256 = len(raw) == 34 and raw[0] == 0x12 and raw[1] == 0x20
    return identity or sha256


def _is_peer_id_text(value: Any) -> bool:
    return (
        isinstance(value, str)
        and len(value) <= MAX_PEER_ID_CHARS
        and _BASE58.fullmatch(value) is not None
    )


def _is_time(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and 0 <= value <= MAX_TIME


def _unpack(data: bytes, what: str) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception:  # msgpack raises ValueError subclasses, TypeError, UnicodeDecodeError
        raise CommunityError(f"{what} is damaged (not valid msgpack); copy it again") from None
