"""Lossy codecs for flat parameter vectors: ``fp16``, ``int8`` (one scale per block of
entries or per tensor) and ``topk`` (the largest ``fraction`` of entries by magnitude).

``compress`` turns a float32 vector into a ``Compressed`` payload and ``decompress`` turns it
back; the wire (``p2pfl.wire.codec``) carries payloads, the protocol (``p2pfl.protocol.links``)
decides what to compress (deltas against what the peer already holds) and keeps what a lossy
encoding left out (error feedback). Stated error of one round trip of ``x``:

* ``fp16``: each entry within ``2**-11 * |x_i|`` (round to nearest; ``|x_i| <= 65504``);
* ``int8``: each entry within ``scale / 2`` of its block, ``scale = max|x_block| / 127``
  (blocks of ``block`` entries; ``block=0``: one scale for the whole vector);
* ``topk``: the kept entries within fp16 rounding, the others 0 (so the error is exactly
  the dropped entries: ``||x - x̂||² <= (1 - fraction) ||x||²``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

# torch is imported where tensors are touched: protocol specs (community manifests, the CLI)
# name codecs without paying for its import.
if TYPE_CHECKING:
    import torch

CODECS = ("fp16", "int8", "topk")
FP16_MAX = 65504.0
INT8_LEVELS = 127
MAX_SCALE = 3.0e38 / INT8_LEVELS
"""Largest int8 scale whose decoded values stay finite in float32."""


@dataclass(frozen=True)
class CodecConfig:
    """A codec and its settings: ``block`` entries per int8 scale (0: one scale for the whole
    vector), ``fraction`` of entries ``topk`` keeps."""

    name: str
    block: int = 256
    fraction: float = 0.01

    @property
    def label(self) -> str:
        if self.name == "int8":
            return f"int8:block={self.block}"
        if self.name == "topk":
            return f"topk={self.fraction:g}"
        return self.name


@dataclass
class Compressed:
    """A compressed flat vector of ``numel`` entries, plus the link header the protocol uses
    to agree on what it is a delta of (see ``p2pfl.protocol.links``).

    ``values`` is float16 ``[numel]`` (fp16), int8 ``[numel]`` (int8, with one float32 scale
    per ``block`` entries, or one in all when ``block`` is 0) or float16 ``[k]`` (topk, with
    strictly increasing int64 ``indices``)."""

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
    echo: bool = False
    """``base`` numbers the receiver's own message to the sender, not the sender's."""
    ack: int = 0
    """The last message of the receiver->sender link the sender decoded."""
    resync: bool = False
    """The sender could not decode the receiver's last message: send a key frame next."""


def scale_count(numel: int, block: int) -> int:
    """Number of int8 scales a vector of ``numel`` entries carries."""
    if not numel:
        return 0
    return math.ceil(numel / block) if block else 1


def compress(x: torch.Tensor, config: CodecConfig) -> Compressed:
    """Compress the float32 vector ``x``."""
    import torch

    x = x.detach().to(torch.float32).reshape(-1)
    n = x.numel()
    if config.name == "fp16":
        return Compressed("fp16", n, x.clamp(-FP16_MAX, FP16_MAX).to(torch.float16))
    if config.name == "int8":
        return _int8(x, config.block)
    if config.name == "topk":
        k = min(n, max(1, math.ceil(config.fraction * n))) if n else 0
        idx = x.abs().topk(k, sorted=False).indices.sort().values
        return Compressed(
            "topk", n, x[idx].clamp(-FP16_MAX, FP16_MAX).to(torch.float16), indices=idx
        )
    raise ValueError(f"unknown codec {config.name!r}: choose one of {', '.join(CODECS)}")


def _int8(x: torch.Tensor, block: int) -> Compressed:
    import torch

    n = x.numel()
    width = block or max(n, 1)
    rows = torch.nn.functional.pad(x, (0, (-n) % width)).view(-1, width)
    scales = (rows.abs().amax(1) / INT8_LEVELS).clamp_max(MAX_SCALE)
    q = (rows / scales.clamp_min(1e-38).unsqueeze(1)).round_().clamp_(-127, 127)
    return Compressed("int8", n, q.reshape(-1)[:n].to(torch.int8), scales=scales, block=block)


def decompress(c: Compressed) -> torch.Tensor:
    """The float32 vector a payload stands for (a new tensor)."""
    import torch

    if c.codec == "fp16":
        return c.values.to(torch.float32)
    if c.codec == "int8":
        assert c.scales is not None
        n, width = c.numel, c.block or max(c.numel, 1)
        rows = torch.nn.functional.pad(c.values.to(torch.float32), (0, (-n) % width))
        return (rows.view(-1, width) * c.scales.unsqueeze(1)).reshape(-1)[:n].contiguous()
    if c.codec == "topk":
        assert c.indices is not None
        out = torch.zeros(c.numel)
        out[c.indices] = c.values.to(torch.float32)
        return out
    raise ValueError(f"unknown codec {c.codec!r}")


def index_itemsize(numel: int) -> int:
    """Bytes per topk index on the wire: uint16 when every position fits, else uint32."""
    return 2 if numel <= 2**16 else 4
