"""Node daemons as real processes on 127.0.0.1: they train and sync, survive `kill -9` of a
peer and resume from checkpoints, and refuse bad peers while they keep serving."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import trio
from kit import free_ports
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.transport.tcp.tcp import TCP
from multiaddr import Multiaddr

from p2pfl.daemon.config import CONFIG_FILE, KEY_FILE, load_config
from p2pfl.daemon.control import ControlError, request
from p2pfl.daemon.identity import load_or_create_identity
from p2pfl.daemon.node import build_learning
from p2pfl.daemon.sync import SYNC_PROTOCOL, WHOLE_MODEL, sync_frame
from p2pfl.daemon.transport import Transport, TransportError
from p2pfl.learning.params import ParamSchema
from p2pfl.models import build_model
from p2pfl.wire.codec import encode, max_message_bytes
from p2pfl.wire.messages import Push

REPO = Path(__file__).resolve().parent.parent
NODES = 3
STEPS = 600
DATA = "digits:part={i}/{n},alpha=0.1,seed=1"
FLOOD = 400
FLOOD_RETRIES = 50
"""Malformed frames one peer floods a node with."""


class Daemon:
    """One `p2pfl node start` process with its home directory."""

    def __init__(self, home: Path, index: int, port: int, config: str) -> None:
        self.home, self.index, self.port = home, index, port
        home.mkdir(exist_ok=True)
        key = load_or_create_identity(home / KEY_FILE)
        self.peer_id = str(ID.from_pubkey(key.public_key))
        self.addr = f"/ip4/127.0.0.1/tcp/{port}/p2p/{self.peer_id}"
        (home / CONFIG_FILE).write_text(config)
        self.proc: subprocess.Popen[bytes] | None = None
        self.prefix: list[str] = []
        """Command the node runs under, e.g. ``ip netns exec NAME`` (it execs: same PID)."""

    def start(self) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        with open(self.home / "stdout", "ab") as out, open(self.home / "stderr", "ab") as err:
            self.proc = subprocess.Popen(
                [
                    *self.prefix,
                    sys.executable,
                    "-m",
                    "p2pfl",
                    "node",
                    "start",
                    "--home",
                    str(self.home),
                ],
                cwd=REPO,
                stdout=out,
                stderr=err,
                env=env,
            )

    def status(self) -> dict:
        return request(self.home, "status")

    def wait_status(self, condition, timeout: float = 60.0) -> dict:
        """Poll status every 0.25 s until `condition(status)`; fail after `timeout` s."""
        deadline = time.monotonic() + timeout
        last: dict | str = "no answer"
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.log()[-2000:]
            try:
                last = self.status()
                if condition(last):
                    return last
            except ControlError as exc:
                last = str(exc)
            time.sleep(0.25)
        raise AssertionError(f"node {self.index}: condition not met; last status {last}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        """Graceful stop over the control socket, then make sure the process is gone."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            request(self.home, "stop")
            self.proc.wait(timeout=20)
        except (ControlError, subprocess.TimeoutExpired):
            self.kill()

    def log(self) -> str:
        path = self.home / "node.log"
        return path.read_text() if path.exists() else ""


def make_network(tmp_path: Path, n: int, steps: int, protocol: str = "dynamic") -> list[Daemon]:
    ports = free_ports(n)
    daemons = [Daemon(tmp_path / f"n{i}", i, ports[i], "") for i in range(n)]
    for d in daemons:
        peers = [o.addr for o in daemons if o is not d]
        (d.home / CONFIG_FILE).write_text(
            f'listen = "/ip4/127.0.0.1/tcp/{d.port}"\nbootstrap = {peers!r}\n'.replace("'", '"')
            + f'data = "{DATA.format(i=d.index, n=n)}"\n'
            f'protocol = "{protocol}"\nsteps = {steps}\nbatch_size = 16\nlr = 0.1\nseed = 1\n'
            "step_interval = 0.01\n"
        )
    return daemons


def alone_accuracy(daemon: Daemon, steps: int) -> float:
    """The same node (same data, init, sampling seed) trained alone for `steps` steps."""
    config = load_config(daemon.home)
    learning = build_learning(config, daemon.peer_id)
    nodes = torch.tensor([0])
    for _ in range(steps):
        learning.learner.step(nodes)
    accuracy, _ = learning.learner.evaluate(learning.dataset.x_test, learning.dataset.y_test)
    return float(accuracy[0])


@pytest.mark.slow
def test_daemons_sync_beat_training_alone_and_resume_after_kill_9(tmp_path):
    daemons = make_network(tmp_path, NODES, STEPS)
    victim = daemons[-1]
    try:
        for d in daemons:
            d.start()
        for d in daemons:
            d.wait_status(lambda s: len(s["peers"]) == NODES - 1, timeout=120)
        assert (victim.home / "stdout").read_text().strip() == victim.addr

        # kill -9 one node after its first checkpoint; the others keep going
        before = victim.wait_status(lambda s: s["checkpoint_step"] >= 100)
        victim.kill()
        survivors = daemons[:-1]
        steps_then = [d.status()["step"] for d in survivors]
        for d, then in zip(survivors, steps_then, strict=True):
            d.wait_status(lambda s, then=then: s["step"] > then + 50, timeout=30)
        victim.start()
        resumed = victim.wait_status(lambda s: s["step"] > 0, timeout=120)
        assert resumed["step"] >= before["checkpoint_step"] >= 100
        assert f"resumed from checkpoint at step {before['checkpoint_step']}" in victim.log()

        for d in daemons:
            d.wait_status(lambda s: s["done"], timeout=90)
        time.sleep(1.0)  # let sessions in flight settle
        finals = [d.status() for d in daemons]
    finally:
        for d in daemons:
            d.stop()
    alone = [alone_accuracy(d, STEPS) for d in daemons]
    for d, final, acc in zip(daemons, finals, alone, strict=True):
        print(
            f"node {d.index}: together {final['test_accuracy']:.3f}, alone {acc:.3f}, "
            f"syncs {final['syncs']}, sent {final['bytes_sent']} B, core {final['core_stats']}"
        )
    for final in finals:
        assert final["syncs"] > 0 and final["bytes_sent"] > 0 and final["bytes_received"] > 0
    # the network beats training alone; the data-rich node (670 of ~1,150 samples, α=0.1)
    # may not: one fresh-clone run measured it 0.618 together vs 0.624 alone (others
    # 0.596 vs 0.198 and 0.604 vs 0.485)
    together = sum(final["test_accuracy"] for final in finals) / len(finals)
    assert together > sum(alone) / len(alone) + 0.05
    assert all(not (d.home / "control.sock").exists() for d in daemons)
    assert "stopping at step" in daemons[0].log()


async def _send_bad_frames(target: Daemon, caplog_marks: list[str]) -> None:
    schema = ParamSchema.from_module(build_model("mlp", (1, 8, 8), 10, 0))
    other = ParamSchema.from_module(build_model("logistic", (1, 8, 8), 10, 0))
    nan = torch.zeros(schema.numel)
    nan[3] = float("nan")
    messages = {
        "malformed msgpack": b"\xc1garbage",
        "schema hash mismatch": encode(Push(-1, torch.zeros(other.numel), 5), other),
        "NaN/inf": encode(Push(-1, nan, 5), schema),
        "exceeds the limit": b"\x00" * (max_message_bytes(schema) + 1),
    }
    frames = {reason: sync_frame(WHOLE_MODEL, m) for reason, m in messages.items()}
    async with Transport(create_new_key_pair()) as evil:
        peer = await evil.connect(target.addr)
        for reason, frame in frames.items():
            try:
                await evil.send(peer, SYNC_PROTOCOL, frame)
            except TransportError:
                assert reason == "exceeds the limit"
            caplog_marks.append(reason)


async def _flood(target: Daemon, frames: int) -> str:
    """Send ``frames`` malformed sync frames from one new peer as fast as the node takes
    them (a frame the node turns away unread, over its per-peer rate, is sent again after a
    pause); that peer's id."""
    frame = sync_frame(WHOLE_MODEL, b"\xc1garbage")
    async with Transport(create_new_key_pair()) as evil:
        peer = await evil.connect(target.addr)
        with trio.fail_after(180):
            for _ in range(frames):
                for attempt in range(FLOOD_RETRIES):
                    try:
                        await evil.send(peer, SYNC_PROTOCOL, frame)
                        break
                    except TransportError:
                        if attempt == FLOOD_RETRIES - 1:
                            raise
                        await trio.sleep(0.1)
        return evil.peer_id


async def _plaintext_dial(target: Daemon) -> bool:
    key_pair = create_new_key_pair()
    host = new_host(
        key_pair=key_pair,
        sec_opt={PLAINTEXT_PROTOCOL_ID: InsecureTransport(key_pair)},
        muxer_opt={YAMUX_PROTOCOL_ID: Yamux},
        transports=[TCP()],
    )
    async with host.run(listen_addrs=[Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        try:
            await host.connect(info_from_p2p_addr(Multiaddr(target.addr)))
            peer = ID.from_base58(target.peer_id)
            stream = await host.new_stream(peer, [TProtocol(SYNC_PROTOCOL)])
            await stream.write(b"\x00\x00\x00\x02hi")
            return True
        except Exception:
            return False
        finally:
            with trio.CancelScope(shield=True):
                await host.close()


@pytest.mark.slow
def test_bad_peers_are_refused_and_the_node_keeps_serving(tmp_path):
    (node,) = make_network(tmp_path, 1, 0)
    (metrics_port,) = free_ports(1)
    with open(node.home / CONFIG_FILE, "a") as config:
        config.write(f"metrics_port = {metrics_port}\n")
    try:
        node.start()
        first = node.wait_status(lambda s: s["step"] > 0, timeout=120)
        sent: list[str] = []

        async def attack() -> bool:
            with trio.fail_after(30):
                await _send_bad_frames(node, sent)
                return await _plaintext_dial(node)

        assert trio.run(attack) is False
        assert len(sent) == 4
        after = node.wait_status(lambda s: s["step"] > first["step"] + 20, timeout=20)
        assert after["rejected"] == 3
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/", timeout=5) as page:
            metrics = page.read().decode()
        assert "p2pfl_rejected_total 3.0" in metrics and "p2pfl_step_total" in metrics
        log = node.log()
        # Refusals from one peer are rate-limited: the first is logged with its reason, the
        # repeats within 10 s are counted (rejected == 3 above), not logged one by one.
        assert "refused sync frame from peer" in log and sent[0] in log, sent[0]
        assert sum(reason in log for reason in sent) < len(sent)
        # a flood: each frame refused and counted, the log says so every 10 s at most
        started = time.monotonic()
        flooder = trio.run(_flood, node, FLOOD)
        node.wait_status(lambda s: s["rejected"] == 3 + FLOOD, timeout=60)
        seconds = time.monotonic() - started
        lines = [x for x in node.log().splitlines() if flooder in x and "refused" in x]
        print(f"flood of {FLOOD} frames in {seconds:.1f} s: {len(lines)} refusal lines")
        assert lines, "the flood was not logged"
        # each kind of refusal (a malformed frame; a frame over the per-peer rate, turned
        # away unread) is logged once per 10 s at most, its repeats counted
        for kind in ("refused sync frame", "refused message"):
            of_kind = [x for x in lines if kind in x]
            assert len(of_kind) <= 2 + seconds / 10, of_kind
            assert len(of_kind) <= 1 or "more like this in the last" in of_kind[-1], of_kind
    finally:
        node.stop()
    assert node.proc is not None and node.proc.returncode == 0


@pytest.mark.slow
def test_peer_exchange_repairs_the_network_when_the_bootstrap_node_is_gone(tmp_path):
    """B and C only know A. Peer exchange connects B and C; A is killed; they keep syncing.
    B restarts with A (dead) as its only bootstrap peer and finds C again from its saved book."""
    a, b, c = make_network(tmp_path, 3, 0, protocol="dynamic")
    for d in (a, b, c):
        lines = (d.home / CONFIG_FILE).read_text().splitlines()
        only_a = [] if d is a else [a.addr]
        lines = [f"bootstrap = {json.dumps(only_a)}" if x.startswith("bootstrap") else x
                 for x in lines]  # fmt: skip
        (d.home / CONFIG_FILE).write_text("\n".join(lines) + "\n")
    try:
        for d in (a, b, c):
            d.start()
        b.wait_status(lambda s: c.peer_id in s["peers"], timeout=240)
        a.kill()
        syncs = b.wait_status(lambda s: a.peer_id not in s["peers"], timeout=60)["syncs"]
        b.wait_status(lambda s, n=syncs: s["syncs"] > n and s["peers"] == [c.peer_id], timeout=120)
        b.stop()
        book = json.loads((b.home / "peers.json").read_text())
        assert {a.peer_id, c.peer_id} <= set(book)
        b.start()
        b.wait_status(lambda s: s["peers"] == [c.peer_id], timeout=240)
        assert f"heard of peer {c.peer_id} at" in b.log()
    finally:
        for d in (a, b, c):
            d.stop()
