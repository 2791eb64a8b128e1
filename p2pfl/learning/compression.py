"""Lossy codecs for flat parameter vectors: ``fp16``; the block-scaled quantizers ``int8``,
``int4``, ``int2`` and ``sign`` (one float32 scale per block of entries, or one for the whole
vector);
and ``topk``, the largest ``fraction`` of entries by magnitude, whose kept values travel as
float16 or, with ``values=int8``, block-scaled int8.

``compress`` turns a float32 vector into a ``Compressed`` payload and ``decompress`` turns it
back; the wire (``p2pfl.wire.codec``) carries payloads, the protocol (``p2pfl.protocol.links``)
decides what to compress (deltas against what the peer already holds) and keeps what a lossy
encoding left out (error feedback). Stated error of one round trip of ``x``, per block of
``block`` entries (``block=0``: the whole vector is one block):

* ``fp16``: each entry within ``2**-11 * |x_i|`` (round to nearest; ``|x_i| <= 65504``);
* ``int8`` / ``int4``: each entry within ``scale / 2``, ``scale = max|x_block| / L`` with
  ``L = 127`` / ``7`` (8 / 4 bits per entry);
* ``int2``: 2 bits per entry, the four levels ``±scale/2`` and ``±3·scale/2`` with ``scale``
  the block's root mean square (close to the optimal 4-level quantizer of a Gaussian, MSE
  about ``0.12 ||x||²``): each entry within ``max(scale/2, |x_i| - 3·scale/2)``, i.e. within
  ``scale/2`` unless it lies beyond ``2·scale`` (the clipped tail returns with error feedback).
  With ``unbiased`` the codes stay those of that scale, but each block travels at the scale
  that makes its decoding ``x̂`` carry all of the block along it, ``x̂·x = ||x||²``: the
  RMS scale shrinks a block by about the MSE (``x̂·x ≈ 0.88 ||x||²``), the unbiased one does
  not, and its error is exactly ``||x̂||² - ||x||²`` (a little larger);
* ``sign``: each entry becomes ``sign(x_i) * mean|x_block|`` (1 bit per entry, the scaled
  sign of EF-SGD), so ``||x - x̂||² = ||x||² - ||x||₁² / n`` per block of ``n`` entries:
  at most ``(1 - 1/n) ||x||²``, about ``0.36 ||x||²`` for Gaussian entries;
* ``topk``: the kept entries within fp16 rounding (or int8's ``scale / 2`` over blocks of
  kept values), the others 0: ``||x - x̂||²`` is the dropped entries' energy plus that
  rounding, and the dropped part is at most ``(1 - fraction) ||x||²``. Positions travel
  delta-coded (``encode_positions``: about one byte each at a few per cent kept).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

# torch is imported where tensors are touched: protocol specs (community manifests, the CLI)
# name codecs without paying for its import.
if TYPE_CHECKING:
    import torch

CODECS = ("fp16", "int8", "int4", "int2", "sign", "topk")
TOPK_VALUES = ("fp16", "int8")
KEY_CODECS = ("fp16", "int8", "int4", "int2")
"""Codecs a key frame may travel in (``CodecConfig.key``)."""
FP16_MAX = 65504.0
LEVELS = {"int8": 127, "int4": 7}
"""Largest quantization level of each integer codec (``scale = max|block| / L``)."""
BITS = {"int8": 8, "int4": 4, "int2": 2, "sign": 1}
"""Bits per entry of the block-scaled codecs."""
MAX_DECODED = 3.0e38
"""Largest magnitude a decoded entry may have (float32 stays finite)."""
INT2_TOP = 1.5
"""int2's outer level, in scales (the levels are ±0.5 and ±1.5 scales)."""
SCALES = ("rms", "unbiased")
"""How int2 scales a delta-chain message's blocks (``CodecConfig.scale``)."""
BASES = ("chain", "shared")
"""What a compressed message is a delta on (see ``p2pfl.protocol.links``): ``chain``, the
sender's last acknowledged message; ``shared``, the closest vector both ends hold."""
TOPK_MIX = 2.5
"""``topk``'s default consensus step per kept fraction (``CodecConfig.consensus_step``)."""
BASE_KINDS = (
    "sender's message",
    "average on sender's",
    "receiver's message",
    "average on receiver's",
)
"""What a payload's ``base`` numbers (``Compressed.base_kind`` indexes this): a message of the
sender, the average the receiver returned on it, a message of the receiver (as the sender
decoded it), or the average the sender returned on that one."""


def max_scale(codec: str) -> float:
    """Largest scale a payload of ``codec`` may carry: any code it can hold decodes finite
    (int4 nibbles reach -8, int8 bytes -128)."""
    return MAX_DECODED / {"int8": 128, "int4": 8, "int2": INT2_TOP}.get(codec, 1)


@dataclass(frozen=True)
class CodecConfig:
    """A codec and its settings: ``block`` entries per scale of the block-scaled codecs (0:
    one scale for the whole vector), ``fraction`` of entries ``topk`` keeps and how their
    ``values`` travel (``fp16`` or ``int8`` with one scale per ``block`` kept values), and
    the ``base`` a message is a delta on (one of ``BASES``)."""

    name: str
    block: int = 256
    fraction: float = 0.01
    values: str = "fp16"
    base: str = "chain"
    mix: float | None = None
    """The consensus step of a fixed schedule's merge on lossy copies (None: the codec's
    default, ``consensus_step``)."""
    key: str | None = None
    """The codec of key frames (a link's first message, the vector itself; one of
    ``KEY_CODECS``); None: ``key_codec``'s default."""
    tol: float | None = None
    """``dynamic`` only: the largest error a reply may carry in the codec, in units of √Δ;
    one that would carry more travels in the key codec instead (None: no limit; see
    ``p2pfl.protocol.links``)."""
    scale: str = "rms"
    """int2 only, one of ``SCALES``: ``unbiased`` sends delta-chain messages (replies,
    pushes, key frames) at the unbiased scale (``compress``), so a message whose error the
    receiver cannot return (a ``dynamic`` member drops its reply's) is not shrunk toward its
    base; echoes keep the RMS scale, whose smaller error returns with the residual. ``rms``:
    every message at the RMS scale."""

    @property
    def key_codec(self) -> str:
        """How key frames travel: ``key`` if set, else int8 for the codecs coarser than int8
        (a whole model in int2 or sign loses about a third of its norm, and a dynamic member
        adopts the average on that copy of its reply), else the codec itself."""
        if self.key is not None:
            return self.key
        return "int8" if self.name in ("int4", "int2", "sign", "topk") else self.name

    @property
    def consensus_step(self) -> float:
        """How far a merge of lossy copies moves a model toward their merge (Choco-SGD's
        ``γ``; see ``NodeCore._merge``): ``mix`` if set, else 1 for the dense codecs and
        ``min(1, TOPK_MIX · fraction)`` for ``topk``. A copy delivers about ``fraction`` of
        what its sender moved per message, and a merge that moves further than its copies
        keep up with oscillates and grows (2 nodes' copies lag, each overshoots toward the
        other's stale copy): ``gossip:codec=topk,topk=0.1`` at ``γ = 1`` reached 0.17,
        at 0.25 0.93 (Dirichlet 0.1, 400 steps)."""
        if self.mix is not None:
            return self.mix
        return min(1.0, TOPK_MIX * self.fraction) if self.name == "topk" else 1.0

    @property
    def label(self) -> str:
        shared = "" if self.base == "chain" else f",base={self.base}"
        shared += "" if self.mix is None else f",mix={self.mix:g}"
        shared += "" if self.key is None else f",key={self.key}"
        shared += "" if self.tol is None else f",tol={self.tol:g}"
        shared += "" if self.scale == "rms" else f",scale={self.scale}"
        if self.name in BITS:
            return f"{self.name}:block={self.block}{shared}"
        if self.name == "topk":
            values = "" if self.values == "fp16" else ",values=int8"
            return f"topk={self.fraction:g}{values}{shared}"
        return self.name + shared


@dataclass
class Compressed:
    """A compressed flat vector of ``numel`` entries, plus the link header the protocol uses
    to agree on what it is a delta of (see ``p2pfl.protocol.links``).

    ``values``: float16 ``[numel]`` (fp16); int8 ``[numel]`` (int8); uint8 ``[ceil(numel/2)]``
    of two's-complement nibbles, low nibble first (int4); uint8 ``[ceil(numel/4)]`` of 2-bit
    codes ``0..3`` for the levels ``(code - 1.5) * scale``, lowest bits first (int2); uint8
    ``[ceil(numel/8)]`` of sign bits, 1 for negative, least significant bit first (sign); for
    topk the ``k`` kept values, float16 or int8, at strictly increasing int64 ``indices``. The
    block-scaled ones carry one float32 ``scales`` entry per ``block`` entries (``block`` 0:
    one in all)."""

    codec: str
    numel: int
    values: torch.Tensor
    scales: torch.Tensor | None = None
    block: int = 0
    indices: torch.Tensor | None = None
    seq: int = 0
    """This message's number on the sender->receiver link (0: not part of a delta chain)."""
    base: int = 0
    """The message (``seq``) this is a delta on; 0: none (a key frame, the vector itself)."""
    base_kind: int = 0
    """What ``base`` numbers: an index of ``BASE_KINDS`` (0: the sender's own message)."""
    echo: bool = False
    """``base`` numbers the receiver's own message to the sender, not the sender's."""
    ack: int = 0
    """The last message of the receiver->sender link the sender decoded."""
    resync: bool = False
    """The sender could not decode the receiver's last message: send a key frame next."""

    @property
    def quantized(self) -> int:
        """How many entries the scales cover (numel, or the kept entries of topk)."""
        return self.numel if self.indices is None else self.indices.numel()


def scale_count(numel: int, block: int) -> int:
    """Number of scales a block-scaled vector of ``numel`` entries carries."""
    if not numel:
        return 0
    return math.ceil(numel / block) if block else 1


def packed_count(codec: str, numel: int) -> int:
    """Bytes of ``values`` for a dense ``codec`` payload of ``numel`` entries."""
    return math.ceil(numel * {"fp16": 16, **BITS}[codec] / 8)


def compress(x: torch.Tensor, config: CodecConfig, unbiased: bool = False) -> Compressed:
    """Compress the float32 vector ``x`` (int2 with ``unbiased``: at the unbiased scale, see
    the module docstring; other codecs ignore it)."""
    import torch

    x = x.detach().to(torch.float32).reshape(-1)
    n = x.numel()
    if config.name == "fp16":
        return Compressed("fp16", n, x.clamp(-FP16_MAX, FP16_MAX).to(torch.float16))
    if config.name in BITS:
        values, scales = _quantize(x, config.name, config.block, unbiased)
        return Compressed(config.name, n, values, scales=scales, block=config.block)
    if config.name == "topk":
        k = min(n, max(1, math.ceil(config.fraction * n))) if n else 0
        idx = x.abs().topk(k, sorted=False).indices.sort().values
        if config.values == "int8":
            values, scales = _quantize(x[idx], "int8", config.block)
            return Compressed("topk", n, values, scales, config.block, indices=idx)
        return Compressed(
            "topk", n, x[idx].clamp(-FP16_MAX, FP16_MAX).to(torch.float16), indices=idx
        )
    raise ValueError(f"unknown codec {config.name!r}: choose one of {', '.join(CODECS)}")


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x`` zero-padded into rows of ``block`` entries (one row if ``block`` is 0)."""
    import torch

    n = x.numel()
    width = block or max(n, 1)
    return torch.nn.functional.pad(x, (0, (-n) % width)).view(-1, width)


def _quantize(
    x: torch.Tensor, codec: str, block: int, unbiased: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, scales)`` of a block-scaled codec (see ``Compressed``); int2 ``unbiased``:
    codes of the RMS scale, sent at the scale with ``x̂·x = ||x||²`` per block."""
    import numpy
    import torch

    n, rows = x.numel(), _blocks(x, block)
    if codec == "int2":
        sizes = _block_sizes(n, block, len(rows))
        scales = (rows.square().sum(1) / sizes).sqrt().nan_to_num(posinf=MAX_DECODED)
        scales = scales.clamp_max(max_scale(codec))
        codes = (rows / scales.clamp_min(1e-38).unsqueeze(1)).floor_().clamp_(-2, 1) + 2
        if unbiased:  # x̂ = s'·levels, s'·(levels·x) = ||x||²; levels·x > 0 unless x is 0
            along = (rows * (codes - INT2_TOP)).sum(1)  # the decoded levels
            fitted = (rows.square().sum(1) / along).nan_to_num(posinf=MAX_DECODED)
            scales = torch.where(along > 0, fitted, scales).clamp_max(max_scale(codec))
        codes = torch.nn.functional.pad(codes.reshape(-1)[:n], (0, (-n) % 4)).to(torch.uint8)
        quads = codes.view(-1, 4)
        packed = quads[:, 0] | quads[:, 1] << 2 | quads[:, 2] << 4 | quads[:, 3] << 6
        return packed, scales
    if codec == "sign":
        scales = rows.abs().sum(1) / _block_sizes(n, block, len(rows))
        bits = numpy.packbits((x < 0).numpy(), bitorder="little")
        return torch.from_numpy(bits), scales.clamp_max(max_scale(codec))
    levels = LEVELS[codec]
    scales = (rows.abs().amax(1) / levels).clamp_max(max_scale(codec))
    q = (rows / scales.clamp_min(1e-38).unsqueeze(1)).round_().clamp_(-levels, levels)
    q = q.reshape(-1)[:n].to(torch.int8)
    if codec == "int4":
        nibbles = torch.nn.functional.pad(q, (0, n % 2)).view(torch.uint8) & 0xF
        q = (nibbles[0::2] | (nibbles[1::2] << 4)).to(torch.uint8)
    return q, scales


def _block_sizes(n: int, block: int, count: int) -> torch.Tensor:
    """Entries per block (the last one may be short)."""
    import torch

    sizes = torch.full((count,), float(block or max(n, 1)))
    if count and block and n % block:
        sizes[-1] = n % block
    return sizes


def _dequantize(
    values: torch.Tensor, scales: torch.Tensor, codec: str, n: int, block: int
) -> torch.Tensor:
    import numpy
    import torch

    if codec == "sign":
        bits = numpy.unpackbits(values.numpy(), count=n, bitorder="little")
        codes = 1.0 - 2.0 * torch.from_numpy(bits.astype(numpy.float32))
    elif codec == "int2":
        quads = torch.stack([(values >> shift) & 3 for shift in (0, 2, 4, 6)], 1)
        codes = quads.reshape(-1)[:n].to(torch.float32) - INT2_TOP
    elif codec == "int4":
        low, high = values & 0xF, values >> 4
        nibbles = torch.stack((low, high), 1).reshape(-1)[:n].to(torch.int16)
        codes = (nibbles - 16 * (nibbles >= 8)).to(torch.float32)
    else:
        codes = values.to(torch.float32)
    return (_blocks(codes, block) * scales.unsqueeze(1)).reshape(-1)[:n].contiguous()


def decompress(c: Compressed) -> torch.Tensor:
    """The float32 vector a payload stands for (a new tensor)."""
    import torch

    if c.codec == "fp16":
        return c.values.to(torch.float32)
    if c.codec in BITS:
        assert c.scales is not None
        return _dequantize(c.values, c.scales, c.codec, c.numel, c.block)
    if c.codec == "topk":
        assert c.indices is not None
        out = torch.zeros(c.numel)
        if c.scales is None:
            out[c.indices] = c.values.to(torch.float32)
        else:
            out[c.indices] = _dequantize(c.values, c.scales, "int8", c.quantized, c.block)
        return out
    raise ValueError(f"unknown codec {c.codec!r}")


def encode_positions(indices: torch.Tensor) -> bytes:
    """Strictly increasing positions as LEB128 varints of their gaps minus one (the first
    one's gap is counted from -1): about one byte each while the gaps stay below 128."""
    import numpy

    gaps = numpy.diff(indices.numpy().astype(numpy.int64), prepend=-1) - 1
    if not len(gaps):
        return b""
    width = numpy.ones(len(gaps), numpy.int64)
    for shift in (7, 14, 21, 28, 35, 42, 49, 56):
        width += gaps >= (1 << shift)
    starts = numpy.cumsum(width) - width
    out = numpy.zeros(int(width.sum()), numpy.uint8)
    for j in range(int(width.max())):
        has = width > j
        chunk = (gaps[has] >> (7 * j)) & 0x7F
        more = (width[has] > j + 1).astype(numpy.uint8) << 7
        out[starts[has] + j] = chunk.astype(numpy.uint8) | more
    return out.tobytes()


def decode_positions(raw: bytes, numel: int) -> torch.Tensor:
    """Inverse of ``encode_positions``; ``ValueError`` naming the problem unless ``raw`` is
    a whole number of varints whose positions stay below ``numel`` (so at most ``numel``)."""
    import numpy
    import torch

    data = numpy.frombuffer(raw, numpy.uint8).astype(numpy.int64)
    if not len(data):
        return torch.zeros(0, dtype=torch.int64)
    if data[-1] & 0x80:
        raise ValueError("positions end inside a varint")
    ends = numpy.flatnonzero(data < 0x80)
    starts = numpy.concatenate(([0], ends[:-1] + 1))
    width = ends - starts + 1
    if int(width.max()) > 5:  # positions are < 2**32: at most 5 varint bytes
        raise ValueError("a position gap is longer than 5 varint bytes")
    if len(ends) > numel:
        raise ValueError(f"more positions ({len(ends)}) than entries ({numel})")
    gaps = numpy.zeros(len(ends), numpy.int64)
    for j in range(int(width.max())):
        has = width > j
        gaps[has] |= (data[starts[has] + j] & 0x7F) << (7 * j)
    positions = numpy.cumsum(gaps + 1) - 1
    if int(positions[-1]) >= numel:
        raise ValueError(f"positions must stay below {numel}")
    return torch.from_numpy(positions)
