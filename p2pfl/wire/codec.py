"""Encode messages to msgpack bytes and decode peer bytes back, trusting nothing.

A frame is one msgpack map ``{"v": 1, "type": "model", <message fields>}``. Parameters travel
as a header (names, shapes, dtypes, 16-byte schema digest) plus one contiguous little-endian
raw buffer per dtype (msgpack bin). Compressed parameters (``p2pfl.learning.compression``)
travel as ``{"digest", "codec", <link header>, <the codec's arrays>}`` instead: the codec is
named in the frame, and a codec this node does not know is refused. ``decode`` checks size,
structure, field types and ranges, that the header equals the local schema, buffer lengths
(before allocating anything), scales, indices and finiteness, and raises ``WireError`` for
every problem: a peer can never crash a node with bytes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys

import msgpack
import torch

from p2pfl.errors import P2pflError
from p2pfl.learning.compression import (
    BASE_KINDS,
    BITS,
    CODECS,
    Compressed,
    decode_positions,
    encode_positions,
    max_scale,
    packed_count,
    scale_count,
)
from p2pfl.learning.params import ParamSchema
from p2pfl.wire.messages import Average, Busy, Confirm, Message, ModelReply, Pull, Push

if sys.byteorder != "little":
    raise ImportError("p2pfl.wire.codec needs a little-endian host: buffers are raw LE bytes")

WIRE_VERSION = 1
MAX_NEIGHBORS = 1024
MAX_PEER_ID_CHARS = 128

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
_MAX_NDIM = 64
_MAX_STR_BYTES = 1024
_MAX_MAP_LEN = 16
_ENVELOPE_SLACK = 4096
_WIRE_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
_TAGS: dict[type, str] = {
    Pull: "pull",
    ModelReply: "model",
    Busy: "busy",
    Average: "average",
    Push: "push",
    Confirm: "confirm",
}
_TYPES = {tag: cls for cls, tag in _TAGS.items()}
_FIELD_NAMES = {cls: tuple(f.name for f in dataclasses.fields(cls)) for cls in _TAGS}
_OPTIONAL = frozenset({"agreement"})
"""Fields left out of the frame when None (a float in [0, 1] otherwise)."""
_FLOAT_SIZE = 9  # msgpack float 64
_HEADER_KEYS = frozenset({"digest", "names", "shapes", "dtypes", "buffers"})
_LINK_INTS = ("seq", "base", "base_kind", "ack")
_MAX_BLOCK = 2**32
_LINK_BOOLS = ("echo", "resync")
_SCALED = frozenset({"values", "block", "scales"})
_CODEC_KEYS = {
    "fp16": (frozenset({"values"}),),
    **{name: (_SCALED,) for name in BITS},
    "topk": (frozenset({"values", "indices"}), _SCALED | {"indices"}),  # fp16 or int8 values
}


class WireError(P2pflError, ValueError):
    """Bytes from a peer that are not a valid message for our schema; the text says why."""


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Everything about a schema the codec needs, computed once per schema."""

    digest: bytes
    names: list[str]
    shapes: list[list[int]]
    dtypes: list[str]
    spans: dict[str, list[tuple[int, int]]]  # dtype -> runs (offset, length) of the flat vector
    buffer_bytes: dict[str, int]  # dtype -> exact length of its raw buffer
    max_frame_bytes: int
    unpack_limits: dict[str, int]  # msgpack bomb guards, see _layout


@functools.lru_cache(maxsize=64)
def _layout(schema: ParamSchema) -> _Layout:
    spans: dict[str, list[tuple[int, int]]] = {}
    offset = 0
    for spec in schema.params:
        if spec.dtype not in _WIRE_DTYPES:
            raise ValueError(
                f"parameter '{spec.name}' has dtype '{spec.dtype}', which cannot travel on the "
                f"wire; use one of {', '.join(_WIRE_DTYPES)}"
            )
        if spec.numel:
            runs = spans.setdefault(spec.dtype, [])
            if runs and runs[-1][0] + runs[-1][1] == offset:
                runs[-1] = (runs[-1][0], runs[-1][1] + spec.numel)
            else:
                runs.append((offset, spec.numel))
        offset += spec.numel
    buffer_bytes = {
        dtype: sum(n for _, n in runs) * _WIRE_DTYPES[dtype].itemsize
        for dtype, runs in spans.items()
    }
    header = sum(len(s.name.encode()) + len(s.dtype) + 9 * len(s.shape) + 16 for s in schema.params)
    neighbors = MAX_NEIGHBORS * (4 * MAX_PEER_ID_CHARS + 5)
    # Compressed: at most 4 bytes of scale plus 1 of value per entry (int8 with block=1), or
    # topk keeping everything: 2 bytes of value and 1 of position each (gaps of 0).
    params = max(sum(buffer_bytes.values()), 6 * schema.numel)
    return _Layout(
        digest=schema.digest(),
        names=schema.names,
        shapes=[list(spec.shape) for spec in schema.params],
        dtypes=[spec.dtype for spec in schema.params],
        spans=spans,
        buffer_bytes=buffer_bytes,
        max_frame_bytes=params + header + neighbors + _ENVELOPE_SLACK,
        # Twice the longest legitimate item: bounds what a frame can make msgpack allocate,
        # while a slightly-too-long field still parses and gets an error naming it.
        unpack_limits={
            "max_bin_len": 2 * max([16, 4 * schema.numel, *buffer_bytes.values()]),
            "max_str_len": 2 * max([_MAX_STR_BYTES, *(len(n.encode()) for n in schema.names)]),
            "max_array_len": 2 * max(MAX_NEIGHBORS, len(schema.params), _MAX_NDIM),
            "max_map_len": _MAX_MAP_LEN,
            "max_ext_len": 0,
        },
    )


def max_message_bytes(schema: ParamSchema) -> int:
    """Largest legitimate encoded size of any message for ``schema``, with a small margin."""
    return _layout(schema).max_frame_bytes


def encode(message: Message, schema: ParamSchema) -> bytes:
    """Serialize ``message``; its ``params`` must be a flat vector of ``schema.numel`` entries."""
    return msgpack.packb(_frame(message, schema))


def encoded_size(message: Message, schema: ParamSchema) -> int:
    """Exactly ``len(encode(message, schema))``, without packing anything: the size of the
    message type's frame with zero-valued fields (packed once per type and schema) plus what
    each integer and the neighbour list add in msgpack (what a simulated link carries)."""
    size = _zero_frame_size(type(message), schema)
    for name in _FIELD_NAMES[type(message)]:
        value = getattr(message, name)
        if name in _OPTIONAL:
            if value is not None:
                _check_fraction(value, name)
                size += _str_size(name) + _FLOAT_SIZE
        elif name == "params":
            if isinstance(value, Compressed):
                packed = msgpack.packb(_pack_compressed(value, _layout(schema)))
                size += len(packed) - _dense_params_size(schema)
            else:
                _check_params_to_send(value, schema)
        elif name == "neighbors":
            size += _neighbors_size(value)
        else:
            size += _int_size(value) - 1
    return size


def _neighbors_size(neighbors: list[str]) -> int:
    """What the neighbour list adds to a frame with an empty one, checked as ``encode``
    checks it (``_check_neighbors_to_send``); short ASCII peer ids at C speed."""
    _check_neighbors_to_send(neighbors)
    joined = "".join(neighbors)
    if joined.isascii() and (not neighbors or max(map(len, neighbors)) < 32):
        texts = len(joined) + len(neighbors)  # one byte per char, a fixstr header each
    else:
        texts = sum(_str_size(text) for text in neighbors)
    return _array_header(len(neighbors)) - 1 + texts


@functools.lru_cache(maxsize=256)
def _zero_frame_size(cls: type, schema: ParamSchema) -> int:
    """Encoded size of a ``cls`` message whose ints are 0, whose neighbour list is empty and
    whose optional fields are left out."""
    zeros: dict[str, object] = {
        name: None if name in _OPTIONAL else 0 for name in _FIELD_NAMES[cls]
    }
    if "params" in zeros:
        zeros["params"] = torch.zeros(schema.numel)
    if "neighbors" in zeros:
        zeros["neighbors"] = []
    return len(encode(cls(**zeros), schema))


@functools.lru_cache(maxsize=64)
def _dense_params_size(schema: ParamSchema) -> int:
    """Encoded size of the float32 ``params`` map of ``schema``."""
    return len(msgpack.packb(_pack_params(torch.zeros(schema.numel), schema)))


@functools.lru_cache(maxsize=4096)  # a session's id is sized in each of its messages
def _int_size(value: int) -> int:
    """Bytes of a msgpack int (positive/negative fixint, then 8/16/32/64-bit forms)."""
    if -32 <= value < 128:
        return 1
    bits = value.bit_length() if value > 0 else (-value - 1).bit_length() + 1
    for width, size in ((8, 2), (16, 3), (32, 5), (64, 9)):
        if bits <= width:
            return size
    raise OverflowError(f"integer {value} does not fit in 64 bits")


def _str_size(text: str) -> int:
    """Bytes of a msgpack str (fixstr, str 8/16/32)."""
    n = len(text.encode())
    return n + (1 if n < 32 else 2 if n < 2**8 else 3 if n < 2**16 else 5)


def _array_header(n: int) -> int:
    """Bytes msgpack puts before an array of ``n`` items (fixarray, array 16/32)."""
    return 1 if n < 16 else 3 if n < 2**16 else 5


def _frame(message: Message, schema: ParamSchema) -> dict[str, object]:
    tag = _TAGS.get(type(message))
    if tag is None:
        raise TypeError(f"cannot encode {type(message).__name__}: not a wire message")
    frame: dict[str, object] = {"v": WIRE_VERSION, "type": tag}
    for name in _FIELD_NAMES[type(message)]:
        value = getattr(message, name)
        if name in _OPTIONAL:
            if value is None:
                continue
            _check_fraction(value, name)
            value = float(value)
        elif name == "params":
            value = _pack_params(value, schema)
        elif name == "neighbors":
            _check_neighbors_to_send(value)
        frame[name] = value
    return frame


def _check_fraction(value: float, name: str) -> None:
    if not 0.0 <= value <= 1.0:  # also false for NaN
        raise ValueError(f"{name} {value!r} is not a fraction in [0, 1]")


def decode(data: bytes, schema: ParamSchema, max_bytes: int | None = None) -> Message:
    """Parse and validate bytes from a peer; raise ``WireError`` saying what is wrong."""
    layout = _layout(schema)
    limit = layout.max_frame_bytes if max_bytes is None else max_bytes
    if len(data) > limit:
        raise WireError(f"frame of {len(data)} bytes exceeds limit {limit}")
    try:
        frame = msgpack.unpackb(data, raw=False, strict_map_key=True, **layout.unpack_limits)
    except Exception as e:  # msgpack raises ValueError, TypeError, its own types, UnicodeError...
        raise WireError(f"malformed msgpack ({type(e).__name__}: {e})") from e
    if not isinstance(frame, dict):
        raise WireError(f"message must be a msgpack map, got {_kind(frame)}")
    version = frame.get("v")
    if type(version) is not int or version != WIRE_VERSION:
        raise WireError(f"unsupported wire version {version!r}: this node speaks {WIRE_VERSION}")
    tag = frame.get("type")
    if not isinstance(tag, str):
        raise WireError(f"field 'type' must be str, got {_kind(tag)}")
    cls = _TYPES.get(tag)
    if cls is None:
        raise WireError(f"unknown message type {tag!r}: expected one of {', '.join(_TYPES)}")
    names = [f.name for f in dataclasses.fields(cls)]
    allowed = {"v", "type", *names}
    unexpected = [key for key in frame if key not in allowed]
    if unexpected:
        raise WireError(f"unexpected field {unexpected[0]!r} in {tag!r} message")
    values: dict[str, object] = {}
    for name in names:
        if name in _OPTIONAL and name not in frame:
            continue
        if name not in frame:
            raise WireError(f"{tag!r} message lacks field {name!r}")
        values[name] = _read_field(name, frame[name], tag, layout)
    return cls(**values)


def _read_field(name: str, value: object, tag: str, layout: _Layout) -> object:
    where = f"field {name!r} of {tag!r} message"
    if name == "params":
        return _unpack_params(value, layout)
    if name == "neighbors":
        return _read_neighbors(value, where)
    if name in _OPTIONAL:
        if type(value) is not float or not 0.0 <= value <= 1.0:
            raise WireError(f"{where} must be a float in [0, 1], got {value!r:.40}")
        return value
    lowest = 0 if name in ("samples", "steps") else _INT64_MIN
    if type(value) is not int:
        raise WireError(f"{where} must be int, got {_kind(value)}")
    if not lowest <= value <= _INT64_MAX:
        raise WireError(f"{where} is {value}, outside [{lowest}, {_INT64_MAX}]")
    return value


def _read_neighbors(value: object, where: str) -> list[str]:
    if not isinstance(value, list):
        raise WireError(f"{where} must be a list of str, got {_kind(value)}")
    if len(value) > MAX_NEIGHBORS:
        raise WireError(f"{where} has {len(value)} entries, limit {MAX_NEIGHBORS}")
    for peer in value:
        if not isinstance(peer, str) or not 0 < len(peer) <= MAX_PEER_ID_CHARS:
            raise WireError(
                f"{where} must hold peer ids of 1..{MAX_PEER_ID_CHARS} chars, got {peer!r:.40}"
            )
    return value


def _check_neighbors_to_send(neighbors: list[str]) -> None:
    if len(neighbors) > MAX_NEIGHBORS:
        raise ValueError(f"{len(neighbors)} neighbors exceed the wire limit of {MAX_NEIGHBORS}")
    lengths = list(map(len, neighbors))
    if not lengths or min(lengths) > 0 and max(lengths) <= MAX_PEER_ID_CHARS:
        return
    for peer in neighbors:
        if not 0 < len(peer) <= MAX_PEER_ID_CHARS:
            raise ValueError(f"peer id {peer!r:.40} must have 1..{MAX_PEER_ID_CHARS} chars")


def _check_params_to_send(params: torch.Tensor, schema: ParamSchema) -> None:
    if params.dim() != 1 or params.numel() != schema.numel:
        raise ValueError(
            f"params has shape {tuple(params.shape)}, schema needs a flat vector of "
            f"{schema.numel} entries"
        )


def _pack_params(params: torch.Tensor | Compressed, schema: ParamSchema) -> dict[str, object]:
    layout = _layout(schema)
    if isinstance(params, Compressed):
        return _pack_compressed(params, layout)
    _check_params_to_send(params, schema)
    vector = params.detach().to("cpu", torch.float32).contiguous()
    buffers = {}
    for dtype, runs in layout.spans.items():
        parts = [vector[offset : offset + n] for offset, n in runs]
        chunk = parts[0] if len(parts) == 1 else torch.cat(parts)
        raw = chunk.to(_WIRE_DTYPES[dtype]).view(torch.uint8).numpy()
        buffers[dtype] = memoryview(raw)  # msgpack copies it once into the frame
    return {
        "digest": layout.digest,
        "names": layout.names,
        "shapes": layout.shapes,
        "dtypes": layout.dtypes,
        "buffers": buffers,
    }


def _pack_compressed(c: Compressed, layout: _Layout) -> dict[str, object]:
    numel = sum(n for runs in layout.spans.values() for _, n in runs)
    if c.numel != numel or c.codec not in CODECS:
        raise ValueError(f"a {c.codec} payload of {c.numel} entries; the schema needs {numel}")
    frame: dict[str, object] = {"digest": layout.digest, "codec": c.codec}
    frame |= {name: getattr(c, name) for name in _LINK_INTS + _LINK_BOOLS}
    frame["values"] = _raw(c.values)
    if c.scales is not None:
        frame["block"], frame["scales"] = c.block, _raw(c.scales.to(torch.float32))
    if c.codec == "topk":
        assert c.indices is not None
        frame["indices"] = encode_positions(c.indices)
    return frame


def _raw(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.detach().contiguous().view(torch.uint8).numpy())


def _unpack_params(header: object, layout: _Layout) -> torch.Tensor | Compressed:
    if not isinstance(header, dict):
        raise WireError(f"field 'params' must be a map, got {_kind(header)}")
    if "codec" in header:
        return _unpack_compressed(header, layout)
    if header.keys() != _HEADER_KEYS:
        raise WireError(f"params header must have keys {sorted(_HEADER_KEYS)}")
    digest, buffers = header["digest"], header["buffers"]
    if not isinstance(digest, bytes) or len(digest) != 16:
        raise WireError("params header 'digest' must be 16 bytes")
    peer = _read_specs(header)
    ours = list(zip(layout.names, layout.shapes, layout.dtypes, strict=True))
    if digest != layout.digest:
        raise WireError(
            "schema hash mismatch: peer sent parameters for a different model "
            f"({_describe_mismatch(peer, ours)})"
        )
    if peer != ours:
        raise WireError(f"params header does not match its hash ({_describe_mismatch(peer, ours)})")
    if not isinstance(buffers, dict) or buffers.keys() != layout.spans.keys():
        raise WireError(
            f"params buffers must be a map with one entry per dtype {list(layout.spans)}"
        )
    chunks = {}
    for dtype, expected in layout.buffer_bytes.items():
        raw = buffers[dtype]
        if not isinstance(raw, bytes) or len(raw) != expected:
            size = f"{len(raw)} bytes" if isinstance(raw, bytes) else _kind(raw)
            raise WireError(f"params buffer '{dtype}' must be {expected} bytes, got {size}")
        chunks[dtype] = torch.frombuffer(bytearray(raw), dtype=_WIRE_DTYPES[dtype])
    vector = _gather(chunks, layout)
    if not all_finite(vector):
        bad = int((~torch.isfinite(vector)).sum())
        raise WireError(f"params contain NaN/inf ({bad} of {vector.numel()} values)")
    return vector


def _unpack_compressed(header: dict[str, object], layout: _Layout) -> Compressed:
    """Validate a compressed payload (every length before allocating, scales, indices,
    finiteness) and return it; decoding it on the link is the protocol's job."""
    codec = header["codec"]
    if not isinstance(codec, str) or codec not in CODECS:
        raise WireError(f"unknown codec {codec!r:.40}: this node decodes {', '.join(CODECS)}")
    link_keys = {"digest", "codec", *_LINK_INTS, *_LINK_BOOLS}
    if header.keys() not in [link_keys | keys for keys in _CODEC_KEYS[codec]]:
        raise WireError(
            f"{codec} params must have keys "
            + " or ".join(str(sorted(link_keys | keys)) for keys in _CODEC_KEYS[codec])
        )
    if header["digest"] != layout.digest:
        raise WireError("schema hash mismatch: peer sent parameters for a different model")
    link: dict[str, object] = {}
    for name in _LINK_INTS:
        value = header[name]
        if type(value) is not int or not 0 <= value <= _INT64_MAX:
            raise WireError(
                f"{codec} params field {name!r} must be an int in [0, 2**63), got {value!r:.40}"
            )
        link[name] = value
    if link["base_kind"] >= len(BASE_KINDS):
        raise WireError(
            f"{codec} params field 'base_kind' must be below {len(BASE_KINDS)}, "
            f"got {link['base_kind']}"
        )
    for name in _LINK_BOOLS:
        if type(header[name]) is not bool:
            raise WireError(f"{codec} params field {name!r} must be a bool")
        link[name] = header[name]
    numel = sum(n for runs in layout.spans.values() for _, n in runs)
    if codec == "fp16":
        values = _buffer(header, "values", 2 * numel, torch.float16)
        return Compressed("fp16", numel, _finite(values, "values"), **link)  # type: ignore[arg-type]
    if codec in BITS:
        dtype = torch.int8 if codec == "int8" else torch.uint8
        values = _buffer(header, "values", packed_count(codec, numel), dtype)
        block, scales = _scales(header, codec, numel)
        return Compressed(codec, numel, values, scales=scales, block=block, **link)  # type: ignore[arg-type]
    raw = header["indices"]
    if not isinstance(raw, bytes):
        raise WireError(f"topk params 'indices' must be bytes, got {_kind(raw)}")
    try:
        indices = decode_positions(raw, numel)
    except ValueError as exc:
        raise WireError(f"topk params 'indices': {exc}") from None
    k = indices.numel()
    if "scales" in header:
        values = _buffer(header, "values", k, torch.int8)
        block, scales = _scales(header, "int8", k)
        return Compressed("topk", numel, values, scales, block, indices=indices, **link)  # type: ignore[arg-type]
    values = _finite(_buffer(header, "values", 2 * k, torch.float16), "values")
    return Compressed("topk", numel, values, indices=indices, **link)  # type: ignore[arg-type]


def _scales(header: dict[str, object], codec: str, numel: int) -> tuple[int, torch.Tensor]:
    """``(block, scales)`` of a block-scaled payload of ``numel`` quantized entries: the
    block an int in range, one finite scale in ``[0, max_scale(codec)]`` per block."""
    block = header["block"]
    if type(block) is not int or not 0 <= block <= _MAX_BLOCK:
        raise WireError(
            f"{header['codec']} params 'block' must be an int in [0, {_MAX_BLOCK}], "
            f"got {block!r:.40}"
        )
    scales = _buffer(header, "scales", 4 * scale_count(numel, block), torch.float32)
    limit = max_scale(codec)
    if scales.numel() and not (
        bool(torch.isfinite(scales).all())
        and float(scales.min()) >= 0
        and float(scales.max()) <= limit
    ):
        raise WireError(f"{header['codec']} params scales must be finite and in [0, {limit:.3g}]")
    return block, scales


def _buffer(
    header: dict[str, object], name: str, expected: int, dtype: torch.dtype
) -> torch.Tensor:
    """A bin field of exactly ``expected`` bytes as a tensor of ``dtype`` (length first)."""
    raw = header[name]
    if not isinstance(raw, bytes) or len(raw) != expected:
        size = f"{len(raw)} bytes" if isinstance(raw, bytes) else _kind(raw)
        raise WireError(f"{header['codec']} params {name!r} must be {expected} bytes, got {size}")
    if not expected:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=dtype)


def _finite(values: torch.Tensor, name: str) -> torch.Tensor:
    if values.numel() and not bool(torch.isfinite(values).all()):
        bad = int((~torch.isfinite(values)).sum())
        raise WireError(f"compressed params {name!r} contain NaN/inf ({bad} of {values.numel()})")
    return values


def all_finite(vector: torch.Tensor) -> bool:
    """True if no NaN/inf. aminmax propagates NaN; checking its two ends as Python floats is
    several times faster than ``isfinite().all()`` on small vectors."""
    if vector.numel() == 0:
        return True
    low, high = torch.aminmax(vector)
    return math.isfinite(low.item()) and math.isfinite(high.item())


def _gather(chunks: dict[str, torch.Tensor], layout: _Layout) -> torch.Tensor:
    """Reassemble per-dtype buffers into the float32 flat vector in schema order."""
    if len(chunks) == 1:
        return next(iter(chunks.values())).to(torch.float32)
    total = sum(n for runs in layout.spans.values() for _, n in runs)
    vector = torch.empty(total, dtype=torch.float32)
    for dtype, runs in layout.spans.items():
        position = 0
        for offset, n in runs:
            vector[offset : offset + n] = chunks[dtype][position : position + n]
            position += n
    return vector


def _read_specs(header: dict[str, object]) -> list[tuple[str, list[int], str]]:
    names, shapes, dtypes = header["names"], header["shapes"], header["dtypes"]
    if not (isinstance(names, list) and isinstance(shapes, list) and isinstance(dtypes, list)):
        raise WireError("params header 'names', 'shapes' and 'dtypes' must be lists")
    if not len(names) == len(shapes) == len(dtypes):
        raise WireError("params header 'names', 'shapes' and 'dtypes' differ in length")
    if not all(isinstance(x, str) for x in names + dtypes):
        raise WireError("params header 'names' and 'dtypes' must hold str")
    for shape in shapes:
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise WireError(f"params header shape {shape!r:.40} must be a list of ints >= 0")
    return list(zip(names, shapes, dtypes, strict=True))


def _describe_mismatch(
    peer: list[tuple[str, list[int], str]], ours: list[tuple[str, list[int], str]]
) -> str:
    if len(peer) != len(ours):
        return f"peer has {len(peer)} tensors, we have {len(ours)}"
    for i, (theirs, mine) in enumerate(zip(peer, ours, strict=True)):
        if theirs != mine:
            return f"tensor {i}: peer {_show(theirs)}, ours {_show(mine)}"
    return "same names, shapes and dtypes but a different hash"


def _show(spec: tuple[str, list[int], str]) -> str:
    name, shape, dtype = spec
    return f"{name!r:.80} {str(tuple(shape)):.80} {dtype!r:.20}"


def _kind(value: object) -> str:
    return type(value).__name__
