"""Invites: the founder's signed permission for a peer to join an invite-only community.

An ``Invite`` names the community id, the issuer (the founder), optionally the one peer it is
for, and optionally an expiry. Its compact msgpack form (``to_bytes``) is the member's
*credential*: a node keeps it and presents it to every peer it syncs with, and
``check_credential`` is the one membership rule, at join time and at every stream. A *token*
(``make_token``) bundles an invite with the signed manifest, so a token alone suffices to join.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Any

import base58
import msgpack
from libp2p.crypto.keys import KeyPair

from p2pfl.community.manifest import (
    MAX_MANIFEST_CHARS,
    MAX_PEER_ID_CHARS,
    MAX_TIME,
    CommunityError,
    Manifest,
    format_time,
    founder_public_key,
    load_manifest,
    peer_id_of,
    verify_signature,
)

INVITE_FORMAT = "p2pfl-invite-v1"
INVITE_DOMAIN = INVITE_FORMAT.encode()
"""Prefix of the signed bytes, so an invite signature can never pass for anything else."""
TOKEN_PREFIX = "p2pfl-invite:"
MAX_TOKEN_CHARS = 64 * 1024
MAX_CREDENTIAL_BYTES = 1024
_SIGNATURE_BYTES = 64
_COMMUNITY_ID = re.compile(r"[0-9a-f]{32}")
_BASE58 = re.compile(r"[1-9A-HJ-NP-Za-km-z]+")


@dataclass(frozen=True)
class Invite:
    """Permission, signed by the founder, to be a member of one community."""

    community: str
    """Community id."""
    issuer: str
    """Peer id of the founder who signed it."""
    for_peer: str | None
    """The one peer it admits, or None for whoever holds it."""
    expires: int | None
    """Unix seconds after which it admits nobody, or None for never."""
    signature: bytes

    def signed_bytes(self) -> bytes:
        """What the issuer signs: a domain prefix, then msgpack of every field but the
        signature."""
        body = [self.community, self.issuer, self.for_peer, self.expires]
        return INVITE_DOMAIN + msgpack.packb(body, use_bin_type=True)

    def to_bytes(self) -> bytes:
        """The compact form: the member's credential."""
        body = [self.community, self.issuer, self.for_peer, self.expires, self.signature]
        return msgpack.packb(body, use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> Invite:
        """Parse a credential; anything malformed raises ``CommunityError``."""
        if not isinstance(data, bytes):
            raise CommunityError("a credential must be bytes")
        if len(data) > MAX_CREDENTIAL_BYTES:
            raise CommunityError(
                f"credential of {len(data)} bytes is larger than any invite "
                f"({MAX_CREDENTIAL_BYTES}); it is not an invite"
            )
        fields = _unpack(data, "credential")
        if not isinstance(fields, list) or len(fields) != 5:
            raise CommunityError("credential is not an invite (expected 5 fields)")
        community, issuer, for_peer, expires, signature = fields
        if not isinstance(community, str) or not _COMMUNITY_ID.fullmatch(community):
            raise CommunityError("credential: community must be a 32-hex-digit community id")
        if not _is_peer_id_text(issuer):
            raise CommunityError("credential: issuer must be a peer id")
        if for_peer is not None and not _is_peer_id_text(for_peer):
            raise CommunityError("credential: for_peer must be a peer id or nil")
        if expires is not None and not _is_time(expires):
            raise CommunityError("credential: expires must be unix seconds or nil")
        if not isinstance(signature, bytes) or len(signature) != _SIGNATURE_BYTES:
            raise CommunityError(f"credential: signature must be {_SIGNATURE_BYTES} bytes")
        return cls(community, issuer, for_peer, expires, signature)


def issue_invite(
    manifest: Manifest, key_pair: KeyPair, for_peer: str | None, expires: int | None
) -> Invite:
    """Sign an invite to ``manifest``'s community; only its founder may."""
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
    unsigned = Invite(manifest.id, issuer, for_peer, expires, b"")
    signature = key_pair.private_key.sign(unsigned.signed_bytes())
    return Invite(manifest.id, issuer, for_peer, expires, signature)


def make_token(invite: Invite, manifest: Manifest) -> str:
    """``p2pfl-invite:`` + base64url of msgpack ``{invite, manifest}``: all a peer needs to
    join."""
    if invite.community != manifest.id:
        raise CommunityError("the invite is for another community than the manifest")
    body = {"invite": invite.to_bytes(), "manifest": manifest.to_toml()}
    packed = msgpack.packb(body, use_bin_type=True)
    token = TOKEN_PREFIX + base64.urlsafe_b64encode(packed).decode("ascii").rstrip("=")
    if len(token) > MAX_TOKEN_CHARS:
        raise CommunityError(
            f"the manifest is too large for an invite token ({len(token):,} characters, at "
            f"most {MAX_TOKEN_CHARS:,}); share the manifest file and invite with --for instead"
        )
    return token


def read_token(token: str) -> tuple[Invite, Manifest]:
    """Decode an invite token; verifies the manifest and that the founder signed the invite
    for that community (who may use it, and until when, is ``check_credential``'s job)."""
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
    if (
        not isinstance(body, dict)
        or set(body) != {"invite", "manifest"}
        or not isinstance(body["invite"], bytes)
        or not isinstance(body["manifest"], str)
        or len(body["manifest"]) > MAX_MANIFEST_CHARS
    ):
        raise CommunityError("invite token is damaged (wrong structure); copy it again")
    invite = Invite.from_bytes(body["invite"])
    manifest = load_manifest(body["manifest"], "the invite token's manifest")
    verify_invite(manifest, invite)
    return invite, manifest


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


def check_credential(manifest: Manifest, peer_id: str, credential: bytes | None, now: int) -> None:
    """The membership rule: raise ``CommunityError`` unless ``peer_id`` may be a member of
    ``manifest``'s community at time ``now`` with ``credential`` (an ``Invite.to_bytes``)."""
    if peer_id == manifest.founder or manifest.admission == "open":
        return
    if credential is None:
        raise CommunityError(
            f"peer {peer_id} has no invite to {manifest.name!r}, which is invite-only; "
            f"ask the founder ({manifest.founder}) for one"
        )
    invite = Invite.from_bytes(credential)
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


def check_peer_id(text: str) -> str:
    """Return ``text`` if it is a libp2p peer id, else raise ``CommunityError``."""
    if not _is_peer_id_text(text) or not _is_multihash(base58.b58decode(text)):
        raise CommunityError(
            f"{text!r} is not a peer id (12D3KooW... or Qm...); copy it from "
            "`p2pfl node init` or `p2pfl node status`"
        )
    return text


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
