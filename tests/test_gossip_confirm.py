"""A gossip exchange's two drift-correction updates cancel only if both ends learn them: the
receiver learns its update once the initiator confirms it merged the reply (``Confirm``), so
a peer that pushes its model everywhere and merges no reply (``--byzantine K:flood``) leaves
no update unmirrored (``GossipCore``, docs/byzantine.md)."""

from __future__ import annotations

import pytest
import torch
from kit import FakeModel, small_digits_run, unclipped

from p2pfl.protocol.actions import ReplaceModel, Send, SetCorrection
from p2pfl.protocol.byzantine import ByzantineCore
from p2pfl.protocol.config import parse_protocol
from p2pfl.protocol.core import make_core
from p2pfl.protocol.scheduled import CONFIRM_WAITS
from p2pfl.wire.messages import Confirm, ModelReply, Push

DIM = 4


def vec(*values: float) -> torch.Tensor:
    return torch.tensor(values + (0.0,) * (DIM - len(values)), dtype=torch.float32)


def corrections(actions):
    return [a.vector for a in actions if isinstance(a, SetCorrection)]


def exchange(spec: str):
    """Node 0 offers its model (1.0) to node 1 (3.0), which merges it and replies."""
    initiator = make_core("0", unclipped(parse_protocol(spec)), FakeModel(vec(1.0)), ["1"])
    receiver = make_core("1", unclipped(parse_protocol(spec)), FakeModel(vec(3.0)), ["0"])
    (offer,) = [a for a in initiator.on_local_step(0.0) if isinstance(a, Send)]
    received = receiver.on_message(0.01, "0", offer.message)
    (reply,) = [a for a in received if isinstance(a, Send)]
    assert isinstance(reply.message, ModelReply)
    return initiator, receiver, received, reply.message


def test_the_receiver_learns_its_update_once_the_initiator_confirms():
    initiator, receiver, received, reply = exchange("gossip")
    assert corrections(received) == []  # merged (model replaced), nothing learnt yet
    finished = initiator.on_message(0.02, "1", reply)
    (confirm,) = [a for a in finished if isinstance(a, Send)]
    assert confirm.to == "1" and confirm.message == Confirm(reply.session)
    (theirs,) = corrections(finished)
    assert receiver.on_message(0.03, "2", confirm.message) == []  # not its initiator
    assert receiver.on_message(0.03, "0", Confirm(reply.session + 1)) == []  # no such exchange
    (ours,) = corrections(receiver.on_message(0.03, "0", confirm.message))
    torch.testing.assert_close(ours, -theirs)  # the pair's updates cancel
    assert ours[0] > 0  # 3.0 merged down toward 1.0: the correction pushes it up
    assert receiver.on_message(0.04, "0", confirm.message) == []  # learnt once
    assert receiver.stats.unconfirmed == 0


def test_an_exchange_never_confirmed_teaches_the_receiver_nothing():
    _, receiver, _, reply = exchange("gossip")
    late = 0.01 + CONFIRM_WAITS * receiver.round_trip.wait + 0.01
    assert receiver.on_message(late, "0", Confirm(reply.session)) == []
    assert receiver.stats.unconfirmed == 1 and receiver.correction is None
    # a flooder offering the same exchange id again replaces the pending update
    flooder = make_core("1", parse_protocol("gossip"), FakeModel(vec(3.0)), ["0"])
    for t in (0.0, 1.0, 2.0):
        flooder.on_message(t, "0", Push(-1, vec(1.0), 10))
    assert flooder.stats.unconfirmed == 2 and len(flooder.unconfirmed) == 1


def test_without_the_correction_nothing_is_confirmed():
    initiator, receiver, received, reply = exchange("gossip:correction=0")
    finished = initiator.on_message(0.02, "1", reply)
    assert [a for a in finished if isinstance(a, Send)] == [] and corrections(finished) == []
    assert receiver.unconfirmed == {}


@pytest.mark.parametrize("attack", ["flood", "flood-confirm"])
def test_a_flooder_confirms_only_if_it_adapts_to_the_rule(attack):
    """A flooder pushes to every neighbour at every step and merges no reply to those pushes;
    ``flood-confirm`` confirms them anyway, which the receiver cannot tell from a merge."""
    core = make_core("0", parse_protocol("gossip"), FakeModel(vec(1.0)), ["1", "2"], seed=0)
    flooder = ByzantineCore(core, attack)
    pushes = [a for a in flooder.on_local_step(0.0) if isinstance(a, Send)]
    assert {a.to for a in pushes} == {"1", "2"}
    (honest,) = [peer for peer, *_ in core.exchanges.values()]  # its own exchange
    flooded = ({"1", "2"} - {honest}).pop()
    answer = flooder.on_message(0.01, flooded, ModelReply(1, vec(3.0), 10))
    assert not [a for a in answer if isinstance(a, ReplaceModel)]  # it merges nothing
    confirms = [a for a in answer if isinstance(a, Send) and isinstance(a.message, Confirm)]
    assert len(confirms) == (attack == "flood-confirm")


def total_correction_imbalance(sim) -> float:
    """|Σ corrections| over Σ |correction| over every node (liars too: their honest
    exchanges are part of the sum)."""
    vectors = [c.correction for c in sim.cores if c.correction is not None]
    total = torch.stack(vectors).sum(0)
    return float(total.norm() / sum(v.norm() for v in vectors))


@pytest.mark.parametrize("byzantine", ["", "2:flood"])
def test_flooders_leave_the_corrections_zero_sum(byzantine):
    """8 nodes, 2 of them pushing to every neighbour at every step (no clipping, so every
    exchange merges the same two vectors at both ends). Before the confirmation the receivers
    learnt an update from every flooded offer that no initiator mirrored: the corrections
    summed to 0.28 of their summed norms (2 flooders; honest: 9e-7), and the honest nodes
    reached 0.681 (0.782 now; honest network 0.769)."""
    sim = small_digits_run("gossip:clip=0", byzantine, steps=100)
    assert total_correction_imbalance(sim) < 1e-4
    honest = sim.attackers.honest(len(sim.cores))
    unconfirmed = sum(c.stats.unconfirmed for c, h in zip(sim.cores, honest, strict=True) if h)
    assert (unconfirmed > 0) == bool(byzantine)
