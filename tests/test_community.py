"""Community manifests, invites, the membership rule, the on-disk store and the CLI."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import socket
import threading
import tomllib
from base64 import b64decode, b64encode, urlsafe_b64decode, urlsafe_b64encode
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kit import MSGPACK_VALUES
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from typer.testing import CliRunner, Result

from p2pfl.cli import app
from p2pfl.cli.community import parse_duration
from p2pfl.community import CommunityError
from p2pfl.community.draft import create_manifest
from p2pfl.community.fields import MAX_TIME, format_time
from p2pfl.community.invite import (
    TOKEN_PREFIX,
    HeldInvite,
    Invite,
    check_credential,
    issue_invite,
    make_credential,
    make_token,
    read_token,
)
from p2pfl.community.manifest import Manifest, load_manifest
from p2pfl.community.store import (
    find_membership,
    join,
    load_memberships,
    remove_membership,
)
from p2pfl.learning.params import ParamSchema, ParamSpec
from p2pfl.peers import peer_id_of

NOW = 1_700_000_000
HOUR = 3600

DRAFT = """\
name = "digits body"
description = "Shares the body of a digits MLP."
admission = "invite"

[model]
factory = "mlp:hidden=64"
inputs = [64]
classes = 10
shared = ["fc1.*"]

[policy]
protocol = "dynamic"
b = 2
merge = "samples"
"""


@pytest.fixture(scope="module")
def founder() -> KeyPair:
    return create_new_key_pair()


@pytest.fixture(scope="module")
def other() -> KeyPair:
    return create_new_key_pair()


@pytest.fixture(scope="module")
def manifest(founder: KeyPair) -> Manifest:
    return create_manifest(DRAFT, "draft.toml", founder, NOW)


def peer(key_pair: KeyPair) -> str:
    return peer_id_of(key_pair.public_key)


VERIFIER = peer(create_new_key_pair())
"""The member a credential is shown to, in the membership-rule tests."""
THIRD = peer(create_new_key_pair())


def with_own_key(invite: Invite) -> HeldInvite:
    """``invite`` with its key replaced by a fresh key pair's, and that pair's private key:
    what a forger who makes up an invite holds."""
    invite_keys = create_new_key_pair()
    mine = dataclasses.replace(invite, key=invite_keys.public_key.to_bytes())
    return HeldInvite(mine, invite_keys.private_key.to_bytes())


def token_body(token: str) -> dict[str, Any]:
    payload = token.removeprefix(TOKEN_PREFIX)
    return msgpack.unpackb(urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def token_of(body: dict[str, Any]) -> str:
    return TOKEN_PREFIX + urlsafe_b64encode(msgpack.packb(body)).decode().rstrip("=")


def signed_by(signer: KeyPair, signed: Any, **changes) -> Any:
    """A manifest or invite with ``changes``, signed (again) by ``signer``."""
    unsigned = dataclasses.replace(signed, **changes)
    return dataclasses.replace(unsigned, signature=signer.private_key.sign(unsigned.signed_bytes()))


# -- manifests -----------------------------------------------------------------------------


def test_create_computes_the_shared_schema_and_round_trips(manifest: Manifest, founder):
    assert manifest.founder == peer(founder)
    assert manifest.schema.names == ["fc1.weight", "fc1.bias"]
    assert manifest.schema.numel == 64 * 64 + 64
    assert manifest.protocol == "dynamic:b=2,merge=samples"
    assert manifest.admission == "invite"
    assert len(manifest.id) == 32 and int(manifest.id, 16) >= 0
    loaded = load_manifest(manifest.to_toml(), "m.toml")
    assert loaded == manifest
    assert loaded.id == manifest.id


def test_the_same_draft_signed_by_another_key_is_another_community(manifest, other):
    impostor = create_manifest(DRAFT, "draft.toml", other, NOW)
    assert impostor.id != manifest.id
    assert impostor.founder == peer(other)


TAMPERS = {
    "name": {"name": "digits body!"},
    "description": {"description": "evil"},
    "model": {"model": "mlp:hidden=65"},
    "input_shape": {"input_shape": (65,)},
    "classes": {"classes": 11},
    "shared": {"shared": ("fc*",)},
    "schema": {"schema": ParamSchema((ParamSpec("fc1.weight", (64, 64)),))},
    "schema dtype": {
        "schema": ParamSchema(
            (ParamSpec("fc1.weight", (64, 64), "float64"), ParamSpec("fc1.bias", (64,)))
        )
    },
    "protocol": {"protocol": "continuous:merge=samples"},
    "admission": {"admission": "open"},
    "created": {"created": NOW + 1},
}


@pytest.mark.parametrize("change", TAMPERS.values(), ids=list(TAMPERS))
def test_any_changed_field_breaks_the_signature(manifest: Manifest, change):
    tampered = dataclasses.replace(manifest, **change)
    with pytest.raises(CommunityError, match="signature does not match: it was altered"):
        load_manifest(tampered.to_toml(), "m.toml")


def test_a_swapped_signature_is_rejected(manifest: Manifest, other):
    foreign = create_manifest(DRAFT.replace("digits body", "other"), "d.toml", other, NOW)
    tampered = dataclasses.replace(manifest, signature=foreign.signature)
    with pytest.raises(CommunityError, match="signature does not match"):
        load_manifest(tampered.to_toml(), "m.toml")


def test_a_swapped_founder_is_rejected(manifest: Manifest, other):
    only_id = dataclasses.replace(manifest, founder=peer(other))
    with pytest.raises(CommunityError, match="not the owner of founder_key"):
        load_manifest(only_id.to_toml(), "m.toml")
    id_and_key = dataclasses.replace(
        manifest, founder=peer(other), founder_key=other.public_key.serialize()
    )
    with pytest.raises(CommunityError, match="signature does not match"):
        load_manifest(id_and_key.to_toml(), "m.toml")


def test_an_edited_file_is_rejected(manifest: Manifest):
    text = manifest.to_toml().replace('"fc1.*"', '"fc1.w*"')
    with pytest.raises(CommunityError, match="signature does not match"):
        load_manifest(text, "m.toml")


# -- invites -------------------------------------------------------------------------------


def test_an_invite_admits_its_peer_until_it_expires(manifest: Manifest, founder, other):
    held = issue_invite(manifest, founder, peer(other), NOW + HOUR)
    assert Invite.from_bytes(held.invite.to_bytes()) == held.invite
    credential = held.prove(peer(other), VERIFIER)
    check_credential(manifest, peer(other), VERIFIER, credential, NOW)
    check_credential(manifest, peer(other), VERIFIER, credential, NOW + HOUR - 1)
    with pytest.raises(CommunityError, match="expired at 2023-11-14 23:13 UTC"):
        check_credential(manifest, peer(other), VERIFIER, credential, NOW + HOUR)


def test_the_latest_expiry_can_still_be_shown(manifest: Manifest, founder, other):
    held = issue_invite(manifest, founder, None, MAX_TIME)
    assert format_time(Invite.from_bytes(held.invite.to_bytes()).expires) == "9999-12-31 23:59 UTC"
    with pytest.raises(CommunityError, match="not a valid time"):
        issue_invite(manifest, founder, None, MAX_TIME + 1)


def test_a_token_carries_the_invite_its_private_key_and_the_manifest(manifest: Manifest, founder):
    held = issue_invite(manifest, founder, None, None)
    assert read_token(make_token(held, manifest)) == (held, manifest)
    assert held.private_key.hex() not in repr(held)
    second = issue_invite(manifest, founder, None, None)
    assert second.invite.key != held.invite.key and second.private_key != held.private_key


def test_a_credential_convinces_only_its_verifier_of_its_prover(manifest, founder, other):
    """A bearer invite: whoever receives a member's credential (the verifier, or anyone who
    captures it) cannot replay it to a third node, as itself or as the member."""
    held = issue_invite(manifest, founder, None, None)
    member = peer(other)
    credential = held.prove(member, VERIFIER)
    check_credential(manifest, member, VERIFIER, credential, NOW)
    for prover, verifier in ((VERIFIER, THIRD), (member, THIRD), (THIRD, VERIFIER)):
        with pytest.raises(CommunityError, match="no proof bound to this peer and verifier"):
            check_credential(manifest, prover, verifier, credential, NOW)
    answer = held.prove(VERIFIER, member)  # bound the other way round: still only for member
    with pytest.raises(CommunityError, match="no proof bound"):
        check_credential(manifest, member, VERIFIER, answer, NOW)


def test_the_public_part_without_the_invite_key_does_not_admit(
    tmp_path: Path, manifest: Manifest, founder, other
):
    held = issue_invite(manifest, founder, None, None)
    guessed = HeldInvite(held.invite, create_new_key_pair().private_key.to_bytes())
    with pytest.raises(CommunityError, match="no proof bound"):
        check_credential(manifest, peer(other), VERIFIER, guessed.prove(peer(other), VERIFIER), NOW)
    with pytest.raises(CommunityError, match="not an invite with a membership proof"):
        check_credential(manifest, peer(other), VERIFIER, held.invite.to_bytes(), NOW)
    body = token_body(make_token(held, manifest))
    without_key = {k: v for k, v in body.items() if k != "key"}
    with pytest.raises(CommunityError, match="older p2pfl .* bearer invite"):
        read_token(token_of(without_key))
    with pytest.raises(CommunityError, match="does not belong to the invite"):
        read_token(token_of({**body, "key": guessed.private_key}))
    for token in (token_of(without_key), token_of({**body, "key": guessed.private_key})):
        with pytest.raises(CommunityError):
            join(tmp_path, token, peer(other), [], NOW)
    assert load_memberships(tmp_path) == []


def test_a_membership_keeps_its_invite_key_in_a_private_file(
    tmp_path: Path, manifest: Manifest, founder, other
):
    held = issue_invite(manifest, founder, None, None)
    membership = join(tmp_path, make_token(held, manifest), peer(other), [], NOW)
    path = tmp_path / "communities" / manifest.id / "membership.toml"
    assert path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "communities").stat().st_mode & 0o777 == 0o700
    assert load_memberships(tmp_path) == [membership] and membership.invite == held
    credential = make_credential(membership, peer(other), VERIFIER)
    check_credential(manifest, peer(other), VERIFIER, credential, NOW)
    stored = tomllib.loads(path.read_text())
    assert b64decode(stored["invite_key"]) == held.private_key
    foreign_key = issue_invite(manifest, founder, None, None).private_key
    path.write_text(path.read_text().replace(stored["invite_key"], b64encode(foreign_key).decode()))
    with pytest.raises(CommunityError, match=f"{path}: the invite private key does not belong"):
        load_memberships(tmp_path)
    path.write_text(f'joined = {NOW}\ncredential = "AAAA"\nbootstrap = []\n')
    with pytest.raises(CommunityError, match="old bearer invite .* remove .* join again"):
        load_memberships(tmp_path)


def test_only_the_founder_issues_invites(manifest: Manifest, other):
    with pytest.raises(CommunityError, match="only the founder"):
        issue_invite(manifest, other, None, None)


# -- store ---------------------------------------------------------------------------------


def test_join_list_leave_round_trip(tmp_path: Path, manifest: Manifest, founder, other):
    token = make_token(issue_invite(manifest, founder, peer(other), None), manifest)
    membership = join(tmp_path, token, peer(other), [], NOW)
    assert load_memberships(tmp_path) == [membership]
    assert find_membership(tmp_path, manifest.id[:6]) == membership
    assert find_membership(tmp_path, "digits body") == membership
    assert remove_membership(tmp_path, manifest.id) == manifest
    assert load_memberships(tmp_path) == []
    with pytest.raises(CommunityError, match="not a member"):
        remove_membership(tmp_path, manifest.id)


def test_join_refuses_a_second_community_sharing_the_same_parameters(
    tmp_path: Path, manifest: Manifest, founder
):
    join(tmp_path, manifest.to_toml(), peer(founder), [], NOW)
    overlapping = create_manifest(DRAFT.replace("digits body", "rival"), "d.toml", founder, NOW)
    with pytest.raises(CommunityError, match="already shares with 'digits body'"):
        join(tmp_path, overlapping.to_toml(), peer(founder), [], NOW)
    head = create_manifest(DRAFT.replace('"fc1.*"', '"head.*"'), "d.toml", founder, NOW)
    join(tmp_path, head.to_toml(), peer(founder), [], NOW)
    assert {m.id for m in load_memberships(tmp_path)} == {manifest.id, head.id}


def test_joining_again_renews_the_credential_and_keeps_the_bootstrap(
    tmp_path: Path, manifest: Manifest, founder, other
):
    address = f"/ip4/127.0.0.1/tcp/4001/p2p/{peer(founder)}"
    old = issue_invite(manifest, founder, peer(other), NOW + HOUR)
    join(tmp_path, make_token(old, manifest), peer(other), [address], NOW)
    new = issue_invite(manifest, founder, peer(other), NOW + 48 * HOUR)
    renewed = join(tmp_path, make_token(new, manifest), peer(other), [], NOW + 2 * HOUR)
    assert renewed.invite == new
    assert renewed.bootstrap == (address,)
    assert load_memberships(tmp_path) == [renewed]


def test_join_refuses_a_bootstrap_that_is_not_a_peer_address(tmp_path: Path, manifest, founder):
    with pytest.raises(CommunityError, match="bootstrap '/ip4/127.0.0.1/tcp/1'"):
        join(tmp_path, manifest.to_toml(), peer(founder), ["/ip4/127.0.0.1/tcp/1"], NOW)
    assert load_memberships(tmp_path) == []


def test_a_damaged_store_names_the_file_and_the_fix(tmp_path: Path, manifest: Manifest, founder):
    membership = join(tmp_path, manifest.to_toml(), peer(founder), [], NOW)
    path = tmp_path / "communities" / membership.id / "manifest.toml"
    path.write_text(path.read_text().replace("digits body", "digits bodY"))
    with pytest.raises(CommunityError, match=f"{path}.*signature does not match.*remove"):
        load_memberships(tmp_path)
    path.write_text(manifest.to_toml())
    (path.parent / "membership.toml").write_text("joined = 'yesterday'\n")
    with pytest.raises(CommunityError, match="membership.toml: joined must be unix seconds"):
        load_memberships(tmp_path)


def test_a_manifest_in_the_wrong_directory_is_refused(tmp_path: Path, manifest, founder):
    membership = join(tmp_path, manifest.to_toml(), peer(founder), [], NOW)
    root = tmp_path / "communities"
    (root / membership.id).rename(root / ("0" * 32))
    with pytest.raises(CommunityError, match="is the manifest of community"):
        load_memberships(tmp_path)


# -- the membership rule ---------------------------------------------------------------------


def test_an_invite_signed_by_another_key_is_rejected(manifest: Manifest, founder, other):
    genuine = issue_invite(manifest, founder, peer(other), None)
    invite = genuine.invite
    made_up = with_own_key(invite)  # the forger's own invite key pair, signed by the forger
    forgeries = (
        dataclasses.replace(genuine, invite=signed_by(other, invite)),
        dataclasses.replace(genuine, invite=signed_by(other, invite, issuer=peer(other))),
        dataclasses.replace(made_up, invite=signed_by(other, made_up.invite)),
    )
    for fake in forgeries:
        with pytest.raises(CommunityError, match="forged or was altered"):
            check_credential(
                manifest, peer(other), VERIFIER, fake.prove(peer(other), VERIFIER), NOW
            )
        with pytest.raises(CommunityError, match="forged or was altered"):
            read_token(make_token(fake, manifest))


def test_an_invite_edited_after_signing_is_rejected(manifest: Manifest, founder, other):
    genuine = issue_invite(manifest, founder, peer(founder), NOW + HOUR)
    edits = [
        dataclasses.replace(genuine, invite=dataclasses.replace(genuine.invite, **change))
        for change in ({"for_peer": peer(other)}, {"for_peer": None}, {"expires": None})
    ]
    edits.append(with_own_key(genuine.invite))  # the invite key swapped for the forger's own
    for edited in edits:
        with pytest.raises(CommunityError, match="forged or was altered"):
            check_credential(
                manifest, peer(other), VERIFIER, edited.prove(peer(other), VERIFIER), NOW
            )


def test_an_invite_for_another_community_is_rejected(manifest: Manifest, founder, other):
    second = create_manifest(DRAFT.replace("digits body", "second"), "d.toml", founder, NOW)
    foreign = issue_invite(second, founder, peer(other), None)
    with pytest.raises(CommunityError, match="for another community"):
        check_credential(manifest, peer(other), VERIFIER, foreign.prove(peer(other), VERIFIER), NOW)
    with pytest.raises(CommunityError, match="another community than the manifest"):
        make_token(foreign, manifest)


def test_an_invite_for_another_peer_is_rejected(tmp_path: Path, manifest, founder, other):
    held = issue_invite(manifest, founder, peer(founder), None)
    with pytest.raises(CommunityError, match=f"issued for peer {peer(founder)}, not for"):
        check_credential(manifest, peer(other), VERIFIER, held.prove(peer(other), VERIFIER), NOW)
    with pytest.raises(CommunityError, match="not for"):
        join(tmp_path, make_token(held, manifest), peer(other), [], NOW)
    assert load_memberships(tmp_path) == []


def test_an_expired_invite_is_rejected_at_join(tmp_path: Path, manifest, founder, other):
    token = make_token(issue_invite(manifest, founder, None, NOW - 1), manifest)
    with pytest.raises(CommunityError, match="expired at 2023-11-14 22:13 UTC"):
        join(tmp_path, token, peer(other), [], NOW)
    assert load_memberships(tmp_path) == []
    assert not (tmp_path / "communities").exists()


def test_an_invite_community_refuses_a_bare_manifest_except_to_its_founder(
    tmp_path: Path, manifest: Manifest, founder, other
):
    path = tmp_path / "m.toml"
    path.write_text(manifest.to_toml())
    with pytest.raises(CommunityError, match="no invite to 'digits body', which is invite-only"):
        join(tmp_path / "member", str(path), peer(other), [], NOW)
    with pytest.raises(CommunityError, match="no invite"):
        check_credential(manifest, peer(other), VERIFIER, None, NOW)
    check_credential(manifest, peer(founder), VERIFIER, None, NOW)
    founding = join(tmp_path / "founder", str(path), peer(founder), [], NOW)
    assert founding.invite is None and make_credential(founding, peer(founder), VERIFIER) is None


def test_an_open_community_admits_anyone_with_the_manifest(tmp_path: Path, founder, other):
    open_manifest = create_manifest(
        DRAFT.replace('admission = "invite"', 'admission = "open"'), "d.toml", founder, NOW
    )
    path = tmp_path / "open.toml"
    path.write_text(open_manifest.to_toml())
    membership = join(tmp_path / "home", str(path), peer(other), [], NOW)
    assert membership.manifest == open_manifest and membership.invite is None
    check_credential(open_manifest, peer(other), VERIFIER, None, NOW)


def test_join_names_what_it_could_not_read(tmp_path: Path, other):
    with pytest.raises(CommunityError, match="neither an invite token .* nor a readable"):
        join(tmp_path, str(tmp_path / "missing.toml"), peer(other), [], NOW)
    with pytest.raises(CommunityError, match="not valid TOML"):
        join(tmp_path, "name = \n=", peer(other), [], NOW)
    with pytest.raises(CommunityError, match="format must be 'p2pfl-manifest-v1'"):
        join(tmp_path, DRAFT, peer(other), [], NOW)


# -- draft validation ------------------------------------------------------------------------

BAD_DRAFTS = {
    "unknown top-level key": ('colour = "red"\n' + DRAFT, "unknown key 'colour'"),
    "unknown model key": (
        DRAFT.replace("classes = 10", "classes = 10\nlayers = 3"),
        "unknown key 'model.layers'",
    ),
    "glob matching nothing": (
        DRAFT.replace('"fc1.*"', '"fc1.*", "body.*"'),
        "model.shared: share glob 'body.*' matches no parameter",
    ),
    "bad protocol": (
        DRAFT.replace('protocol = "dynamic"', 'protocol = "turbo"'),
        "policy.protocol: 'turbo': unknown kind",
    ),
    "bad protocol argument": (
        DRAFT.replace('merge = "samples"', 'merge = "mode"'),
        "policy: .*merge must be one of",
    ),
    "protocol none": (
        DRAFT.replace('protocol = "dynamic"', 'protocol = "none"'),
        "policy.protocol 'none' shares nothing",
    ),
    "missing name": (DRAFT.replace('name = "digits body"\n', ""), "missing key 'name'"),
    "empty name": (DRAFT.replace('"digits body"', '"  "'), "name: must not be empty"),
    "long name": (DRAFT.replace("digits body", "x" * 101), "name: 101 characters, at most 100"),
    "control character in name": (
        DRAFT.replace("digits body", "digits\\u001b[2J"),
        "name: contains control characters",
    ),
    "long description": (
        DRAFT.replace("Shares the body of a digits MLP.", "y" * 2001),
        "description: 2001 characters, at most 2000",
    ),
    "wrong type": (DRAFT.replace("classes = 10", 'classes = "10"'), "model.classes: must be a"),
    "bad admission": (
        DRAFT.replace('admission = "invite"', 'admission = "closed"'),
        "admission: must be one of 'open', 'invite'",
    ),
    "missing model table": (DRAFT.split("[model]")[0], r"missing table \[model\]"),
    "b given twice": (
        DRAFT.replace('protocol = "dynamic"', 'protocol = "dynamic:b=4"'),
        "policy.b is given twice",
    ),
    "negative delta": (DRAFT.replace("b = 2", "delta = -1.0"), "policy.delta: must be a finite"),
    "model that cannot be built": (
        DRAFT.replace('"mlp:hidden=64"', '"cnn"'),
        "model.factory 'cnn' cannot be built",
    ),
    "not TOML": ("name = [", "not valid TOML"),
}


@pytest.mark.parametrize("draft, message", BAD_DRAFTS.values(), ids=list(BAD_DRAFTS))
def test_bad_drafts_name_the_key(founder, draft, message):
    with pytest.raises(CommunityError, match=message):
        create_manifest(draft, "draft.toml", founder, NOW)


def test_policy_keys_fold_into_the_protocol_spec(founder):
    draft = DRAFT.replace("b = 2", "delta = 0.5\nb = 4").replace('merge = "samples"\n', "")
    manifest = create_manifest(draft, "draft.toml", founder, NOW)
    assert manifest.protocol == "dynamic:delta=0.5,b=4,merge=uniform"


def test_the_example_manifest_is_a_valid_draft(founder):
    text = (Path(__file__).parent.parent / "examples/community/manifest.toml").read_text()
    manifest = create_manifest(text, "manifest.toml", founder, NOW)
    assert manifest.shared == ("fc1.*",)
    assert manifest.schema.names == ["fc1.weight", "fc1.bias"]
    assert manifest.admission == "invite"
    assert manifest.protocol.startswith("dynamic:")


SIGNED_BUT_UNUSABLE = {
    "too many parameters": (
        {"schema": ParamSchema((ParamSpec("fc1.w", (2**16, 2**16)),))},
        "4,294,967,296 parameters, more than 2,147,483,648",
    ),
    "bad protocol": ({"protocol": "dynamic:b=0"}, "protocol: 'dynamic:b=0': bad value"),
    "protocol none": ({"protocol": "none"}, "protocol 'none' shares nothing"),
    "schema outside the globs": ({"shared": ("fc1.weight",)}, "'fc1.bias' matches no shared"),
    "glob outside the schema": ({"shared": ("fc1.*", "head.*")}, "'head.*' matches no schema"),
}


@pytest.mark.parametrize(
    "change, message", SIGNED_BUT_UNUSABLE.values(), ids=list(SIGNED_BUT_UNUSABLE)
)
def test_a_signed_but_unusable_manifest_is_refused(manifest: Manifest, founder, change, message):
    with pytest.raises(CommunityError, match=message):
        load_manifest(signed_by(founder, manifest, **change).to_toml(), "m.toml")


def test_a_hostile_manifest_is_bounded():
    with pytest.raises(CommunityError, match="more than the 1,048,576"):
        load_manifest("#" * (2**20 + 1), "m.toml")
    with pytest.raises(CommunityError, match="nested too deeply|not valid TOML"):
        load_manifest("a = " + "[" * 100_000, "m.toml")


# -- hostile bytes -------------------------------------------------------------------------

BASE64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_="


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048) | MSGPACK_VALUES.map(msgpack.packb))
def test_random_invites_and_credentials_only_raise_community_error(manifest: Manifest, data):
    with contextlib.suppress(CommunityError):
        Invite.from_bytes(data)
    with pytest.raises(CommunityError):
        check_credential(manifest, THIRD, VERIFIER, data, NOW)


@settings(max_examples=300, deadline=None)
@given(
    st.text(max_size=300)
    | st.text(BASE64URL, max_size=300).map(lambda t: TOKEN_PREFIX + t)
    | MSGPACK_VALUES.map(lambda v: TOKEN_PREFIX + urlsafe_b64encode(msgpack.packb(v)).decode())
)
def test_random_tokens_only_raise_community_error(token: str):
    with pytest.raises(CommunityError):
        read_token(token)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_a_damaged_token_is_refused_or_intact(manifest: Manifest, founder, other, data):
    held = issue_invite(manifest, founder, peer(other), NOW + HOUR)
    token = make_token(held, manifest)
    position = data.draw(st.integers(len(TOKEN_PREFIX), len(token) - 1))
    char = data.draw(st.sampled_from(BASE64URL))
    damaged = token[:position] + char + token[position + 1 :]
    with contextlib.suppress(CommunityError):
        assert read_token(damaged) == (held, manifest)  # e.g. a comment, or padding bits


def test_an_oversized_token_is_refused_before_decoding():
    with pytest.raises(CommunityError, match="longer than any valid token"):
        read_token(TOKEN_PREFIX + "A" * 64 * 1024)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=500))
def test_random_manifest_text_only_raises_community_error(text: str):
    with pytest.raises(CommunityError):
        load_manifest(text, "random.toml")


# -- command line --------------------------------------------------------------------------


def cli(*args: object) -> Result:
    return CliRunner().invoke(app, ["community", *map(str, args)])


def node_home(path: Path, key_pair: KeyPair) -> Path:
    """A node directory holding ``key_pair`` as its identity."""
    path.mkdir()
    (path / "identity.key").write_bytes(key_pair.private_key.serialize())
    (path / "identity.key").chmod(0o600)
    return path


def draft_file(tmp_path: Path, text: str = DRAFT) -> Path:
    path = tmp_path / "draft.toml"
    path.write_text(text)
    return path


def test_cli_create_invite_join_list_leave(tmp_path: Path, founder, other):
    a, b = node_home(tmp_path / "a", founder), node_home(tmp_path / "b", other)
    created = cli("create", "--home", a, draft_file(tmp_path))
    assert created.exit_code == 0, created.output
    community = created.stdout.split()[1]
    assert (a / "communities" / community / "manifest.toml").is_file()
    assert f"manifest {a / 'communities' / community / 'manifest.toml'}" in created.stdout
    assert "no node is running" in created.stderr

    invited = cli("invite", "--home", a, community[:8], "--for", peer(other), "--expires", "30m")
    assert invited.exit_code == 0, invited.output
    token = invited.stdout.strip()
    assert token.startswith(TOKEN_PREFIX) and "expires at" in invited.stderr
    assert "anyone who gets this token" not in invited.stderr
    bearer = cli("invite", "--home", a, community[:8], "--expires", "never")
    assert bearer.exit_code == 0, bearer.output
    assert "whoever holds it; it never expires" in bearer.stderr
    assert "anyone who gets this token can join" in bearer.stderr and "--for" in bearer.stderr

    address = f"/ip4/127.0.0.1/tcp/4001/p2p/{peer(founder)}"
    joined = cli("join", "--home", b, token, "--bootstrap", address)
    assert joined.exit_code == 0, joined.output
    assert find_membership(b, community).bootstrap == (address,)
    assert (b / "communities" / community / "membership.toml").stat().st_mode & 0o777 == 0o600

    listed = cli("list", "--home", b)
    assert listed.exit_code == 0, listed.output
    row = next(line for line in listed.stdout.splitlines() if community[:12] in line)
    for cell in ("digits body", "member", "invite", "fc1.*", "dynamic:b=2,merge=samples"):
        assert cell in row
    assert "expires 20" in row
    founder_row = cli("list", "--home", a).stdout
    assert "founder" in founder_row.split(community[:12])[1]

    left = cli("leave", "--home", b, "digits body")
    assert left.exit_code == 0, left.output
    assert load_memberships(b) == []
    assert "no communities" in cli("list", "--home", b).stdout


def test_cli_create_makes_the_identity_if_missing(tmp_path: Path):
    result = cli("create", "--home", tmp_path / "new", draft_file(tmp_path))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "new" / "identity.key").is_file()
    assert "founder" in cli("list", "--home", tmp_path / "new").stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (("invite", "--home", "{a}", "digits body", "--expires", "7 days"), "--expires '7 days'"),
        (("invite", "--home", "{a}", "nope"), "not a member of 'nope'"),
        (("invite", "--home", "{a}", "digits body", "--for", "bob"), "'bob' is not a peer id"),
        (("join", "--home", "{a}", "p2pfl-invite:AAAA"), "invite token is damaged"),
        (("join", "--home", "{a}", "{a}/nothing.toml"), "neither an invite token"),
        (("leave", "--home", "{a}", "nope"), "not a member of 'nope'"),
        (("create", "--home", "{a}", "{a}/nothing.toml"), "cannot read the draft manifest"),
        (("list", "--home", "{a}/nothing"), "does not exist"),
    ],
)
def test_cli_errors_exit_2_without_traceback(tmp_path: Path, founder, args, message):
    a = node_home(tmp_path / "a", founder)
    assert cli("create", "--home", a, draft_file(tmp_path)).exit_code == 0
    result = cli(*(arg.format(a=a) for arg in args))
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert "Traceback" not in result.output


def test_cli_a_bad_draft_is_an_error_naming_the_key(tmp_path: Path):
    draft = draft_file(tmp_path, DRAFT.replace('"fc1.*"', '"fc2.*"'))
    result = cli("create", "--home", tmp_path / "a", draft)
    assert result.exit_code == 2
    assert "model.shared: share glob 'fc2.*' matches no parameter" in result.stderr


def test_cli_an_invite_from_a_member_is_refused(tmp_path: Path, founder, other):
    a, b = node_home(tmp_path / "a", founder), node_home(tmp_path / "b", other)
    open_draft = draft_file(tmp_path, DRAFT.replace('admission = "invite"', 'admission = "open"'))
    community = cli("create", "--home", a, open_draft).stdout.split()[1]
    manifest_path = a / "communities" / community / "manifest.toml"
    assert cli("join", "--home", b, manifest_path).exit_code == 0
    result = cli("invite", "--home", b, community)
    assert result.exit_code == 2 and "only the founder" in result.stderr


def test_parse_duration():
    assert [parse_duration(t) for t in ("30m", "12h", "7d", "2w", "90s", "never")] == [
        1800,
        43200,
        604800,
        1209600,
        90,
        None,
    ]
    for bad in ("0d", "7", "d", "-1h", "1.5h", "forever"):
        with pytest.raises(CommunityError, match="positive duration"):
            parse_duration(bad)


class FakeNode:
    """A control socket that answers one request with ``reply`` (in a thread, bounded)."""

    def __init__(self, home: Path, reply: dict[str, Any]) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(home / "control.sock"))
        self.sock.listen(1)
        self.sock.settimeout(10)
        self.reply, self.requests = reply, []
        self.thread = threading.Thread(target=self._serve)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            data = b""
            while not data.endswith(b"\n"):
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            self.requests.append(json.loads(data))
            conn.sendall(json.dumps(self.reply).encode() + b"\n")

    def close(self) -> None:
        self.thread.join(timeout=15)
        self.sock.close()


@pytest.mark.parametrize(
    "reply, message",
    [
        (
            {"ok": True, "communities": ["x"]},
            "the running node applied the change; it is now in 1 community",
        ),
        ({"error": "model has no fc1"}, "did not apply the change: model has no fc1"),
    ],
)
def test_cli_asks_a_running_node_to_reread_its_communities(tmp_path: Path, founder, reply, message):
    home = node_home(tmp_path / "a", founder)
    node = FakeNode(home, reply)
    try:
        result = cli("create", "--home", home, draft_file(tmp_path))
    finally:
        node.close()
    assert result.exit_code == 0, result.output
    assert node.requests == [{"cmd": "communities"}]
    assert message in result.stderr


def test_cli_a_stale_control_socket_is_a_warning(tmp_path: Path, founder):
    home = node_home(tmp_path / "a", founder)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(home / "control.sock"))
    stale.close()  # the file stays, nobody listens
    result = cli("create", "--home", home, draft_file(tmp_path))
    assert result.exit_code == 0, result.output
    assert "warning: no node is running" in result.stderr and "restart the node" in result.stderr
