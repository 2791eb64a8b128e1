"""The drift correction's lesson agreement (``agreement=H``, ``p2pfl.protocol.correction``):
the gain follows how much a node's successive lessons agree, the factor is shared by the
group that merged (so a session's or an exchange's updates still sum to zero), a factor of 1
is the fixed gain, and the factor travels as an optional wire field that default frames
leave out."""

from __future__ import annotations

import math

import msgpack
import pytest
import torch
from kit import DIM, VirtualNet, complete, ring, star, vector_schema

from p2pfl.protocol.config import parse_protocol
from p2pfl.protocol.correction import DriftCorrection, LessonAgreement, rare_floor
from p2pfl.spec import SpecError
from p2pfl.wire.codec import WireError, decode, encode, encoded_size
from p2pfl.wire.messages import Average, ModelReply, Push


def lessons(gen: torch.Generator, n: int, offset: torch.Tensor, noise: float):
    return [offset + noise * torch.randn(len(offset), generator=gen) for _ in range(n)]


def test_consistent_lessons_raise_the_factor_and_independent_noise_keeps_it_near_zero():
    gen = torch.Generator().manual_seed(0)
    steady = LessonAgreement(4)
    assert steady.factor == 0.0  # nothing learnt before lessons agree
    for lesson in lessons(gen, 40, torch.ones(500), 0.3):
        steady.observe(lesson)
    assert steady.factor > 0.8
    noise = LessonAgreement(4)
    for lesson in lessons(gen, 40, torch.zeros(500), 1.0):
        noise.observe(lesson)
    assert noise.factor < 0.15
    noise.mean_cosine = -0.5  # opposed lessons: clamped, never a negative gain
    assert noise.factor == 0.0


def test_against_the_mean_an_offset_shows_through_noise_and_noise_stays_near_zero():
    """Noisy lessons with a shared offset: their cosine with the last lesson is about
    |o|² / |l|² (0.2 here), with the mean of the earlier ones (memory 4: noise 1/7 of a
    lesson's) about 0.36;
    independent noise stays near 0 either way."""
    gen = torch.Generator().manual_seed(2)
    offset = torch.ones(500)
    last, mean = LessonAgreement(4), LessonAgreement(4, against="mean")
    for lesson in lessons(gen, 60, offset, 2.0):
        last.observe(lesson)
        mean.observe(lesson)
    assert last.factor < 0.25 < 0.3 < mean.factor < 0.45
    noise = LessonAgreement(4, against="mean")
    for lesson in lessons(gen, 60, torch.zeros(500), 1.0):
        noise.observe(lesson)
    assert noise.factor < 0.15


def test_boost_scales_the_factor_before_its_clamp():
    boosted = LessonAgreement(4, boost=2.0)
    for cosine, factor in ((0.3, 0.6), (0.7, 1.0), (-0.2, 0.0), (0.0, 0.0)):
        boosted.mean_cosine = cosine
        assert boosted.factor == pytest.approx(factor)


def test_factor_one_is_the_fixed_gain_and_factor_zero_learns_nothing():
    sent, merged = torch.linspace(-1, 1, DIM), torch.zeros(DIM)
    fixed = DriftCorrection(0.3)
    fixed.update(sent, merged, 40, 0.05)
    adaptive = DriftCorrection(0.3, agreement=4)
    adaptive.update(sent, merged, 40, 0.05, factor=1.0)
    torch.testing.assert_close(adaptive.vector, fixed.vector)
    silent = DriftCorrection(0.3, agreement=4)
    silent.update(sent, merged, 40, 0.05)  # its own factor: 0 before any agreement
    torch.testing.assert_close(silent.vector, torch.zeros(DIM))
    assert silent.agreement is not None and silent.agreement.previous is not None


def test_the_floor_lets_rare_merges_learn_before_lessons_agree():
    """A first lesson (factor 0) is learnt at 1 - S/K of the fixed gain under floor=S:
    nothing after K <= S steps, nearly all of it after K = 25 S; a higher factor wins."""
    assert rare_floor(0, 400) == 0.0 and rare_floor(16, 8) == 0.0 and rare_floor(16, 16) == 0.0
    assert rare_floor(16, 400) == pytest.approx(0.96)
    sent, merged = torch.linspace(-1, 1, DIM), torch.zeros(DIM)
    for steps, share in ((8, 0.0), (400, 0.96)):
        fixed = DriftCorrection(0.3)
        fixed.update(sent, merged, steps, 0.05)
        floored = DriftCorrection(0.3, agreement=4, floor=16)
        floored.update(sent, merged, steps, 0.05)
        torch.testing.assert_close(floored.vector, share * fixed.vector)
    agreed = DriftCorrection(0.3, agreement=4, floor=16)
    agreed.update(sent, merged, 32, 0.05, factor=0.8)  # above the floor of 0.5
    fixed = DriftCorrection(0.3)
    fixed.update(sent, merged, 32, 0.05)
    torch.testing.assert_close(agreed.vector, 0.8 * fixed.vector)


def test_a_lesson_learnt_in_a_members_place_is_not_folded_into_the_agreement():
    correction = DriftCorrection(0.3, agreement=4)
    correction.update(torch.ones(DIM), torch.zeros(DIM), 8, 0.1, factor=0.5, observe=False)
    assert correction.agreement is not None and correction.agreement.previous is None
    assert float(correction.vector.abs().min()) > 0


def test_agreement_survives_a_state_round_trip():
    correction = DriftCorrection(0.3, agreement=4)
    for lesson in lessons(torch.Generator().manual_seed(1), 5, torch.ones(DIM), 0.1):
        correction.update(lesson, torch.zeros(DIM), 8, 0.1)
    restored = DriftCorrection(0.3, agreement=4)
    restored.load_state_dict(correction.state_dict())
    assert restored.factor == correction.factor > 0
    torch.testing.assert_close(restored.vector, correction.vector)
    assert DriftCorrection(0.3).state_dict().keys() == {"correction"}  # off: as before


@pytest.mark.parametrize(
    ("spec", "graph"),
    [
        ("gossip:b=2", star(6)),
        ("gossip:b=2", ring(6)),
        ("dynamic:b=1,rel=0.0005,condition=distance", star(6)),
        ("dynamic:b=1,rel=0.0005,condition=distance", complete(5)),
        ("periodic:b=3", complete(5)),
        ("gossip:b=4,floor=2", ring(6)),
        ("dynamic:b=1,rel=0.0005,condition=distance,floor=2", star(6)),
    ],
    ids=[
        "gossip-star",
        "gossip-ring",
        "dynamic-star",
        "dynamic-complete",
        "periodic-complete",
        "gossip-floor",
        "dynamic-floor",
    ],
)
def test_corrections_sum_to_zero_though_each_node_agrees_differently(spec, graph):
    """Every node starts with its own factor (0.2 … 0.9) and learns its own from then on:
    the members of each merge learn with one shared factor, the mean of theirs, so the sum
    stays zero (a session, a gossip exchange, and a periodic round on a complete graph,
    where every node merges the same group)."""
    net = VirtualNet(f"{spec},correction=0.3,agreement=2", graph, seed=4, jitter=0.004)
    for core in net.cores.values():
        core.outer = None
    factors = {n: 0.2 + 0.7 * i / (len(graph) - 1) for i, n in enumerate(net.cores)}
    for node, core in net.cores.items():
        assert core.drift_correction.agreement is not None
        core.drift_correction.agreement.mean_cosine = factors[node]
    pull = {n: 0.05 * torch.randn(DIM, generator=net.gen) for n in net.cores}
    for _ in range(40):
        for node in net.cores:
            net.step(node, 0.05 * torch.randn(DIM, generator=net.gen) + pull[node])
        net.advance(net.now + 0.01)
    net.settle()
    assert net.stat("syncs") > 0 and len(net.corrections) == len(graph)
    assert any(isinstance(m, Average | ModelReply | Push) and m.agreement for *_, m in net.log)
    scale = max(float(c.abs().max()) for c in net.corrections.values())
    assert scale > 0.05
    total = torch.stack(list(net.corrections.values())).sum(0)
    torch.testing.assert_close(total, torch.zeros(DIM), atol=1e-4 * scale, rtol=0)


def test_agreement_is_off_by_default_and_a_spec_key():
    assert parse_protocol("dynamic").agreement == 0
    assert parse_protocol("periodic:b=5,agreement=4").agreement == 4
    assert parse_protocol("gossip:agreement=8").agreement == 8
    with pytest.raises(SpecError):
        parse_protocol("dynamic:agreement=-1")
    assert parse_protocol("dynamic").floor == 0
    assert parse_protocol("periodic:b=500,agreement=4,floor=16").floor == 16
    with pytest.raises(SpecError, match="agreement"):
        parse_protocol("dynamic:floor=16")  # a floor for the agreement, not the fixed gain
    assert parse_protocol("dynamic:agreement=4,against=mean").against == "mean"
    assert parse_protocol("dynamic:agreement=4").against == "last"
    assert parse_protocol("gossip:agreement=4,boost=2").boost == 2.0
    bad_specs = ("dynamic:against=mean", "dynamic:agreement=4,against=first", "dynamic:boost=2")
    for bad in bad_specs + ("periodic:agreement=4,boost=0",):
        with pytest.raises(SpecError):
            parse_protocol(bad)


@pytest.mark.parametrize(
    "message",
    [
        ModelReply(3, torch.ones(DIM), 10, ["a"], 7),
        Average(3, torch.ones(DIM), 7),
        Push(2, torch.ones(DIM), 10),
    ],
    ids=["reply", "average", "push"],
)
def test_agreement_is_an_optional_wire_field(message):
    schema = vector_schema()
    plain = encode(message, schema)
    assert "agreement" not in msgpack.unpackb(plain)  # off: the frame is as before
    assert decode(plain, schema).agreement is None
    message.agreement = 0.25
    told = encode(message, schema)
    assert encoded_size(message, schema) == len(told) > len(plain)
    assert decode(told, schema).agreement == 0.25
    for bad in (1.5, -0.1, math.nan, "1", 1):
        frame = msgpack.unpackb(told)
        frame["agreement"] = bad
        with pytest.raises(WireError, match="agreement"):
            decode(msgpack.packb(frame), schema)
    message.agreement = 2.0
    with pytest.raises(ValueError, match="agreement"):
        encode(message, schema)
