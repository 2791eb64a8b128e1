"""Wire codec: round trips, size overhead and strict rejection of bad peer bytes."""

from __future__ import annotations

import struct
from collections.abc import Callable

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kit import INT64, MSGPACK_VALUES
from torch import nn

from p2pfl.learning.params import ParamSchema, ParamSpec
from p2pfl.wire.codec import (
    MAX_NEIGHBORS,
    MAX_PEER_ID_CHARS,
    WireError,
    decode,
    encode,
    encoded_size,
    max_message_bytes,
)
from p2pfl.wire.messages import Average, Busy, Confirm, Message, ModelReply, Pull, Push

SCHEMA = ParamSchema((ParamSpec("fc.weight", (3, 4)), ParamSpec("fc.bias", (3,))))
MIXED = ParamSchema(
    (
        ParamSpec("a", (2, 3), "float32"),
        ParamSpec("b", (4,), "float16"),
        ParamSpec("c", (2,), "float32"),
        ParamSpec("d", (3,), "float64"),
        ParamSpec("e", (0,), "bfloat16"),
    )
)


def mlp_schema() -> ParamSchema:
    """The 64-64-10 MLP of the design notes: 4,810 parameters."""
    return ParamSchema.from_module(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)))


def vector(schema: ParamSchema = SCHEMA, seed: int = 0) -> torch.Tensor:
    return torch.randn(schema.numel, generator=torch.Generator().manual_seed(seed))


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)


def messages(params: torch.Tensor) -> list[Message]:
    return [
        Pull(session=7),
        ModelReply(session=-(2**63), params=params, samples=2**63 - 1, neighbors=["12D3Koo", "b"]),
        ModelReply(session=1, params=params, samples=0),
        Busy(session=2**63 - 1),
        Average(session=3, params=params),
        Push(round=-1, params=params, samples=12),
        Confirm(session=2**40),
    ]


def assert_same(decoded: Message, sent: Message) -> None:
    assert type(decoded) is type(sent)
    for name, value in vars(sent).items():
        got = getattr(decoded, name)
        if isinstance(value, torch.Tensor):
            assert got.dtype == torch.float32 and got.shape == value.shape
            assert torch.equal(bits(got), bits(value))
        else:
            assert got == value


def reencode(data: bytes, mutate: Callable[[dict], object]) -> bytes:
    """Unpack a valid frame, let ``mutate`` edit the dict in place, and pack it again."""
    frame = msgpack.unpackb(data, raw=False)
    mutate(frame)
    return msgpack.packb(frame)


def model_frame(schema: ParamSchema = SCHEMA, params: torch.Tensor | None = None) -> bytes:
    params = vector(schema) if params is None else params
    return encode(ModelReply(session=5, params=params, samples=9, neighbors=["p1"]), schema)


# --- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("message", messages(vector()), ids=lambda m: type(m).__name__)
def test_round_trip_every_message_type(message: Message) -> None:
    assert_same(decode(encode(message, SCHEMA), SCHEMA), message)


def test_round_trip_is_bitwise_for_awkward_floats() -> None:
    tiny = torch.finfo(torch.float32).tiny
    awkward = [0.0, -0.0, tiny, tiny / 8, 2.0**-149, -3.4e38, 3.4e38, 1 / 3, -1e-30]
    params = torch.tensor(awkward + [1.5] * (SCHEMA.numel - len(awkward)), dtype=torch.float32)
    assert_same(decode(encode(Average(1, params), SCHEMA), SCHEMA), Average(1, params))


def test_mixed_dtypes_travel_as_one_buffer_per_dtype() -> None:
    # Values exactly representable in float16 so the float16 part survives bitwise.
    params = torch.arange(MIXED.numel, dtype=torch.float32) / 4 - 1
    data = encode(Average(session=1, params=params), MIXED)
    buffers = msgpack.unpackb(data)["params"]["buffers"]
    assert sorted(buffers) == ["float16", "float32", "float64"]
    assert [len(buffers[d]) for d in ("float32", "float16", "float64")] == [32, 8, 24]
    assert_same(decode(data, MIXED), Average(session=1, params=params))


def test_float32_buffer_is_the_raw_little_endian_vector() -> None:
    params = vector()
    frame = msgpack.unpackb(encode(Average(1, params), SCHEMA))
    assert frame["params"]["buffers"]["float32"] == params.numpy().astype("<f4").tobytes()
    assert frame["params"]["digest"] == SCHEMA.digest()


def test_empty_schema_round_trips() -> None:
    empty = ParamSchema(())
    sent = Push(round=3, params=torch.empty(0), samples=1)
    assert_same(decode(encode(sent, empty), empty), sent)


def test_decoded_params_are_writable_and_do_not_alias_the_frame() -> None:
    data = model_frame()
    decoded = decode(data, SCHEMA)
    assert isinstance(decoded, ModelReply)
    decoded.params.add_(1.0)
    assert_same(decode(data, SCHEMA), ModelReply(5, vector(), 9, ["p1"]))


def test_model_message_overhead_is_under_1_kib() -> None:
    schema = mlp_schema()
    assert schema.numel == 4810
    params = vector(schema)
    for message in (
        ModelReply(session=2**40, params=params, samples=60_000),
        Average(session=2**40, params=params),
        Push(round=10_000, params=params, samples=60_000),
    ):
        overhead = encoded_size(message, schema) - 4 * schema.numel
        assert 0 < overhead < 1024, (type(message).__name__, overhead)


@pytest.mark.parametrize(
    "schema",
    [
        SCHEMA,
        MIXED,
        ParamSchema((ParamSpec("w", (60,)),)),  # 240-byte buffer: bin 8
        ParamSchema((ParamSpec("w", (64,)),)),  # 256-byte buffer: bin 16
        ParamSchema((ParamSpec("w", (16384,)),)),  # 65,536-byte buffer: bin 32
        ParamSchema((ParamSpec("a", (3,), "float16"), ParamSpec("b", (20000,)))),
    ],
    ids=["small", "mixed", "bin8", "bin16", "bin32", "f16+bin32"],
)
def test_encoded_size_is_exactly_the_encoded_length(schema: ParamSchema) -> None:
    for message in messages(vector(schema)):
        assert encoded_size(message, schema) == len(encode(message, schema))


EDGES = st.sampled_from(
    [0, 127, 128, -32, -33, -128, -129, 255, 256, 2**16 - 1, 2**16, -(2**15), -(2**15) - 1]
    + [2**32 - 1, 2**32, -(2**31), -(2**31) - 1, 2**63 - 1, -(2**63)]
)


@settings(max_examples=300, deadline=None)
@given(
    ints=st.lists(st.one_of(INT64, EDGES), min_size=3, max_size=3),
    neighbors=st.lists(st.text(min_size=1, max_size=MAX_PEER_ID_CHARS), max_size=40),
)
def test_encoded_size_matches_encode_for_any_field_values(
    ints: list[int], neighbors: list[str]
) -> None:
    """The size is computed from msgpack's rules for ints, strings and arrays: it must equal
    the real encoding for every value range (fixints, 8/16/32/64-bit, negative forms) and
    for neighbour ids of any length and script."""
    params = vector()
    a, b, c = ints
    for message in (
        Pull(a),
        Busy(b),
        ModelReply(a, params, b, neighbors, c),
        Average(a, params, c),
        Push(c, params, a),
    ):
        assert encoded_size(message, SCHEMA) == len(encode(message, SCHEMA))


def test_encoded_size_refuses_what_encode_refuses() -> None:
    for encoder in (encode, encoded_size):
        with pytest.raises(OverflowError):
            encoder(Pull(2**64), SCHEMA)
        with pytest.raises(ValueError, match="neighbors exceed"):
            encoder(ModelReply(1, vector(), 1, ["p"] * (MAX_NEIGHBORS + 1)), SCHEMA)
        for bad in ("", "p" * (MAX_PEER_ID_CHARS + 1)):
            with pytest.raises(ValueError, match="must have 1"):
                encoder(ModelReply(1, vector(), 1, ["a", bad, "b"]), SCHEMA)


def test_encoded_size_checks_params_like_encode() -> None:
    with pytest.raises(ValueError, match="flat vector"):
        encoded_size(Average(1, torch.zeros(SCHEMA.numel + 1)), SCHEMA)


def test_max_message_bytes_covers_the_largest_legitimate_message() -> None:
    schema = mlp_schema()
    widest = ["\U0001f600" * MAX_PEER_ID_CHARS] * MAX_NEIGHBORS  # 4 UTF-8 bytes per char
    message = ModelReply(-(2**63), vector(schema), 2**63 - 1, widest)
    data = encode(message, schema)
    assert len(data) <= max_message_bytes(schema) < 4 * schema.numel + 1024 * 1024
    assert_same(decode(data, schema), message)


# --- encode refuses what it cannot send -------------------------------------------------------


@pytest.mark.parametrize("params", [torch.zeros(14), torch.zeros(16), torch.zeros(3, 5)])
def test_encode_rejects_params_of_the_wrong_length(params: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="flat vector of 15 entries"):
        encode(Average(session=1, params=params), SCHEMA)


def test_encode_rejects_neighbor_lists_peers_would_refuse() -> None:
    too_many = ModelReply(1, vector(), 1, ["p"] * (MAX_NEIGHBORS + 1))
    with pytest.raises(ValueError, match="exceed the wire limit"):
        encode(too_many, SCHEMA)
    with pytest.raises(ValueError, match="must have 1.."):
        encode(ModelReply(1, vector(), 1, ["x" * (MAX_PEER_ID_CHARS + 1)]), SCHEMA)


def test_encode_rejects_dtypes_the_wire_cannot_carry() -> None:
    odd = ParamSchema((ParamSpec("w", (2,), "complex64"),))
    with pytest.raises(ValueError, match="cannot travel on the wire"):
        encode(Average(1, torch.zeros(2)), odd)


# --- decode rejects bad bytes with a helpful WireError ---------------------------------------


def test_decode_rejects_garbage() -> None:
    with pytest.raises(WireError, match="malformed msgpack"):
        decode(b"\xc1\x00garbage", SCHEMA)
    with pytest.raises(WireError, match="malformed msgpack"):
        decode(b"", SCHEMA)
    with pytest.raises(WireError, match="must be a msgpack map, got list"):
        decode(msgpack.packb([1, 2, 3]), SCHEMA)


def test_decode_rejects_every_truncation() -> None:
    data = model_frame()
    for cut in range(len(data)):
        with pytest.raises(WireError, match="malformed msgpack"):
            decode(data[:cut], SCHEMA)


def test_decode_rejects_trailing_bytes() -> None:
    with pytest.raises(WireError, match="malformed msgpack"):
        decode(model_frame() + b"\x00", SCHEMA)


def test_decode_rejects_oversized_frames_before_parsing() -> None:
    limit = max_message_bytes(SCHEMA)
    with pytest.raises(WireError, match=f"frame of {limit + 1} bytes exceeds limit {limit}"):
        decode(b"\x00" * (limit + 1), SCHEMA)
    data = model_frame()
    with pytest.raises(WireError, match="exceeds limit 100"):
        decode(data, SCHEMA, max_bytes=100)
    assert isinstance(decode(data, SCHEMA, max_bytes=len(data)), ModelReply)


def test_decode_rejects_msgpack_bombs() -> None:
    # A bin header claiming 4 GiB, and an array header claiming 4 billion entries.
    for bomb in (b"\xc6\xff\xff\xff\xff", b"\xdd\xff\xff\xff\xff", b"\x91" * 5000):
        with pytest.raises(WireError, match="malformed msgpack"):
            decode(bomb, SCHEMA)


@pytest.mark.parametrize(
    ("other", "fragment"),
    [
        (
            ParamSchema((ParamSpec("fc.weight", (4, 3)), ParamSpec("fc.bias", (3,)))),
            "tensor 0: peer 'fc.weight' (4, 3) 'float32', ours 'fc.weight' (3, 4)",
        ),
        (
            ParamSchema((ParamSpec("fc.w", (3, 4)), ParamSpec("fc.bias", (3,)))),
            "tensor 0: peer 'fc.w'",
        ),
        (
            ParamSchema((ParamSpec("fc.weight", (3, 4)), ParamSpec("fc.bias", (3,), "float64"))),
            "tensor 1: peer 'fc.bias' (3,) 'float64'",
        ),
        (ParamSchema((ParamSpec("fc.weight", (3, 5)),)), "peer has 1 tensors, we have 2"),
    ],
)
def test_decode_rejects_parameters_of_a_different_model(other: ParamSchema, fragment: str) -> None:
    data = encode(Average(session=1, params=vector(other)), other)
    with pytest.raises(WireError, match="schema hash mismatch: peer sent parameters") as info:
        decode(data, SCHEMA)
    assert fragment in str(info.value)


def test_decode_rejects_a_header_that_contradicts_its_hash() -> None:
    def rename(frame: dict) -> None:
        frame["params"]["names"][1] = "other"

    with pytest.raises(WireError, match="does not match its hash.*tensor 1: peer 'other'"):
        decode(reencode(model_frame(), rename), SCHEMA)

    def rehash(frame: dict) -> None:
        frame["params"]["digest"] = bytes(16)

    with pytest.raises(WireError, match="schema hash mismatch.*different hash"):
        decode(reencode(model_frame(), rehash), SCHEMA)


@pytest.mark.parametrize("position", [0, 1000, 4809])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_decode_rejects_non_finite_params(bad: float, position: int) -> None:
    schema = mlp_schema()
    params = vector(schema)
    params[position] = bad
    with pytest.raises(WireError, match=r"params contain NaN/inf \(1 of 4810 values\)"):
        decode(model_frame(schema, params), schema)


def test_decode_rejects_float64_values_that_overflow_float32() -> None:
    schema = ParamSchema((ParamSpec("w", (2,), "float64"),))

    def overflow(frame: dict) -> None:
        frame["params"]["buffers"]["float64"] = struct.pack("<2d", 1.0, 1e300)

    data = reencode(encode(Average(1, torch.zeros(2)), schema), overflow)
    with pytest.raises(WireError, match="NaN/inf"):
        decode(data, schema)


def set_path(path: tuple[str | int, ...], value: object) -> Callable[[dict], None]:
    def mutate(frame: dict) -> None:
        target = frame
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


def drop(key: str) -> Callable[[dict], None]:
    return lambda frame: frame.pop(key)


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (set_path(("session",), "5"), "field 'session' of 'model' message must be int, got str"),
        (set_path(("session",), True), "field 'session' of 'model' message must be int, got bool"),
        (set_path(("session",), 5.0), "field 'session' of 'model' message must be int, got float"),
        (set_path(("session",), 2**63), "'session' of 'model' message is 9223372036854775808"),
        (set_path(("samples",), -1), "field 'samples' of 'model' message is -1, outside [0,"),
        (set_path(("samples",), None), "field 'samples' of 'model' message must be int"),
        (set_path(("neighbors",), "p1"), "'neighbors' of 'model' message must be a list of str"),
        (set_path(("neighbors",), [1]), "must hold peer ids of 1..128 chars, got 1"),
        (set_path(("neighbors",), [""]), "must hold peer ids of 1..128 chars"),
        (set_path(("neighbors",), ["x" * 129]), "must hold peer ids of 1..128 chars"),
        (set_path(("neighbors",), ["p"] * 1025), "has 1025 entries, limit 1024"),
        (set_path(("params",), [1.0, 2.0]), "field 'params' must be a map, got list"),
        (set_path(("params", "extra"), 1), "params header must have keys"),
        (set_path(("params", "digest"), b"short"), "'digest' must be 16 bytes"),
        (set_path(("params", "names"), "fc.weight"), "'dtypes' must be lists"),
        (set_path(("params", "names"), ["fc.weight"]), "differ in length"),
        (set_path(("params", "dtypes", 0), 32), "'names' and 'dtypes' must hold str"),
        (set_path(("params", "shapes", 0), [3, -4]), "must be a list of ints >= 0"),
        (set_path(("params", "shapes", 0), [True, 4]), "must be a list of ints >= 0"),
        (
            set_path(("params", "buffers"), b"\x00" * 60),
            "buffers must be a map with one entry per dtype ['float32']",
        ),
        (
            set_path(("params", "buffers", "float64"), b""),
            "buffers must be a map with one entry per dtype ['float32']",
        ),
        (set_path(("params", "buffers", "float32"), b"\x00" * 56), "must be 60 bytes, got 56"),
        (set_path(("params", "buffers", "float32"), b"\x00" * 64), "must be 60 bytes, got 64"),
        (set_path(("params", "buffers", "float32"), "text"), "must be 60 bytes, got str"),
        (set_path(("type",), "foo"), "unknown message type 'foo': expected one of pull"),
        (set_path(("type",), 3), "field 'type' must be str, got int"),
        (set_path(("v",), 2), "unsupported wire version 2: this node speaks 1"),
        (set_path(("v",), "1"), "unsupported wire version '1'"),
        (drop("v"), "unsupported wire version None"),
        (drop("samples"), "'model' message lacks field 'samples'"),
        (set_path(("extra",), 1), "unexpected field 'extra' in 'model' message"),
    ],
)
def test_decode_rejects_bad_fields(mutate: Callable[[dict], None], fragment: str) -> None:
    with pytest.raises(WireError) as info:
        decode(reencode(model_frame(), mutate), SCHEMA)
    assert fragment in str(info.value)


def test_decode_rejects_a_message_dressed_as_another_type() -> None:
    data = reencode(encode(Pull(session=1), SCHEMA), set_path(("type",), "push"))
    with pytest.raises(WireError, match="unexpected field 'session' in 'push' message"):
        decode(data, SCHEMA)


def test_wire_error_is_a_value_error() -> None:
    assert issubclass(WireError, ValueError)


# --- fuzzing: only WireError, whatever the bytes ---------------------------------------------

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
VALID_FRAMES = [encode(m, SCHEMA) for m in messages(vector())]


def decode_or_wire_error(data: bytes) -> None:
    try:
        message = decode(data, SCHEMA)
    except WireError:
        return
    assert isinstance(message, Pull | ModelReply | Busy | Average | Push | Confirm)


@FUZZ
@given(st.binary(max_size=512))
def test_arbitrary_bytes_raise_only_wire_error(data: bytes) -> None:
    decode_or_wire_error(data)


@FUZZ
@given(
    st.sampled_from(VALID_FRAMES),
    st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1, max_size=8),
)
def test_mutated_valid_frames_raise_only_wire_error(
    frame: bytes, edits: list[tuple[int, int]]
) -> None:
    data = bytearray(frame)
    for position, value in edits:
        data[position % len(data)] = value
    decode_or_wire_error(bytes(data))


@FUZZ
@given(st.sampled_from(VALID_FRAMES), st.data())
def test_spliced_valid_frames_raise_only_wire_error(frame: bytes, data: st.DataObject) -> None:
    start = data.draw(st.integers(0, len(frame)))
    end = data.draw(st.integers(start, len(frame)))
    decode_or_wire_error(frame[:start] + data.draw(st.binary(max_size=16)) + frame[end:])


@FUZZ
@given(MSGPACK_VALUES)
def test_arbitrary_msgpack_values_raise_only_wire_error(value: object) -> None:
    frame = {"v": 1, "type": "model", "session": 1, "samples": 1, "neighbors": [], "params": value}
    for payload in (value, frame):
        decode_or_wire_error(msgpack.packb(payload))
