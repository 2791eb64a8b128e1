"""Throughput of model-sized messages: the libp2p Transport against raw trio TCP.

Both sides use the same framing (4-byte big-endian length + payload, one acknowledgement byte
back once the receiver holds the whole payload) and the same payloads; the receiver runs in a
second process on 127.0.0.1. Prints the median MiB/s of each and the ratio raw/libp2p.

Run: .venv/bin/python sim/bench_transport.py   (about half a minute)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from p2pfl.daemon.limits import Limits
from p2pfl.daemon.transport import Transport

PROTOCOL = "/p2pfl/bench/1"
SIZES_MIB = (1, 10, 50)
REPEATS = {1: 15, 10: 7, 50: 5}
ACK = b"\x06"
RECEIVE_CHUNK = 2**20
STARTUP_TIMEOUT_S = 30.0
TRANSFER_TIMEOUT_S = 60.0
RECEIVER_LIMITS = Limits(max_frame_bytes=64 * 2**20, messages_per_s=1000.0, burst=1000)

Send = Callable[[bytes], Awaitable[None]]


# ---------------------------------------------------------------- receivers (child process)


async def serve_libp2p() -> None:
    """Receiver: a Transport that drops every payload (the ack is sent by the transport)."""

    async def drop(peer: str, payload: bytes) -> None:
        return None

    async with Transport(create_new_key_pair(), limits=RECEIVER_LIMITS) as transport:
        transport.set_handler(PROTOCOL, drop)
        print(transport.listen_addrs[0], flush=True)
        await trio.sleep_forever()


async def receive_exactly(stream: trio.SocketStream, n: int) -> bytes | None:
    """Read exactly `n` bytes, or return None if the peer closes first."""
    chunks = []
    got = 0
    while got < n:
        chunk = await stream.receive_some(min(n - got, RECEIVE_CHUNK))
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


async def serve_tcp() -> None:
    """Receiver: raw TCP, same framing, whole payload read into memory, then one ack byte."""

    async def handle(stream: trio.SocketStream) -> None:
        while (header := await receive_exactly(stream, 4)) is not None:
            if await receive_exactly(stream, int.from_bytes(header, "big")) is None:
                return
            await stream.send_all(ACK)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    print(listeners[0].socket.getsockname()[1], flush=True)
    await trio.serve_listeners(handle, listeners)


# ------------------------------------------------------------------ senders (this process)


def spawn_receiver(kind: str) -> tuple[subprocess.Popen[str], str]:
    """Start `kind` receiver in a child process; return it and the address it printed."""
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", kind],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    line = ""
    while not line and time.monotonic() < deadline and proc.poll() is None:
        line = proc.stdout.readline().strip()
    if not line:
        proc.kill()
        raise RuntimeError(f"{kind} receiver did not start (exit code {proc.poll()})")
    return proc, line


async def measure(send: Send, payloads: dict[int, bytes]) -> dict[int, float]:
    """Median MiB/s per payload size (one warm-up send per size, not counted)."""
    speeds: dict[int, float] = {}
    for mib, payload in payloads.items():
        await send(payload)
        times = []
        for _ in range(REPEATS[mib]):
            start = time.perf_counter()
            with trio.fail_after(TRANSFER_TIMEOUT_S):
                await send(payload)
            times.append(time.perf_counter() - start)
        speeds[mib] = mib / statistics.median(times)
    return speeds


async def bench_libp2p(addr: str, payloads: dict[int, bytes]) -> dict[int, float]:
    async with Transport(create_new_key_pair()) as transport:
        peer = await transport.connect(addr)

        async def send(payload: bytes) -> None:
            await transport.send(peer, PROTOCOL, payload)

        return await measure(send, payloads)


async def bench_tcp(port: int, payloads: dict[int, bytes]) -> dict[int, float]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:

        async def send(payload: bytes) -> None:
            await stream.send_all(len(payload).to_bytes(4, "big"))
            await stream.send_all(payload)
            if await stream.receive_some(1) != ACK:
                raise RuntimeError("raw TCP receiver did not acknowledge")

        return await measure(send, payloads)


def run_against(kind: str, payloads: dict[int, bytes]) -> dict[int, float]:
    """Spawn a receiver of `kind`, benchmark against it, and always kill it by its PID."""
    proc, addr = spawn_receiver(kind)
    try:
        if kind == "libp2p":
            return trio.run(bench_libp2p, addr, payloads)
        return trio.run(bench_tcp, int(addr), payloads)
    finally:
        proc.kill()
        proc.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", choices=["libp2p", "tcp"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        trio.run(serve_libp2p if args.serve == "libp2p" else serve_tcp)
        return

    payloads = {mib: os.urandom(mib * 2**20) for mib in SIZES_MIB}
    libp2p = run_against("libp2p", payloads)
    tcp = run_against("tcp", payloads)
    print("transport throughput, 127.0.0.1, two processes, median MiB/s")
    print(f"{'size':>8} | {'libp2p':>10} | {'raw TCP':>10} | {'raw/libp2p':>10}")
    print(f"{'-' * 8}-+-{'-' * 10}-+-{'-' * 10}-+-{'-' * 10}")
    for mib in SIZES_MIB:
        print(
            f"{mib:>4} MiB | {libp2p[mib]:>10.0f} | {tcp[mib]:>10.0f} | "
            f"{tcp[mib] / libp2p[mib]:>10.1f}"
        )


if __name__ == "__main__":
    main()
