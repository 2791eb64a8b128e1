"""A node's memberships on disk: ``DIR/communities/<id>/manifest.toml`` (the signed manifest)
and ``membership.toml`` (the node's invite with its private key, when it joined, its bootstrap
addresses; mode 0600 like every file written here, as the invite private key is a secret).

A community directory appears and disappears with one rename, so a running node re-reading
the store never sees half a membership. Every manifest is verified on load; nothing is written
before the membership rule (``check_membership``) admits this node.
"""

from __future__ import annotations

import base64
import binascii
import os
import shutil
import tempfile
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2pfl.community import CommunityError
from p2pfl.community.fields import MAX_MANIFEST_CHARS, MAX_TIME, format_time, toml_string
from p2pfl.community.invite import (
    INVITE_KEY_BYTES,
    MAX_INVITE_BYTES,
    TOKEN_PREFIX,
    HeldInvite,
    Invite,
    check_membership,
    held_invite,
    read_token,
)
from p2pfl.community.manifest import Manifest, load_manifest
from p2pfl.files import write_private_atomically
from p2pfl.peers import MAX_ADDRESS_CHARS, parse_peer_address

COMMUNITIES_DIR = "communities"
MANIFEST_FILE = "manifest.toml"
MEMBERSHIP_FILE = "membership.toml"
MAX_BOOTSTRAP = 64
_MEMBERSHIP_KEYS = frozenset({"invite", "invite_key", "joined", "bootstrap"})


@dataclass(frozen=True)
class Membership:
    """This node's membership in one community."""

    manifest: Manifest
    invite: HeldInvite | None
    """The invite this node proves its membership with, or None (founder, open community)."""
    joined: int
    """Unix seconds."""
    bootstrap: tuple[str, ...]
    """Full peer addresses (``/ip4/.../tcp/.../p2p/...``) to find the community's members."""

    @property
    def id(self) -> str:
        return self.manifest.id


def communities_dir(home: Path) -> Path:
    return home / COMMUNITIES_DIR


def load_memberships(home: Path) -> list[Membership]:
    """Every membership stored in ``home``, each manifest verified, sorted by name."""
    root = communities_dir(home)
    if not root.is_dir():
        return []
    try:
        entries = sorted(root.iterdir())
    except OSError as exc:
        raise CommunityError(f"cannot read {root}: {exc}") from None
    memberships = [_load_one(entry) for entry in entries if not entry.name.startswith(".")]
    return sorted(memberships, key=lambda m: (m.manifest.name, m.id))


def find_membership(home: Path, community: str) -> Membership:
    """The membership named by ``community``: an id, a unique id prefix, or a unique name."""
    memberships = load_memberships(home)
    key = community.strip()
    matches = [m for m in memberships if m.id == key]
    if not matches and key:
        matches = [m for m in memberships if m.id.startswith(key.lower())]
    if not matches:
        matches = [m for m in memberships if m.manifest.name == key]
    if len(matches) == 1:
        return matches[0]
    if matches:
        listed = ", ".join(f"{m.id[:12]} ({m.manifest.name})" for m in matches)
        raise CommunityError(
            f"{community!r} names several communities: {listed}; give more of the id"
        )
    known = ", ".join(f"{m.id[:12]} ({m.manifest.name})" for m in memberships) or "none"
    raise CommunityError(
        f"this node ({home}) is not a member of {community!r}; its communities: {known} "
        "(see `p2pfl community list`)"
    )


def save_membership(home: Path, membership: Membership) -> None:
    """Write (or replace) a membership; each file is replaced atomically, a new community
    directory appears at once."""
    root = communities_dir(home)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    files = {
        MANIFEST_FILE: membership.manifest.to_toml(),
        MEMBERSHIP_FILE: _membership_toml(membership),
    }
    target = root / membership.id
    if target.is_dir():
        for name, text in files.items():
            write_private_atomically(target / name, text.encode())
        return
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{membership.id}.new-"))
    try:
        for name, text in files.items():
            write_private_atomically(staging / name, text.encode())
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def remove_membership(home: Path, community: str) -> Manifest:
    """Leave ``community`` (id, unique id prefix or name): its directory disappears at once.
    Returns the manifest of the community left."""
    membership = find_membership(home, community)
    root = communities_dir(home)
    doomed = Path(tempfile.mkdtemp(dir=root, prefix=f".{membership.id}.gone-"))
    os.rename(root / membership.id, doomed / membership.id)
    shutil.rmtree(doomed, ignore_errors=True)
    return membership.manifest


def join(
    home: Path, token_or_manifest: str, peer_id: str, bootstrap: Sequence[str], now: int
) -> Membership:
    """Join with an invite token, a signed manifest file, or signed manifest text, as
    ``peer_id``; everything is verified before anything is written. Joining a community
    again replaces the invite (e.g. a renewed one) and, if given, the bootstrap list."""
    text = token_or_manifest.strip()
    invite: HeldInvite | None = None
    if text.startswith(TOKEN_PREFIX):
        invite, manifest = read_token(text)
    elif "\n" in text:
        manifest = load_manifest(text, "the given manifest text")
    else:
        manifest = load_manifest(_read_manifest_file(Path(text)), text)
    check_membership(Membership(manifest, invite, now, ()), peer_id, now)
    addresses = tuple(check_bootstrap(addr) for addr in bootstrap)
    if len(addresses) > MAX_BOOTSTRAP:
        raise CommunityError(f"{len(addresses)} bootstrap addresses; give at most {MAX_BOOTSTRAP}")
    memberships = load_memberships(home)
    check_disjoint_sharing(manifest, [m for m in memberships if m.id != manifest.id])
    previous = next((m for m in memberships if m.id == manifest.id), None)
    if previous is not None and not addresses:
        addresses = previous.bootstrap
    membership = Membership(manifest, invite, now, addresses)
    save_membership(home, membership)
    return membership


def check_disjoint_sharing(manifest: Manifest, memberships: Sequence[Membership]) -> None:
    """Refuse a community that would share a parameter another membership already shares
    (each parameter syncs under one community's policy)."""
    ours = set(manifest.schema.names)
    for other in memberships:
        overlap = sorted(ours & set(other.manifest.schema.names))
        if overlap:
            raise CommunityError(
                f"community {manifest.name!r} shares {overlap[0]!r}, which this node already "
                f"shares with {other.manifest.name!r} ({other.id[:12]}); a parameter can be "
                "shared with one community at a time: leave that one first"
            )


def check_bootstrap(address: str) -> str:
    """Return ``address`` if it is a full peer address, else raise ``CommunityError``."""
    text = address.strip()
    try:
        parse_peer_address(text)
    except ValueError:
        raise CommunityError(
            f"bootstrap {address!r} is not a full peer address; copy the "
            "/ip4/<ip>/tcp/<port>/p2p/<peer id> line printed by `p2pfl node start`"
        ) from None
    return text


# -- files -------------------------------------------------------------------------------------


def _load_one(directory: Path) -> Membership:
    manifest_path = directory / MANIFEST_FILE
    membership_path = directory / MEMBERSHIP_FILE
    fix = f"restore it, or remove {directory} to leave that community"
    try:
        manifest = load_manifest(_read_text(manifest_path), str(manifest_path))
    except (CommunityError, OSError) as exc:
        raise CommunityError(f"{exc}; {fix}") from None
    if manifest.id != directory.name:
        raise CommunityError(
            f"{manifest_path} is the manifest of community {manifest.id}, not of "
            f"{directory.name}; {fix}"
        )
    try:
        data = tomllib.loads(_read_text(membership_path))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise CommunityError(f"{membership_path}: {exc}; {fix}") from None
    if "credential" in data:
        raise CommunityError(
            f"{membership_path} holds an old bearer invite ('credential') that peers no longer "
            f"accept; remove {directory}, then join again with a new invite from the founder"
        )
    try:
        invite, joined, bootstrap = _membership_fields(data)
    except ValueError as exc:
        raise CommunityError(f"{membership_path}: {exc}; {fix}") from None
    return Membership(manifest, invite, joined, bootstrap)


def _membership_fields(data: dict[str, Any]) -> tuple[HeldInvite | None, int, tuple[str, ...]]:
    unknown = sorted(set(data) - _MEMBERSHIP_KEYS)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown}")
    invite = None
    if "invite" in data or "invite_key" in data:
        public = _base64_field(data, "invite", MAX_INVITE_BYTES)
        private = _base64_field(data, "invite_key", INVITE_KEY_BYTES)
        try:
            invite = held_invite(Invite.from_bytes(public), private)
        except CommunityError as exc:
            raise ValueError(str(exc)) from None
    joined = data.get("joined")
    if isinstance(joined, bool) or not isinstance(joined, int) or not 0 <= joined <= MAX_TIME:
        raise ValueError("joined must be unix seconds")
    bootstrap = data.get("bootstrap", [])
    if (
        not isinstance(bootstrap, list)
        or len(bootstrap) > MAX_BOOTSTRAP
        or not all(isinstance(a, str) and len(a) <= MAX_ADDRESS_CHARS for a in bootstrap)
    ):
        raise ValueError(f"bootstrap must be a list of at most {MAX_BOOTSTRAP} addresses")
    return invite, joined, tuple(bootstrap)


def _base64_field(data: dict[str, Any], key: str, max_bytes: int) -> bytes:
    raw = data.get(key)
    if not isinstance(raw, str) or len(raw) > 2 * max_bytes:
        raise ValueError(f"{key} must be a base64 string (invite and invite_key go together)")
    try:
        return base64.b64decode(raw, validate=True)
    except binascii.Error:
        raise ValueError(f"{key} is not valid base64") from None


def _membership_toml(membership: Membership) -> str:
    lines = [
        f"# membership of this node in community {membership.manifest.name!r}",
        "# written by `p2pfl community join/create`; remove it with `p2pfl community leave`",
        f"joined = {membership.joined}  # {format_time(membership.joined)}",
    ]
    if membership.invite is not None:
        public = base64.b64encode(membership.invite.invite.to_bytes()).decode("ascii")
        private = base64.b64encode(membership.invite.private_key).decode("ascii")
        lines += [
            f'invite = "{public}"  # signed by the founder; peers see it with a proof',
            f'invite_key = "{private}"  # secret: proves the invite, never leaves this node',
        ]
    addresses = ", ".join(toml_string(a) for a in membership.bootstrap)
    lines.append(f"bootstrap = [{addresses}]")
    return "\n".join(lines) + "\n"


def _read_manifest_file(path: Path) -> str:
    try:
        return _read_text(path)
    except OSError as exc:
        raise CommunityError(
            f"{str(path)[:200]!r} is neither an invite token ({TOKEN_PREFIX}...) nor a readable "
            f"signed manifest file ({exc.strerror or exc})"
        ) from None


def _read_text(path: Path) -> str:
    """Read a UTF-8 file of bounded size (``OSError`` if missing, too large or not text)."""
    with path.open("rb") as f:
        data = f.read(MAX_MANIFEST_CHARS * 4 + 1)
    if len(data) > MAX_MANIFEST_CHARS * 4:
        raise OSError(f"{path} is too large")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise OSError(f"{path} is not UTF-8 text") from None
