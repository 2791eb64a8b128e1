"""The admission core without sockets: hellos, answers, refusals, leaving, the per-frame check
and its credential cache, and the ``Gate`` that carries out its actions."""

from __future__ import annotations

import dataclasses

import pytest
from libp2p.crypto.ed25519 import create_new_key_pair

from p2pfl.community.draft import create_manifest
from p2pfl.community.invite import HeldInvite, Invite, issue_invite
from p2pfl.peers import peer_id_of
from p2pfl.protocol import admission as admission_module
from p2pfl.protocol.admission import (
    REFUSAL_EVERY_S,
    Admission,
    Admitted,
    Dropped,
    Gate,
    Refused,
    SendHello,
)
from p2pfl.wire.community import LEFT, Hello

NOW = 1_800_000_000.0
DRAFT = (
    'name = "body"\nadmission = "invite"\n[model]\nfactory = "mlp:hidden=8"\ninputs = [4]\n'
    'classes = 3\nshared = ["fc1.*"]\n[policy]\nprotocol = "periodic:b=2"\n'
)


class Node:
    def __init__(self) -> None:
        self.key = create_new_key_pair()
        self.id = peer_id_of(self.key.public_key)


@pytest.fixture(scope="module")
def world():
    founder, member, stranger = Node(), Node(), Node()
    manifest = create_manifest(DRAFT, "draft", founder.key, int(NOW))
    return founder, member, stranger, manifest


def admission_of(node: Node, manifest, invite: HeldInvite | None) -> Admission:
    return Admission(manifest, node.id, invite)


def deliver(actions, to: Admission, sender: str, now: float = NOW):
    """The hellos among ``actions`` addressed to ``to``, handed to it."""
    out = []
    for action in actions:
        if isinstance(action, SendHello) and action.to == to.me:
            out += to.on_hello(now, sender, action.hello)
    return out


def test_a_member_and_the_founder_admit_each_other_with_one_hello_each(world):
    founder, member, _, manifest = world
    invite = issue_invite(manifest, founder.key, member.id, None)
    f, m = admission_of(founder, manifest, None), admission_of(member, manifest, invite)
    hello = m.greet(NOW, founder.id)
    assert [type(a) for a in hello] == [SendHello] and m.greet(NOW, founder.id) == []
    answer = deliver(hello, f, member.id)
    assert answer[0] == Admitted(member.id)
    assert isinstance(answer[1], SendHello) and answer[1].hello.answer
    assert deliver(answer, m, founder.id) == [Admitted(founder.id)]  # answers are not answered
    assert set(f.admitted) == {member.id} and set(m.admitted) == {founder.id}
    assert f.on_frame(NOW, member.id) == [] and m.on_frame(NOW, founder.id) == []


@pytest.mark.parametrize("kind", ["none", "forged", "expired", "other peer"])
def test_a_peer_without_a_valid_invite_is_refused_with_the_reason(world, kind):
    founder, member, stranger, manifest = world
    if kind == "forged":  # claims the founder issued it, signed by the stranger
        keys = create_new_key_pair()
        unsigned = Invite(manifest.id, founder.id, None, None, keys.public_key.to_bytes(), b"")
        invite = dataclasses.replace(
            unsigned, signature=stranger.key.private_key.sign(unsigned.signed_bytes())
        )
        held = HeldInvite(invite, keys.private_key.to_bytes())
    elif kind == "expired":
        held = issue_invite(manifest, founder.key, stranger.id, int(NOW) - 60)
    elif kind == "other peer":
        held = issue_invite(manifest, founder.key, member.id, None)
    else:
        held = None
    expected = {
        "none": "has no invite",
        "forged": "forged",
        "expired": "expired at",
        "other peer": "was issued for peer",
    }[kind]
    f, s = admission_of(founder, manifest, None), admission_of(stranger, manifest, held)
    actions = deliver(s.greet(NOW, founder.id), f, stranger.id)
    assert isinstance(actions[0], Refused) and expected in actions[0].reason
    notice = actions[1]
    assert isinstance(notice, SendHello) and expected in notice.hello.refused
    assert f.admitted == {}
    # the refused side drops the founder and does not greet it again on this connection
    assert deliver([notice], s, founder.id) == [] and s.greet(NOW, founder.id) == []
    # frames are refused and counted; the notice goes out at most every REFUSAL_EVERY_S
    again = f.on_frame(NOW + 1, stranger.id)
    assert [type(a) for a in again] == [Refused]
    later = f.on_frame(NOW + REFUSAL_EVERY_S, stranger.id)
    assert [type(a) for a in later] == [Refused, SendHello]


def test_credentials_are_verified_once_and_expire_on_time(world, monkeypatch):
    founder, member, _, manifest = world
    expires = int(NOW) + 3600
    invite = issue_invite(manifest, founder.key, member.id, expires)
    f, m = admission_of(founder, manifest, None), admission_of(member, manifest, invite)
    checks = []
    real_check = admission_module.check_credential

    def counting_check(*args):
        checks.append(args)
        return real_check(*args)

    monkeypatch.setattr(admission_module, "check_credential", counting_check)
    hello = m.greet(NOW, founder.id)
    assert Admitted(member.id) in deliver(hello, f, member.id)
    assert len(checks) == 1
    for i in range(1000):
        assert f.on_frame(NOW + i, member.id) == []
    deliver(hello, f, member.id, NOW + 1000)  # the same credential again: no new check
    assert len(checks) == 1
    assert f.on_frame(expires - 1, member.id) == []
    expired = f.on_frame(expires, member.id)
    assert expired[0] == Dropped(member.id)
    assert isinstance(expired[1], Refused) and "expired at" in expired[1].reason
    assert isinstance(expired[2], SendHello) and "expired" in expired[2].hello.refused
    assert f.admitted == {}
    refused_hello = deliver(hello, f, member.id, expires + 1)  # checked again, and refused
    assert len(checks) == 2 and isinstance(refused_hello[0], Refused)


def test_leaving_and_disconnecting_end_admission(world):
    founder, member, _, manifest = world
    invite = issue_invite(manifest, founder.key, member.id, None)
    f, m = admission_of(founder, manifest, None), admission_of(member, manifest, invite)
    deliver(deliver(m.greet(NOW, founder.id), f, member.id), m, founder.id)
    byes = m.leave(NOW)
    assert byes == [SendHello(founder.id, Hello(manifest.id, answer=True, refused=LEFT))]
    assert m.admitted == {}
    assert deliver(byes, f, member.id) == [Dropped(member.id)]
    assert f.on_disconnected(NOW, member.id) == []  # already dropped
    # a new connection: hello again, admitted again; its end drops the member
    deliver(m.greet(NOW, founder.id), f, member.id)
    assert f.on_disconnected(NOW, member.id) == [Dropped(member.id)]


class Recorder:
    """A gate's core events and driver calls, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def peer_up(self, now, peer):
        self.calls.append(("up", peer))

    def peer_down(self, now, peer):
        self.calls.append(("down", peer))

    def send_hello(self, now, to, hello):
        self.calls.append(("hello", to, hello))

    def refused(self, now, peer, reason):
        self.calls.append(("refused", peer, reason))


def test_the_gate_tells_the_core_about_admitted_peers_only(world):
    founder, member, stranger, manifest = world
    invite = issue_invite(manifest, founder.key, member.id, None)
    record = Recorder()
    names = {member.id: "1", stranger.id: "2"}
    gate = Gate(admission_of(founder, manifest, None), record, record, names.get)
    m = admission_of(member, manifest, invite)
    gate.hello(NOW, member.id, m.greet(NOW, founder.id)[0].hello)
    assert [c[0] for c in record.calls] == ["up", "hello"] and record.calls[0] == ("up", "1")
    assert gate.admits(member.id) and not gate.admits(stranger.id)
    assert gate.frame(NOW, member.id) is None
    record.calls.clear()
    assert "not admitted" in gate.frame(NOW, stranger.id)
    assert [c[0] for c in record.calls] == ["hello"]  # told why (the caller counts the frame)
    record.calls.clear()
    gate.disconnected(NOW, member.id)
    assert record.calls == [("down", "1")] and not gate.admits(member.id)
