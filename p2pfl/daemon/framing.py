"""One message per libp2p stream: a 4-byte big-endian length, the payload, and one
acknowledgement byte back once the receiver read all of it (a libp2p reset reads as a plain
EOF on the sender's side, hence the explicit byte). The helpers ``Transport`` uses on both
ends of a stream.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Awaitable, Callable

import trio
from libp2p.abc import INetStream
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.stream_muxer.yamux.yamux import MAX_WINDOW_SIZE, YamuxStream

log = logging.getLogger("p2pfl.transport")

HEADER = struct.Struct(">I")
ACK = b"\x06"
MAX_FRAME_BYTES = 2**32 - 1
"""Largest payload the 4-byte length prefix can describe."""
CLEANUP_TIMEOUT_S = 5.0


class FrameRefused(Exception):
    """An inbound frame broke a limit or the framing; the message is the logged reason."""


async def read_exactly(stream: INetStream, n: int) -> bytes:
    """Read exactly `n` bytes; fail with FrameRefused if the sender ends the stream early."""
    chunks: list[bytes] = []
    got = 0
    while got < n:
        try:
            chunk = await stream.read(n - got)
        except StreamEOF:
            chunk = b""
        if not chunk:
            raise FrameRefused(f"stream ended after {got} of {n} bytes")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def widen_receive_window(stream: INetStream, size: int) -> None:
    """Let the sender push the whole admitted frame (up to 16 MiB) without stalling.

    A fresh yamux stream starts with a 256 KiB window and py-libp2p's sender polls every
    10 ms while its window is empty, which caps a new stream at a few tens of MiB/s. Raising
    the auto-tune target makes the next read grant the window at once.
    """
    muxed = stream.muxed_stream
    if isinstance(muxed, YamuxStream):
        muxed.target_recv_window = max(muxed.target_recv_window, min(size, MAX_WINDOW_SIZE))


async def cleanup(close: Callable[[], Awaitable[None]]) -> None:
    """Close or reset a stream, shielded and bounded, ignoring errors of a dying stream."""
    with trio.move_on_after(CLEANUP_TIMEOUT_S, shield=True):
        try:
            await close()
        except Exception as exc:
            log.debug("stream cleanup failed: %s", why(exc))


def why(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
