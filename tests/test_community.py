"""Community manifests, invites, the membership rule, the on-disk store and the CLI."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair

from p2pfl.community.invite import (
    Invite,
    check_credential,
    issue_invite,
    make_token,
    read_token,
)
from p2pfl.community.manifest import (
    CommunityError,
    Manifest,
    create_manifest,
    load_manifest,
    peer_id_of,
)
from p2pfl.community.store import (
    find_membership,
    join,
    load_memberships,
    remove_membership,
)
from p2pfl.learning.params import ParamSchema, ParamSpec

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
    invite = issue_invite(manifest, founder, peer(other), NOW + HOUR)
    assert Invite.from_bytes(invite.to_bytes()) == invite
    check_credential(manifest, peer(other), invite.to_bytes(), NOW)
    check_credential(manifest, peer(other), invite.to_bytes(), NOW + HOUR - 1)
    with pytest.raises(CommunityError, match="expired at 2023-11-14 23:13 UTC"):
        check_credential(manifest, peer(other), invite.to_bytes(), NOW + HOUR)


def test_a_token_carries_the_invite_and_the_manifest(manifest: Manifest, founder):
    invite = issue_invite(manifest, founder, None, None)
    assert read_token(make_token(invite, manifest)) == (invite, manifest)


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
