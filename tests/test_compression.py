"""Codecs (fp16, int8, int4, int2, sign, topk): round-trip error, error feedback on links, the
wire format of compressed parameters (exact sizes, strict refusal of hostile payloads) and
the invariant a compressed dynamic merge keeps."""

from __future__ import annotations

import contextlib
import itertools
import math
import random
import re
from collections.abc import Callable

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kit import VirtualNet
from test_dynamic_invariants import DIM, TICK, random_graph, start_models

from p2pfl.learning.compression import (
    LEVELS,
    CodecConfig,
    Compressed,
    compress,
    decode_positions,
    decompress,
    encode_positions,
)
from p2pfl.learning.params import ParamSchema, ParamSpec
from p2pfl.protocol.actions import ReplaceModel, Send, SetCorrection
from p2pfl.protocol.config import parse_protocol
from p2pfl.protocol.core import make_core
from p2pfl.protocol.correction import correction_gain
from p2pfl.protocol.dynamic import DynamicCore
from p2pfl.protocol.links import CodecLinks, LinkError
from p2pfl.spec import SpecError
from p2pfl.wire.codec import WireError, decode, encode, encoded_size
from p2pfl.wire.messages import Average, Busy, ModelReply, Pull, Push

SCHEMA = ParamSchema((ParamSpec("fc.weight", (30, 20)), ParamSpec("fc.bias", (30,))))
N = SCHEMA.numel
CONFIGS = [
    CodecConfig("fp16"),
    CodecConfig("int8"),
    CodecConfig("int8", block=0),
    CodecConfig("int8", block=7),
    CodecConfig("int4"),
    CodecConfig("int4", block=0),
    CodecConfig("int4", base="shared"),
    CodecConfig("int2"),
    CodecConfig("int2", block=7, base="shared"),
    CodecConfig("int2", base="shared", scale="unbiased"),
    CodecConfig("sign"),
    CodecConfig("sign", block=7),
    CodecConfig("topk", fraction=0.05),
    CodecConfig("topk", fraction=1.0),
    CodecConfig("topk", fraction=0.05, values="int8"),
    CodecConfig("topk", fraction=1.0, values="int8", block=0),
]


def randn(n: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(n, generator=torch.Generator().manual_seed(seed))


# -- each codec round-trips within its stated error --
@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(0, 600),
    seed=st.integers(0, 2**31),
    scale=st.sampled_from([1e-6, 1e-2, 1.0, 300.0]),
)
def test_codecs_round_trip_within_their_stated_error(n, seed, scale):
    x = randn(n, seed, scale)
    fp16 = decompress(compress(x, CodecConfig("fp16")))
    assert ((fp16 - x).abs() <= 2**-11 * x.abs() + 2**-24).all()
    for block, (codec, levels) in itertools.product((0, 1, 5, 256), LEVELS.items()):
        c = compress(x, CodecConfig(codec, block=block))
        width = block or max(n, 1)
        bound = c.scales.repeat_interleave(width)[:n] / 2 * (1 + 1e-5) + 1e-30
        assert ((decompress(c) - x).abs() <= bound).all()
        if n:  # the scale is the block's largest magnitude over the largest level
            assert float(c.scales.max()) == pytest.approx(float(x.abs().max()) / levels)
    for block in (0, 1, 5, 256):
        # int2: levels ±scale/2, ±3·scale/2, scale the block's root mean square; each entry
        # within scale/2, or beyond 2·scale within |x| - 3·scale/2
        width = block or max(n, 1)
        c = compress(x, CodecConfig("int2", block=block))
        y = decompress(c)
        assert y.numel() == n and c.values.numel() == math.ceil(n / 4)
        for row, got, scale in zip(
            torch.split(x, width), torch.split(y, width), c.scales, strict=False
        ):
            assert float(scale) == pytest.approx(float(row.square().mean().sqrt()), rel=1e-5)
            bound = torch.maximum(scale / 2, row.abs() - 1.5 * scale) * (1 + 1e-5) + 1e-30
            assert ((got - row).abs() <= bound).all()
            if scale > 0:  # every entry on one of the four levels
                off = (got / scale).unsqueeze(1) - torch.tensor([-1.5, -0.5, 0.5, 1.5])
                assert float(off.abs().amin(1).max()) < 1e-5
        # unbiased: the same codes at the scale with x̂·x = ||x||² per block, so the error is
        # ||x̂||² - ||x||²
        fitted = compress(x, CodecConfig("int2", block=block), unbiased=True)
        assert torch.equal(fitted.values, c.values)
        z = decompress(fitted)
        for row, got in zip(torch.split(x, width), torch.split(z, width), strict=False):
            energy = float(row.square().sum())
            assert float(got @ row) == pytest.approx(energy, rel=1e-4, abs=1e-30)
            err = float((got - row).square().sum())
            assert err == pytest.approx(
                float(got.square().sum()) - energy, rel=1e-3, abs=1e-4 * energy + 1e-30
            )
    for block in (0, 1, 5, 256):
        width = block or max(n, 1)
        c = compress(x, CodecConfig("sign", block=block))
        y = decompress(c)
        assert y.numel() == n and c.scales.numel() == (math.ceil(n / width) if n else 0)
        for row, got, scale in zip(
            torch.split(x, width), torch.split(y, width), c.scales, strict=False
        ):
            # sign(x) * mean|x| of the block: error ||x||² - ||x||₁²/n, at most (1 - 1/n)||x||²
            assert float(scale) == pytest.approx(float(row.abs().mean()), rel=1e-5)
            assert (got.sign() * row.sign() >= 0).all()
            err = float((got - row).square().sum())
            energy = float(row.square().sum())
            assert err == pytest.approx(
                energy - float(row.abs().sum()) ** 2 / len(row), rel=1e-3, abs=1e-6 * energy + 1e-30
            )
            assert err <= (1 - 1 / len(row)) * energy * (1 + 1e-4) + 1e-30
    for fraction in (0.01, 0.3, 1.0):
        for values in ("fp16", "int8"):
            c = compress(x, CodecConfig("topk", fraction=fraction, values=values))
            k = min(n, max(1, math.ceil(fraction * n))) if n else 0
            assert c.indices.numel() == k
            y = decompress(c)
            kept = torch.zeros(n, dtype=torch.bool)
            kept[c.indices] = True
            # the kept entries are the largest ones, within fp16 rounding or int8's scale/2
            # (one block of 256 kept values per scale); the others are 0
            if values == "fp16":
                bound = 2**-11 * x[kept].abs() + 2**-24
            else:
                bound = c.scales.repeat_interleave(256)[:k] / 2 * (1 + 1e-5) + 1e-30
            assert ((y[kept] - x[kept]).abs() <= bound).all()
            assert (y[~kept] == 0).all()
            if k < n:
                assert float(x[kept].abs().min()) >= float(x[~kept].abs().max())


@settings(max_examples=60, deadline=None)
@given(positions=st.sets(st.integers(0, 2**32 - 1), max_size=50))
def test_positions_round_trip_delta_coded(positions):
    indices = torch.tensor(sorted(positions), dtype=torch.int64)
    raw = encode_positions(indices)
    assert torch.equal(decode_positions(raw, 2**32), indices)
    dense = torch.arange(0, 4000, 20)  # gaps < 128: one byte each
    assert len(encode_positions(dense)) == len(dense)


# -- error feedback --
def test_error_feedback_sum_of_sent_converges_to_sum_of_meant():
    """Echoed corrections (a session's average back to a member): what topk leaves out is
    added to the next one, so the sums agree up to the last residual; without feedback the
    same small entries are dropped every time and the gap grows linearly."""
    a, b = CodecLinks(CodecConfig("topk", fraction=0.05)), CodecLinks(CodecConfig("topk"))
    b_model = torch.zeros(N)
    a.decode("b", b.encode("a", b_model))  # the member's reply: the echo base
    direction = randn(N, 1)  # the same correction every time plus noise
    meant_sum, sent_sum, plain_sum = torch.zeros(N), torch.zeros(N), torch.zeros(N)
    gaps = []
    for t in range(400):
        meant = direction + 0.3 * randn(N, 100 + t)
        sent = b.decode("a", a.encode("b", meant, echo=True)) - b_model
        meant_sum += meant
        sent_sum += sent
        plain_sum += decompress(compress(meant, CodecConfig("topk", fraction=0.05)))
        torch.testing.assert_close(sent_sum + a.residuals()["b"], meant_sum, atol=1e-3, rtol=1e-4)
        gaps.append(float((sent_sum - meant_sum).norm() / meant_sum.norm()))
    assert gaps[-1] < 0.03 and gaps[-1] < gaps[99] / 3  # the relative gap shrinks like 1/t
    assert float((plain_sum - meant_sum).norm() / meant_sum.norm()) > 0.5
    assert float(a.residuals()["b"].norm()) < 40 * float(direction.norm())  # bounded


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.label)
def test_delta_chain_tracks_the_vector_without_accumulating_error(config):
    """Replies/pushes: the receiver's reconstruction follows a drifting vector; its error
    stays at the size of one step's compression, however many messages were sent."""
    a, b = CodecLinks(config), CodecLinks(config)
    x = randn(N, 0)
    errors = []
    for t in range(300):
        x = x + 0.01 * randn(N, 1000 + t)
        seen = b.decode("a", a.encode("b", x))
        a.decode("b", b.encode("a", torch.zeros(N)))  # b's own traffic carries the acks
        errors.append(float((seen - x).norm()))
    step = 0.01 * math.sqrt(N)
    bound = {"topk": 4.0, "sign": 1.5, "int4": 0.2, "int2": 0.6}.get(config.name, 0.02)
    assert max(errors[-100:]) < bound * step + 1e-3
    if config.name in ("topk", "sign", "int2") and config.fraction < 1:
        assert max(errors[-100:]) < 1.5 * max(errors[:100])  # no growth


@pytest.mark.parametrize("config", [c for c in CONFIGS if c.name in ("int8", "int4")])
def test_a_lossy_average_moves_the_reference_by_the_stated_codec_errors(config):
    """What a lossy average changes for dynamic's Δ test: a member's new reference differs
    from the coordinator's (the average ``a``) by exactly ``e_before - e_after``, the change
    of the echo residual (one compression's stated error per entry, ``scale / 2``): the echo
    is added to the coordinator's copy of the reply ``x̂`` (``echo_base``, bit for bit the
    coordinator's), so the reply's chain error ``x - x̂`` is dropped, not kept in the model;
    the spread of references is bounded by the codec, not by how often the link is used."""
    coordinator, member = CodecLinks(config), CodecLinks(config)
    x = randn(N, 0)
    for t in range(20):
        x = x + 0.05 * randn(N, 10 + t)
        reply = member.encode("c", x)
        seen = coordinator.decode("m", reply)  # x̂: the coordinator's copy of the reply
        average = 0.5 * (seen + randn(N, 100 + t))
        before = coordinator.residuals().get("m", torch.zeros(N))
        echo = coordinator.encode("m", average, echo=True)
        reference = member.decode("c", echo)
        after = coordinator.residuals()["m"]
        assert torch.equal(member.echo_base("c", echo), seen)
        torch.testing.assert_close(reference - average, before - after, atol=1e-5, rtol=0)
        for payload, error in ((reply, x - seen), (echo, after)):
            width = payload.block or N
            bound = payload.scales.repeat_interleave(width)[:N] / 2 * (1 + 1e-5) + 1e-6
            assert (error.abs() <= bound).all()


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.label)
def test_copy_of_is_what_the_peer_will_decode_and_changes_nothing(config):
    """A fixed schedule's merge mixes what its peers hold of its model (``copy_of``): bit
    for bit the vector the peer decodes from the next message, asked before it is sent."""
    a, b = CodecLinks(config), CodecLinks(config)
    for i in range(6):
        x = randn(N, i) + 0.1 * i
        copy = a.copy_of("b", x)
        torch.testing.assert_close(a.copy_of("b", x), copy, rtol=0, atol=0)
        torch.testing.assert_close(b.decode("a", a.encode("b", x)), copy, rtol=0, atol=0)
        if i % 2:  # the peer answers: its ack moves our chain's base
            a.decode("b", b.encode("a", randn(N, 50 + i)))
    assert CodecLinks(config).copy_of("b", x).shape == x.shape  # a key frame's copy


def test_unbiased_int2_scales_chain_messages_and_leaves_echoes_at_the_rms_scale():
    """``scale=unbiased``: a delta-chain message (key frame in int2 included) decodes to
    ``x̂`` with ``x̂·x = ||x||²``, its error no longer shrinking it toward its base; an echo,
    whose error returns with the residual, keeps the RMS scale (the smaller error)."""
    gaussian = randn(4096, 0)  # the RMS scale shrinks a Gaussian by about its MSE, 0.12
    shrunk = decompress(compress(gaussian, CodecConfig("int2", block=1024))) @ gaussian
    assert 0.8 < float(shrunk / gaussian.square().sum()) < 0.95
    config = CodecConfig("int2", key="int2", scale="unbiased")
    a, b = CodecLinks(config), CodecLinks(config)
    x = randn(N, 1)
    key = a.encode("b", x)
    assert key.codec == "int2" and torch.equal(key.scales, compress(x, config, True).scales)
    assert float(b.decode("a", key) @ x) == pytest.approx(float(x @ x), rel=1e-4)
    a.decode("b", b.encode("a", randn(N, 2)))
    held = b.decode("a", key)  # what b holds of a's last message (a re-decode changes nothing)
    y = randn(N, 3)
    reply = a.encode("b", y)
    delta = b.decode("a", reply) - held
    assert float(delta @ (y - held)) == pytest.approx(float((y - held).square().sum()), rel=1e-4)
    echo = b.encode("a", randn(N, 4), echo=True)
    plain = compress(randn(N, 4) - b._in["a"].mirrors[b._in["a"].last], config)
    assert echo.echo and torch.equal(echo.scales, plain.scales)


def test_key_frames_travel_in_the_key_codec():
    """A link's first message is the vector itself in ``key_codec`` (int8 for int2 unless
    ``key=`` says otherwise), later ones deltas in the link's codec."""
    for config, key in ((CodecConfig("int2"), "int8"), (CodecConfig("int2", key="int4"), "int4")):
        a, b = CodecLinks(config), CodecLinks(config)
        first = a.encode("b", randn(N, 1))
        b.decode("a", first)
        a.decode("b", b.encode("a", randn(N, 2)))  # acknowledges the key frame
        second = a.encode("b", randn(N, 3))
        assert (first.codec, first.base, second.codec, second.base) == (key, 0, "int2", 1)
        error = (decompress(first) - randn(N, 1)).abs().max()
        assert float(error) <= float(first.scales.max()) / 2 * (1 + 1e-5)  # its stated error


@pytest.mark.parametrize("config", [CodecConfig("sign"), CodecConfig("topk", fraction=0.05)])
def test_a_delta_beyond_the_tolerance_travels_in_the_key_codec(config):
    """With a tolerance, a chain delta the codec would leave off by more than it (a rarely
    used link's large move) travels in the key codec, within that codec's stated error, and
    both ends still agree on the reconstruction; a small one, and any echo, stay in the
    codec."""
    a, b = CodecLinks(config), CodecLinks(config)
    x = randn(N, 1)
    b.decode("a", a.encode("b", x))
    a.decode("b", b.encode("a", randn(N, 2)))  # acknowledges the key frame
    for scale, codec in ((1e-3, config.name), (1.0, "int8")):
        held = a._out["b"].sent[a._out["b"].acked]  # what b holds: the delta's base
        y = held + scale * randn(N, 3)
        tolerance = 1e-3 * float(randn(N, 3).norm())  # more than either codec leaves off 1e-3
        c = a.encode("b", y, tolerance=tolerance)
        decoded = b.decode("a", c)
        assert c.codec == codec and c.base >= 1  # a delta either way, not a key frame
        assert torch.equal(decoded, a._out["b"].sent[c.seq])  # both ends hold the same copy
        error = (decoded - y).abs().max()
        if codec == "int8":  # the key codec's stated error on the delta
            assert float(error) <= float(c.scales.max()) / 2 * (1 + 1e-5)
            assert float((decoded - y).norm()) < 0.1 * float((y - held).norm())
        a.decode("b", b.encode("a", randn(N, 5)))  # acknowledges it
    assert a.fallbacks == 1
    held = a._out["b"].sent[a._out["b"].acked]
    assert a.encode("b", held + randn(N, 6)).codec == config.name  # no tolerance: no limit
    echo = b.encode("a", x + randn(N, 7), echo=True, tolerance=1e-9)
    assert echo.echo and echo.codec == config.name  # an echo's error returns in the next one


def test_lost_messages_and_restarts_recover_with_a_reason():
    a, b = CodecLinks(CodecConfig("int8")), CodecLinks(CodecConfig("int8"))
    x = randn(N, 0)
    b.decode("a", a.encode("b", x))
    a.decode("b", b.encode("a", x))  # ack of a's first message
    a.encode("b", x + 1)  # lost on the way
    seen = b.decode("a", a.encode("b", x + 2))  # a delta on the acknowledged message
    torch.testing.assert_close(seen, x + 2, atol=0.05, rtol=0)
    b = CodecLinks(CodecConfig("int8"))  # b restarted: it holds nothing of a's chain
    with pytest.raises(LinkError, match="which we do not hold.*asking for a key frame"):
        b.decode("a", a.encode("b", x + 3))
    a.decode("b", b.encode("a", x))  # carries resync
    torch.testing.assert_close(b.decode("a", a.encode("b", x + 4)), x + 4, atol=0.05, rtol=0)
    with pytest.raises(LinkError, match="average on our message 99"):
        b.decode(
            "a", Compressed("fp16", N, torch.zeros(N, dtype=torch.float16), base=99, echo=True)
        )


def _session(coordinator: CodecLinks, member: CodecLinks, x: torch.Tensor, other: torch.Tensor):
    """One balancing session of two: the member's reply, the coordinator's average echoed
    back; returns the member's new model and the reply as sent."""
    reply = member.encode("c", x)
    average = 0.5 * (coordinator.decode("m", reply) + other)
    return member.decode("c", coordinator.encode("m", average, echo=True)), reply


def test_shared_bases_shrink_the_delta_of_a_rarely_used_link():
    """After a session both ends hold the echoed average; the member's next reply is a delta
    on it (base_kind 1), as is the coordinator's next message to the member (base_kind 3),
    instead of on their last own messages, which lie a whole averaging step away. Both ends
    compute the shared vector bit for bit, and the receiver's copy is within one int2
    compression of the small delta."""
    config = CodecConfig("int2", base="shared")
    coordinator, member = CodecLinks(config), CodecLinks(config)
    chain_c, chain_m = CodecLinks(CodecConfig("int2")), CodecLinks(CodecConfig("int2"))
    x, other = randn(N, 0), randn(N, 1) + 3.0
    for links in ((coordinator, member), (chain_c, chain_m)):
        links[1].decode("c", links[0].encode("m", other))  # first contact: key frames
        links[0].decode("m", links[1].encode("c", x))
    x, _ = _session(coordinator, member, x, other)
    _session(chain_c, chain_m, x, other)
    torch.testing.assert_close(
        member._out["c"].echoed[max(member._out["c"].echoed)],
        coordinator._in["m"].echoed[max(coordinator._in["m"].echoed)],
        rtol=0,
        atol=0,
    )
    moved = x + 0.01 * randn(N, 2)  # a little local training since the average
    shared, chained = member.encode("c", moved), chain_m.encode("c", moved)
    assert shared.base_kind == 1 and chained.base_kind == 0
    seen = coordinator.decode("m", shared)
    assert float((seen - moved).norm()) < 0.4 * float((chain_c.decode("m", chained) - moved).norm())
    assert float((seen - moved).norm()) < 0.5 * float((moved - x).norm()) + 0.05
    own = x + 0.01 * randn(N, 3)  # the coordinator's model, near the average too
    back = coordinator.encode("m", own)
    assert back.base_kind == 3
    assert float((member.decode("c", back) - own).norm()) < 0.5 * float((own - x).norm()) + 0.05


def test_a_key_frame_in_one_direction_leaves_no_shared_base_behind():
    """A receiver drops the averages echoed on a link when its peer's key frame arrives (the
    peer may have restarted), so the sender forgets them as it sends one: a node's first
    message to a peer that was its member (a key frame) is not followed by a delta on the
    average it echoed to that peer before, which the peer no longer holds (seen as a
    refused reply in ``dynamic`` runs before the fix)."""
    config = CodecConfig("int8", base="shared")
    a, b = CodecLinks(config), CodecLinks(config)
    x = randn(N, 0)
    b.decode("a", a.encode("b", x))  # a's reply to b's session: a key frame
    average = x + 0.1 * randn(N, 1)
    a.decode("b", b.encode("a", average, echo=True))  # b echoes the average on it
    a.decode("b", b.encode("a", average + 0.1 * randn(N, 2)))  # b's first message to a
    b.decode("a", a.encode("b", x + randn(N, 3), echo=True))  # a echoes on that one
    near = average + 0.01 * randn(N, 4)  # b's model, nearest the average it echoed to a
    c = b.encode("a", near)
    assert c.base_kind != 3
    torch.testing.assert_close(a.decode("b", c), near, atol=0.05, rtol=0)


def test_a_lost_shared_base_asks_for_a_key_frame_once():
    """A receiver that no longer holds the shared base (it restarted unnoticed) refuses with
    the reason and asks for a key frame; the sender then forgets the shared vectors of that
    link, so the key frame and what follows decode (no refusal loop)."""
    config = CodecConfig("int4", base="shared")
    coordinator, member = CodecLinks(config), CodecLinks(config)
    x, other = randn(N, 0), randn(N, 1) + 3.0
    member.decode("c", coordinator.encode("m", other))
    coordinator.decode("m", member.encode("c", x))
    x, _ = _session(coordinator, member, x, other)
    restarted = CodecLinks(config)
    with pytest.raises(LinkError, match="which we do not hold.*asking for a key frame"):
        restarted.decode("m", member.encode("c", x + 0.01))
    member.decode("c", restarted.encode("m", other))  # carries resync
    for t in range(3):
        got = restarted.decode("m", member.encode("c", x + 0.02 * t))
        torch.testing.assert_close(got, x + 0.02 * t, atol=0.05, rtol=0)
        member.decode("c", restarted.encode("m", other))


# -- wire --
def payloads() -> list[Compressed]:
    out = []
    for i, config in enumerate(CONFIGS):
        c = compress(randn(N, i), config)
        c.seq, c.base, c.base_kind, c.ack, c.echo, c.resync = (
            i + 1,
            i,
            i % 4,
            2**63 - 1 if i == 2 else 3,
            i == 1,
            i == 3,
        )
        out.append(c)
    return out


@pytest.mark.parametrize("payload", payloads(), ids=lambda c: f"{c.codec}-{c.block}")
def test_compressed_params_round_trip_with_exact_sizes(payload):
    for message in (
        ModelReply(1, payload, 5, ["p"], 3),
        Average(-4, payload, 2),
        Push(3, payload, 9),
    ):
        data = encode(message, SCHEMA)
        assert encoded_size(message, SCHEMA) == len(data)
        got = decode(data, SCHEMA).params
        assert isinstance(got, Compressed)
        link = ("seq", "base", "base_kind", "echo", "ack", "resync")
        for name in ("codec", "numel", "block", *link):
            assert getattr(got, name) == getattr(payload, name)
        assert torch.equal(decompress(got), decompress(payload))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    codec=st.sampled_from(CONFIGS),
    seq=st.integers(0, 2**63 - 1),
    base=st.integers(0, 2**63 - 1),
    ack=st.integers(0, 2**63 - 1),
    session=st.integers(-(2**63), 2**63 - 1),
    seed=st.integers(0, 1000),
)
def test_encoded_size_is_exact_for_compressed_params(codec, seq, base, ack, session, seed):
    c = compress(randn(N, seed), codec)
    c.seq, c.base, c.ack = seq, base, ack
    message = Average(session, c, seed)
    assert encoded_size(message, SCHEMA) == len(encode(message, SCHEMA))


def test_compressed_frames_are_much_smaller():
    mlp = ParamSchema(
        (
            ParamSpec("fc1.weight", (64, 64)),
            ParamSpec("fc1.bias", (64,)),
            ParamSpec("head.weight", (10, 64)),
            ParamSpec("head.bias", (10,)),
        )
    )
    x = randn(mlp.numel, 0)
    dense = len(encode(Average(1, x), mlp))
    sizes = {c.label: len(encode(Average(1, compress(x, c)), mlp)) for c in CONFIGS}
    assert sizes["fp16"] < 0.52 * dense
    assert sizes["int8:block=256"] < 0.28 * dense
    assert sizes["int4:block=256"] < 0.15 * dense
    assert sizes["int2:block=256"] < 0.08 * dense
    assert sizes["sign:block=256"] < 0.05 * dense
    assert sizes["topk=0.05"] < 0.08 * dense
    assert sizes["topk=0.05,values=int8"] < 0.04 * dense


def _frame(codec: str = "int8") -> dict:
    config = next(c for c in CONFIGS if c.label.startswith(codec))
    return msgpack.unpackb(encode(Average(1, compress(randn(N, 0), config)), SCHEMA))


def _set(key: str, value: object) -> Callable[[dict], None]:
    return lambda params: params.__setitem__(key, value)


HOSTILE = [
    ("int8", _set("codec", "zstd"), "unknown codec 'zstd'"),
    ("int8", _set("codec", 3), "unknown codec 3"),
    ("int8", _set("values", b"\0" * (N - 1)), "'values' must be"),
    ("int8", _set("scales", b"\0" * 3), "'scales' must be"),
    (
        "int8",
        _set("scales", (torch.ones(3) * float("nan")).numpy().tobytes()),
        "scales must be finite",
    ),
    ("int8", _set("scales", (-torch.ones(3)).numpy().tobytes()), "scales must be finite"),
    ("int8", _set("scales", (torch.ones(3) * 1e38).numpy().tobytes()), "scales must be finite"),
    ("int8", _set("block", -1), "'block' must be an int"),
    ("int8", _set("block", 2**32 + 1), "'block' must be an int"),
    ("int8", _set("block", 1), "'scales' must be"),  # scale count no longer fits
    ("int8", _set("seq", -1), "'seq' must be an int"),
    ("int8", _set("ack", "3"), "'ack' must be an int"),
    ("int8", _set("echo", 1), "'echo' must be a bool"),
    ("int8", _set("base_kind", 4), "'base_kind' must be below 4"),
    ("int8", _set("base_kind", -1), "'base_kind' must be an int"),
    ("int2", _set("values", b"\0" * (N // 4 + 2)), "'values' must be"),
    ("int2", _set("scales", (torch.ones(3) * 2.1e38).numpy().tobytes()), "scales must be finite"),
    ("int8", _set("digest", b"x" * 16), "schema hash mismatch"),
    ("int8", _set("extra", 1), "params must have keys"),
    ("int8", lambda p: p.pop("scales"), "params must have keys"),
    ("fp16", _set("values", torch.full((N,), float("nan")).half().numpy().tobytes()), "NaN/inf"),
    ("fp16", _set("values", torch.full((N,), float("inf")).half().numpy().tobytes()), "NaN/inf"),
    ("fp16", _set("values", b"\0" * (2 * N + 2)), "'values' must be"),
    ("int4", _set("values", b"\0" * N), "'values' must be"),
    ("int4", _set("scales", (torch.ones(3) * 1e38).numpy().tobytes()), "scales must be finite"),
    ("sign", _set("values", b"\0" * (N // 8)), "'values' must be"),
    ("sign", _set("scales", (torch.ones(3) * float("inf")).numpy().tobytes()), "finite"),
    ("sign", lambda p: p.pop("block"), "params must have keys"),
    ("topk=0.05", _set("indices", b"\x80"), "inside a varint"),
    ("topk=0.05", _set("indices", b"\xff" * 6 + b"\x01"), "longer than 5 varint bytes"),
    ("topk=0.05", _set("indices", b"\0" * (N + 1)), "more positions"),
    ("topk=0.05", _set("indices", b"\0" + bytes([N % 128 | 128, N // 128])), "stay below"),
    ("topk=0.05", _set("indices", 7), "'indices' must be bytes"),
    ("topk=0.05", _set("values", b"\0" * 4), "'values' must be"),
    ("topk=0.05", _set("block", 256), "params must have keys"),
    ("topk=0.05,values=int8", _set("values", b"\0" * 4), "'values' must be"),
    ("topk=0.05,values=int8", _set("scales", b"\0" * 8), "'scales' must be"),
    (
        "topk=0.05,values=int8",
        _set("scales", (-torch.ones(1)).numpy().tobytes()),
        "scales must be finite",
    ),
]


@pytest.mark.parametrize("codec,mutate,fragment", HOSTILE)
def test_hostile_compressed_frames_are_refused_with_a_reason(codec, mutate, fragment):
    frame = _frame(codec)
    mutate(frame["params"])
    with pytest.raises(WireError, match=fragment.replace("(", r"\(").replace("'", "'")):
        decode(msgpack.packb(frame), SCHEMA)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), codec=st.sampled_from([c.label for c in CONFIGS]))
def test_mutated_compressed_frames_raise_only_wire_error(data, codec):
    raw = bytearray(msgpack.packb(_frame(codec)))
    for _ in range(data.draw(st.integers(1, 6))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    with contextlib.suppress(WireError):
        decode(bytes(raw), SCHEMA)


def test_codec_keys_in_protocol_specs():
    assert parse_protocol("dynamic:codec=int8").codec == CodecConfig("int8", base="shared")
    assert parse_protocol("dynamic:codec=int8,base=chain").codec == CodecConfig("int8")
    assert parse_protocol("periodic:b=5,codec=int8,block=0").codec == CodecConfig(
        "int8", block=0, base="shared"
    )
    assert parse_protocol("gossip:codec=topk,topk=0.02,base=chain").codec == CodecConfig(
        "topk", fraction=0.02
    )
    assert parse_protocol("continuous:codec=fp16").codec == CodecConfig("fp16", base="shared")
    assert parse_protocol("dynamic:codec=sign,block=64").codec == CodecConfig(
        "sign", block=64, base="shared"
    )
    assert parse_protocol("periodic:codec=topk,topk=0.05,values=int8,block=0").codec == (
        CodecConfig("topk", block=0, fraction=0.05, values="int8", base="shared")
    )
    assert parse_protocol("dynamic:codec=int2,base=shared,delta=0.5").codec == CodecConfig(
        "int2", base="shared", scale="unbiased"
    )
    assert parse_protocol("gossip:codec=int2").codec == CodecConfig("int2", base="shared")
    assert parse_protocol("gossip:codec=int2,scale=unbiased").codec.scale == "unbiased"
    assert parse_protocol("dynamic:codec=int2,scale=rms").codec == CodecConfig(
        "int2", base="shared"
    )
    assert parse_protocol("dynamic:codec=int2,key=int4").codec.label == (
        "int2:block=256,base=shared,key=int4,scale=unbiased"
    )
    assert parse_protocol("gossip:codec=topk,topk=0.1,mix=0.5,key=int4").codec == CodecConfig(
        "topk", fraction=0.1, mix=0.5, key="int4", base="shared"
    )
    assert CodecConfig("topk", fraction=0.1).consensus_step == pytest.approx(0.25)
    assert CodecConfig("int2").consensus_step == 1.0
    assert (CodecConfig("int2").key_codec, CodecConfig("int2", key="int4").key_codec) == (
        "int8",
        "int4",
    )
    assert parse_protocol("dynamic:codec=sign,tol=0.5").codec == CodecConfig(
        "sign", base="shared", tol=0.5
    )
    assert parse_protocol("dynamic:codec=sign,tol=0.5,base=chain").codec.label == (
        "sign:block=256,tol=0.5"
    )
    assert parse_protocol("periodic:codec=int2,base=chain").codec == CodecConfig("int2")
    assert parse_protocol("dynamic").codec is None
    for bad, fragment in [
        ("dynamic:codec=zip", "codec must be one of fp16, int8, int4, int2, sign, topk"),
        ("dynamic:codec=topk,block=4", "'block' does not apply to codec=topk (add values=int8)"),
        ("dynamic:codec=sign,values=int8", "'values' does not apply to codec=sign"),
        ("dynamic:codec=topk,values=int4", "choose one of fp16, int8"),
        ("dynamic:topk=0.1", "add codec=int8 or codec=topk"),
        ("dynamic:base=shared", "add codec=int8 or codec=topk"),
        ("periodic:codec=int4,base=last", "choose one of chain, shared"),
        ("dynamic:codec=fp16,block=3", "'block' does not apply to codec=fp16"),
        ("dynamic:codec=topk,topk=0", "kept fraction must be in (0, 1]"),
        ("dynamic:codec=int8,block=-1", "must be >= 0"),
        ("gossip:codec=topk,mix=0", "the consensus step must be in (0, 1]"),
        ("gossip:codec=int2,key=sign", "choose one of fp16, int8, int4, int2"),
        ("gossip:mix=0.5", "add codec=int8 or codec=topk"),
        ("periodic:codec=sign,tol=0.5", "periodic has no Δ (drop tol)"),
        ("dynamic:codec=sign,tol=0", "must be a positive number"),
        ("dynamic:tol=0.5", "add codec=int8 or codec=topk"),
        ("dynamic:codec=int4,scale=unbiased", "'scale' does not apply to codec=int4"),
        ("dynamic:codec=topk,scale=rms", "'scale' does not apply to codec=topk"),
        ("dynamic:codec=int2,scale=max", "choose one of rms, unbiased"),
        ("dynamic:scale=rms", "add codec=int8 or codec=topk"),
    ]:
        with pytest.raises(SpecError, match=re.escape(fragment)):
            parse_protocol(bad)


# -- merges of compressed models --
class BoxedModel:
    """A core's model access to ``box["w"]``, which the test replaces between events."""

    samples = 1

    def __init__(self, box: dict[str, torch.Tensor]) -> None:
        self.box = box

    def read(self) -> torch.Tensor:
        return self.box["w"]


@pytest.mark.parametrize(
    "spec",
    [
        "dynamic:codec=int8",
        "dynamic:codec=int4",
        "dynamic:codec=topk,topk=0.1",
        "dynamic:codec=sign,tol=1",
    ],
)
def test_compressed_dynamic_keeps_the_global_mean_up_to_held_residuals(spec, monkeypatch):
    """Members adopt the average as echoed on the coordinator's copy of their reply (computed
    from the decoded replies), the coordinator the average itself: the sum of all models
    moves by the local steps minus exactly the error-feedback residuals coordinators still
    hold and the members' reply errors ``x - x̂`` dropped on adopting. With ``tol`` replies
    beyond it travel in the key codec (int8), the rest and every echo in the codec."""
    dropped = torch.zeros(DIM)
    adopt = DynamicCore._adopt

    def counting(self, merged, sent, steps, current=None, seen=None, *, lesson, **shared):
        nonlocal dropped
        if seen is not None:
            dropped = dropped + (sent - seen)
        return adopt(self, merged, sent, steps, current, seen, lesson=lesson, **shared)

    monkeypatch.setattr(DynamicCore, "_adopt", counting)
    n, seed = 10, 3
    gen = torch.Generator().manual_seed(seed)
    graph = random_graph(n, seed)
    adjacency = {str(i): {str(j) for j in graph[i]} for i in graph}
    start = {str(i): w for i, w in enumerate(start_models(n, gen))}
    net = VirtualNet(spec, adjacency, start, seed=seed, latency=0.002, jitter=0.02, dim=DIM)
    before = net.mean()
    rng = random.Random(seed)
    for _ in range(300):
        net.advance(net.now + TICK)
        for node in net.cores:
            if rng.random() < 0.8:
                net.step(node, 0.01 * torch.randn(DIM, generator=gen) + 0.002 * (int(node) - n / 2))
    net.settle()
    # A reply on a shared base (dynamic's default) that overtakes the echo it is a delta on
    # is refused (the jitter reorders messages) and the link resyncs: rare, and the sum holds.
    assert net.stat("sessions") >= 50 and net.stat("refused_codec") <= 1
    coded = [m for _, _, _, m in net.log if isinstance(getattr(m, "params", None), Compressed)]
    assert coded and all(m.params.codec in ("int8", "int4", "topk", "sign") for m in coded)
    if "tol" in spec:  # both: replies that fell back, and echoes and small replies in sign
        replies = {m.params.codec for m in coded if isinstance(m, ModelReply) and m.params.base}
        assert replies == {"int8", "sign"}
        assert {m.params.codec for m in coded if isinstance(m, Average)} == {"sign"}
    held = sum(
        (r for c in net.cores.values() for r in c.links.residuals().values()), torch.zeros(DIM)
    )
    assert float(dropped.abs().max()) > 0  # the reply errors members dropped
    torch.testing.assert_close(
        net.mean() * n, (before + net.added / n) * n - held - dropped, atol=2e-4, rtol=0
    )
    assert net.spread() < 0.1 * net.spread(alone=True)  # topk: 0.07 with clipped merges


@pytest.mark.parametrize(
    "spec",
    ["gossip:b=2,codec=topk,topk=0.05", "gossip:b=2,codec=sign", "gossip:b=2,codec=int2"],
)
def test_lossy_gossip_merges_copies_keeping_the_sum_and_mixing(spec):
    """Both ends of an exchange move by half the difference of the two copies their link
    carried (``NodeCore._merge`` with ``copies``), so the sum of all models moves only by
    the local steps, whatever the codec leaves out; and the models still mix. Merging the
    exact model with a 5 % ``topk`` copy (most of it the first key frame) instead pulled
    every model back toward where its peers started."""
    n, seed = 8, 5
    gen = torch.Generator().manual_seed(seed)
    graph = random_graph(n, seed)
    adjacency = {str(i): {str(j) for j in graph[i]} for i in graph}
    start = {str(i): torch.randn(DIM, generator=gen) for i in range(n)}
    net = VirtualNet(spec, adjacency, start, seed=seed, latency=0.002, dim=DIM)
    before = net.mean()
    for _ in range(400):
        net.advance(net.now + TICK)
        for node in net.cores:
            net.step(node, 0.01 * torch.randn(DIM, generator=gen) + 0.002 * (int(node) - n / 2))
    net.settle()
    assert net.stat("syncs") >= 500 and net.stat("refused_codec") == 0
    coded = [m for _, _, _, m in net.log if isinstance(getattr(m, "params", None), Compressed)]
    assert sum(m.params.codec == spec.split("codec=")[1].split(",")[0] for m in coded) > 500
    torch.testing.assert_close(net.mean(), before + net.added / n, atol=1e-4, rtol=0)
    assert net.spread() < 0.2 * net.spread(alone=True)


def test_lossy_periodic_merges_the_copies_its_neighbours_hold():
    """A periodic round mixes the node's copy as its neighbours hold it (``sent_copies``)
    with theirs and keeps what its own message left out, moving by the consensus step
    ``mix``: the result is ``sent + γ·(merge(copies) - copy)``, and the drift correction
    learns ``γ·(copy - merge)``."""
    config = parse_protocol("periodic:b=1,codec=topk,topk=0.05,mix=0.5,correction=0.5")
    model = {"w": randn(N, 0)}
    node, peer = make_core("n", config, BoxedModel(model), ["p"]), CodecLinks(config.codec)
    corrections = [torch.zeros(N)]
    for rnd in (1, 2):
        model["w"] = model["w"] + randn(N, 10 + rnd)
        push = next(a for a in node.on_local_step(float(rnd)) if isinstance(a, Send))
        copy = peer.decode("n", push.message.params)
        theirs = peer.encode("n", randn(N, 20 + rnd))
        actions = node.on_message(float(rnd), "p", Push(rnd, theirs, 1))
        corrections += [a.vector for a in actions if isinstance(a, SetCorrection)]
    sent, held = model["w"], node.links._in["p"].mirrors[theirs.seq]  # their copy, decoded
    replaced = next(a.params for a in actions if isinstance(a, ReplaceModel))
    assert float((sent - copy).norm()) > 0.3 * float(sent.norm())  # 5 % topk: a poor copy
    torch.testing.assert_close(replaced, sent + 0.5 * ((copy + held) / 2 - copy))
    gain = correction_gain(0.5, 1) / node.step_size
    torch.testing.assert_close(corrections[-1] - corrections[-2], 0.5 * (copy - held) / 2 * gain)


def test_exact_links_merge_the_exact_models():
    """Without a codec a periodic round is the plain mean of the closed neighbourhood."""
    box = {"w": randn(N, 0)}
    node = make_core("n", parse_protocol("periodic:b=1,correction=0"), BoxedModel(box), "pq")
    node.on_local_step(1.0)
    theirs = {p: randn(N, i) for i, p in enumerate("pq", 1)}
    actions = [a for p, w in theirs.items() for a in node.on_message(1.0, p, Push(1, w, 1))]
    replaced = next(a.params for a in actions if isinstance(a, ReplaceModel))
    torch.testing.assert_close(replaced, (box["w"] + theirs["p"] + theirs["q"]) / 3)


def test_a_member_adopts_the_average_on_the_coordinators_copy_of_its_reply():
    """int2 drops about a third of a reply's delta. The member adopts the echoed average on
    the coordinator's copy ``x̂`` of its reply, not on its exact model, and its drift
    correction learns from ``x̂``: the reply's codec error, which the group never saw, is
    neither kept in the model nor read as gradient drift (kept, corrections integrated it
    at the next sessions until int2 runs diverged)."""
    config = parse_protocol("dynamic:codec=int2,correction=0.5")
    model = {"w": randn(N, 0)}
    member, coordinator = make_core("m", config, BoxedModel(model), ["c"]), CodecLinks(config.codec)
    for session, steps in ((1, 0), (2, 4)):
        model["w"] = model["w"] + randn(N, 10 + session)  # a long move: a coarse delta
        (send, _timer) = member.on_message(float(session), "c", Pull(session))
        sent, reply = model["w"].clone(), send.message.params
        seen = coordinator.decode("m", reply)
        average = 0.5 * (seen + randn(N, 20 + session))
        echo = coordinator.encode("m", average, echo=True)
        actions = member.on_message(float(session), "c", Average(session, echo, steps))
    replaced = next(a.params for a in actions if isinstance(a, ReplaceModel))
    adopted = seen + decompress(echo)
    assert float((sent - seen).norm()) > 0.2 * float((sent - average).norm())  # a coarse reply
    torch.testing.assert_close(replaced, adopted, rtol=0, atol=0)
    torch.testing.assert_close(member.reference, adopted, rtol=0, atol=0)
    correction = next(a.vector for a in actions if isinstance(a, SetCorrection))
    gain = correction_gain(0.5, 4) / (member.step_size * 4)
    torch.testing.assert_close(correction, (seen - adopted) * gain)


def test_a_refused_reply_reaches_the_policy_as_busy():
    config = parse_protocol("dynamic:codec=int8")

    class Model:
        def read(self) -> torch.Tensor:
            return torch.ones(N)

        samples = 1

    core = make_core("c", config, Model(), ["m"])
    bogus = Compressed("int8", N, torch.zeros(N, dtype=torch.int8), torch.ones(1), 0, seq=5, base=4)
    assert core._decoded("m", ModelReply(7, bogus, 1)) == Busy(7)
    assert core._decoded("m", Push(3, bogus, 1)) is None
    assert core.stats.refused_codec == 2
