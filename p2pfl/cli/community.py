"""``p2pfl community create|invite|join|leave|list``: manage this node's communities.

Every command works on the node's directory (``--home``); a running node is asked to re-read
its communities after a change. The community library (torch, libp2p) is imported inside the
commands, so ``p2pfl --help`` stays fast.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from p2pfl.cli.exits import command_group
from p2pfl.cli.jsonout import JSON, print_json
from p2pfl.daemon.config import KEY_FILE
from p2pfl.daemon.control import ControlError, request, socket_path

if TYPE_CHECKING:
    from libp2p.crypto.keys import KeyPair

    from p2pfl.community.store import Membership

app = command_group(no_args_is_help=True)
console = Console(stderr=True, highlight=False, soft_wrap=True)

HOME = typer.Option(..., "--home", help="The node's directory (identity, config, communities).")
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"(\d{1,9})([smhdw])")


def parse_duration(text: str) -> int | None:
    """Seconds in ``30m``, ``12h``, ``7d``, ``2w``, ``90s``; None for ``never``."""
    from p2pfl.community import CommunityError

    value = text.strip().lower()
    if value == "never":
        return None
    match = _DURATION.fullmatch(value)
    if not match or int(match.group(1)) == 0:
        raise CommunityError(
            f"--expires {text!r}: write a positive duration such as 30m, 12h, 7d, 2w, or never"
        )
    return int(match.group(1)) * DURATION_UNITS[match.group(2)]


@app.command()
def create(
    manifest_file: Path = typer.Argument(..., metavar="MANIFEST.toml", help="Draft manifest."),
    home: Path = HOME,
    as_json: bool = JSON,
) -> None:
    """Sign a draft manifest with this node's key; the node becomes the founder and a member."""
    from p2pfl.community import CommunityError
    from p2pfl.community.draft import create_manifest
    from p2pfl.community.store import MANIFEST_FILE, communities_dir, join

    try:
        draft = manifest_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CommunityError(f"cannot read the draft manifest {manifest_file}: {exc}") from None
    key_pair = _identity(home, create=True)
    founder = _peer_id(key_pair)
    manifest = create_manifest(draft, str(manifest_file), key_pair, int(time.time()))
    membership = join(home, manifest.to_toml(), founder, [], int(time.time()))
    manifest_path = communities_dir(home) / membership.id / MANIFEST_FILE
    if as_json:
        print_json(
            {
                "id": membership.id,
                "name": manifest.name,
                "manifest": str(manifest_path),
                "founder": founder,
            }
        )
    else:
        print(f"id {membership.id}")
        print(f"manifest {manifest_path}")
    console.print(
        f"community {escape(manifest.name)!r} created; this node ({founder}) is its founder. "
        f"Invite members with: p2pfl community invite --home {escape(str(home))} "
        f"{membership.id[:12]}"
    )
    _notify_node(home)


@app.command()
def invite(
    community: str = typer.Argument(..., help="Community id, id prefix or name."),
    home: Path = HOME,
    for_peer: str | None = typer.Option(
        None, "--for", metavar="PEER_ID", help="Only this peer may use the invite."
    ),
    expires: str = typer.Option("7d", "--expires", help="30m, 12h, 7d, 2w or never."),
    as_json: bool = JSON,
) -> None:
    """Print an invite token (founder only); the token alone suffices to join, so hand it to
    the invitee privately (it holds the invite's private key)."""
    from p2pfl.community.fields import format_time
    from p2pfl.community.invite import issue_invite, make_token
    from p2pfl.community.store import find_membership

    lifetime = parse_duration(expires)
    manifest = find_membership(home, community).manifest
    key_pair = _identity(home, create=False)
    expiry = None if lifetime is None else int(time.time()) + lifetime
    token = make_token(issue_invite(manifest, key_pair, for_peer, expiry), manifest)
    if as_json:
        print_json(
            {
                "token": token,
                "community": manifest.id,
                "name": manifest.name,
                "for": for_peer,
                "expires": expiry,
            }
        )
    else:
        print(token)
    who = f"peer {for_peer}" if for_peer else "whoever holds it"
    until = "never expires" if expiry is None else f"expires at {format_time(expiry)}"
    console.print(f"invite to {escape(manifest.name)!r} for {escape(who)}; it {until}")
    if for_peer is None:
        console.print(
            "anyone who gets this token can join: hand it over privately, or bind the invite "
            "to one node with --for PEER_ID (peers never see the token, only proofs made with it)"
        )
    if manifest.admission == "open":
        console.print("(the community is open: the manifest alone also suffices to join)")


@app.command()
def join(
    token_or_manifest: str = typer.Argument(
        ..., metavar="TOKEN_OR_MANIFEST", help="An invite token or a signed manifest file."
    ),
    home: Path = HOME,
    bootstrap: list[str] = typer.Option(
        [], "--bootstrap", metavar="MULTIADDR", help="A member's address; repeatable."
    ),
    as_json: bool = JSON,
) -> None:
    """Join a community with an invite token, or with its signed manifest if it is open."""
    from p2pfl.community.store import join as join_community

    peer_id = _peer_id(_identity(home, create=True))
    membership = join_community(home, token_or_manifest, peer_id, bootstrap, int(time.time()))
    if as_json:
        print_json(
            {
                "id": membership.id,
                "name": membership.manifest.name,
                "peer_id": peer_id,
                "bootstrap": list(membership.bootstrap),
                **_invite_fields(membership),
            }
        )
    else:
        print(f"joined {membership.manifest.name!r} ({membership.id}) as {peer_id}")
    console.print(f"invite: {_expiry_text(membership)}")
    _notify_node(home)


@app.command()
def leave(
    community: str = typer.Argument(..., help="Community id, id prefix or name."),
    home: Path = HOME,
    as_json: bool = JSON,
) -> None:
    """Leave a community: this node stops sharing with it at once."""
    from p2pfl.community.store import remove_membership

    manifest = remove_membership(home, community)
    if as_json:
        print_json({"id": manifest.id, "name": manifest.name, "left": True})
    else:
        print(f"left {manifest.name!r} ({manifest.id})")
    _notify_node(home)


@app.command("list")
def list_communities(home: Path = HOME, as_json: bool = JSON) -> None:
    """Show this node's communities: role, admission, shared parameters, policy, credential."""
    from p2pfl.community import CommunityError
    from p2pfl.community.store import load_memberships

    if not home.is_dir():
        raise CommunityError(
            f"{home} does not exist; create it with `p2pfl node init --home {home}`"
        )
    memberships = load_memberships(home)
    me = _peer_id(_identity(home, create=False)) if (home / KEY_FILE).exists() else None
    if as_json:
        print_json({"communities": [_list_entry(m, me) for m in memberships]})
        return
    if not memberships:
        print("no communities; create one (p2pfl community create) or join one")
        return
    table = Table(box=box.SIMPLE_HEAD)
    for column in ("id", "name", "role", "admission", "shared", "protocol", "credential"):
        table.add_column(column, overflow="fold", no_wrap=column in ("id", "role", "admission"))
    for m in memberships:
        manifest = m.manifest
        table.add_row(
            m.id[:12],
            escape(manifest.name),
            "founder" if manifest.founder == me else "member",
            manifest.admission,
            escape(", ".join(manifest.shared)),
            escape(manifest.protocol),
            escape(_expiry_text(m)),
        )
    out = Console(highlight=False)
    if not out.is_terminal:  # piped: no terminal width to respect, keep rows on one line
        out = Console(highlight=False, width=200)
    out.print(table)


def _list_entry(membership: Membership, me: str | None) -> dict[str, object]:
    """One community of ``list --json``: the full id and every column of the table."""
    manifest = membership.manifest
    return {
        "id": membership.id,
        "name": manifest.name,
        "role": "founder" if manifest.founder == me else "member",
        "admission": manifest.admission,
        "shared": list(manifest.shared),
        "protocol": manifest.protocol,
        "founder": manifest.founder,
        "bootstrap": list(membership.bootstrap),
        **_invite_fields(membership),
    }


def _invite_fields(membership: Membership) -> dict[str, object]:
    """The credential column as data: ``credential`` (what the table shows) and
    ``invite_expires`` (unix seconds, None if it never expires or none is needed)."""
    invite = membership.invite
    return {
        "credential": _expiry_text(membership),
        "invite_expires": None if invite is None else invite.invite.expires,
    }


def _expiry_text(membership: Membership) -> str:
    from p2pfl.community.fields import format_time

    if membership.invite is None:
        return "none needed" if membership.manifest.admission == "open" else "founder"
    expiry = membership.invite.invite.expires
    if expiry is None:
        return "never expires"
    state = "expired" if expiry <= time.time() else "expires"
    return f"{state} {format_time(expiry)}"


def _identity(home: Path, create: bool) -> KeyPair:
    """The node's key pair from DIR/identity.key (created if missing and ``create``)."""
    from p2pfl.community import CommunityError
    from p2pfl.daemon.identity import load_or_create_identity

    path = home / KEY_FILE
    if not create and not path.exists():
        raise CommunityError(f"{path} does not exist: this directory has no node identity")
    return load_or_create_identity(path)


def _peer_id(key_pair: KeyPair) -> str:
    from p2pfl.peers import peer_id_of

    return peer_id_of(key_pair.public_key)


def _notify_node(home: Path) -> None:
    """Ask a node running in ``home`` to re-read its communities; say whether it did."""
    if not socket_path(home).exists():
        console.print(f"no node is running in {escape(str(home))}; it applies this at start")
        return
    try:
        reply = request(home, "communities")
    except ControlError as exc:
        console.print(f"[yellow]warning:[/yellow] {escape(str(exc))}; restart the node to apply")
        return
    if reply.get("ok") is True:
        count = len(reply.get("communities") or [])
        noun = "community" if count == 1 else "communities"
        console.print(f"the running node applied the change; it is now in {count} {noun}")
    else:
        reason = str(reply.get("error", reply))
        console.print(
            f"[yellow]warning:[/yellow] the running node did not apply the change: {escape(reason)}"
        )
