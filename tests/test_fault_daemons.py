"""Faults of a real node process (slow): its home fills up or turns read-only while it
checkpoints, its newest checkpoint cannot be used, it restarts on another port.

A full disk and a read-only home are made for real, without touching the machine: the node
runs in a private mount namespace (``unshare -m``) whose home is a small tmpfs that the test
fills or remounts read-only from inside the namespace (``nsenter``); the mount goes away with
the process. Needs root (CI runs as root) and util-linux's unshare/nsenter; skipped otherwise.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kit import free_ports
from test_daemon_network import Daemon

from p2pfl.daemon.checkpoint import decode_checkpoint, encode_checkpoint
from p2pfl.daemon.config import CONFIG_FILE
from p2pfl.daemon.control import ControlError

CONFIG = (
    'listen = "/ip4/127.0.0.1/tcp/{port}"\nbootstrap = [{bootstrap}]\nprotocol = "none"\n'
    'steps = 0\nstep_interval = 0.02\ndashboard_port = "0"\n'
)
TMPFS = "4m"


def _unshare_problem() -> str | None:
    """Why a private mount namespace with a tmpfs cannot be made here (None if it can)."""
    if os.geteuid() != 0:
        return "needs root to mount a tmpfs in a private mount namespace (CI runs as root)"
    if not (shutil.which("unshare") and shutil.which("nsenter")):
        return "needs util-linux's unshare and nsenter"
    probe = subprocess.run(
        ["unshare", "-m", "--", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if probe.returncode != 0:
        return f"unshare -m cannot mount a tmpfs here: {probe.stderr.strip()}"
    return None


UNSHARE_PROBLEM = _unshare_problem()


class NamespacedDaemon(Daemon):
    """A ``Daemon`` whose home is a ``TMPFS`` tmpfs in its own mount namespace (its files
    are copied in at start). The test sees that home through ``/proc/PID/root`` and acts in
    it with ``inside``; the process is the node itself (unshare and sh exec it)."""

    def start(self) -> None:
        home = str(self.home)
        self.prefix = [
            "unshare",
            "-m",
            "--",
            "sh",
            "-c",
            'cp -a "$0" "$0.stage" && mount -t tmpfs -o size=' + TMPFS + ',mode=0700 tmpfs "$0"'
            ' && cp -a "$0.stage/." "$0/" && rm -rf "$0.stage" && exec "$@"',
            home,
        ]
        super().start()

    def path(self, name: str) -> Path:
        """``name`` in the home the node sees."""
        assert self.proc is not None
        return Path(f"/proc/{self.proc.pid}/root") / self.home.relative_to("/") / name

    def inside(self, script: str) -> subprocess.CompletedProcess[str]:
        """Run a shell ``script`` in the node's mount namespace."""
        assert self.proc is not None
        return subprocess.run(
            ["nsenter", "-t", str(self.proc.pid), "-m", "--", "sh", "-c", script],
            capture_output=True,
            text=True,
            timeout=60,
        )

    def do(self, script: str) -> None:
        """``inside``, which must succeed."""
        done = self.inside(script)
        assert done.returncode == 0, done.stderr

    def status(self) -> dict:
        ask = (
            "import json, pathlib, sys\nfrom p2pfl.daemon.control import request\n"
            f"print(json.dumps(request(pathlib.Path({str(self.home)!r}), 'status')))"
        )
        done = self.inside(f"{sys.executable} -c {shlex.quote(ask)}")
        if done.returncode != 0:  # e.g. no control socket yet
            raise ControlError(done.stderr.strip().splitlines()[-1])
        return json.loads(done.stdout)

    def log(self) -> str:
        try:
            return self.path("node.log").read_text(errors="replace")
        except OSError:
            return ""

    def checkpoint_step(self) -> int | None:
        try:
            data = self.path("ckpt").read_bytes()
        except OSError:
            return None
        return int(decode_checkpoint(data)["core"]["step"])

    def stop(self) -> None:
        """SIGTERM (the node writes a final checkpoint), SIGKILL after 30 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()


def wait_for(what, proc: subprocess.Popen, timeout: float, detail=lambda: ""):
    """Poll ``what()`` every 0.5 s until it returns something true, ``proc`` alive."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the node exited ({proc.returncode}): {detail()}"
        got = what()
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(f"not within {timeout} s: {detail()}")


def lines_with(text: str, needle: str) -> list[str]:
    return [line for line in text.splitlines() if needle in line]


@pytest.mark.slow
@pytest.mark.skipif(UNSHARE_PROBLEM is not None, reason=str(UNSHARE_PROBLEM))
@pytest.mark.parametrize("fault", ["disk full", "read-only home"])
def test_a_full_or_read_only_home_keeps_the_node_training_on_its_last_checkpoint(tmp_path, fault):
    """The node has a peer (so its address book changes and is saved too). Once its home
    fills up (no byte left, not even for its log) or turns read-only, each checkpoint fails:
    it says so on stderr, rate-limited, keeps the last good checkpoint and no temporary
    file, keeps training and retrying, and writes checkpoints again once the fault is gone."""
    ports = free_ports(2)
    peer = Daemon(tmp_path / "peer", 1, ports[1], "")
    (peer.home / CONFIG_FILE).write_text(CONFIG.format(port=ports[1], bootstrap=""))
    node = NamespacedDaemon(tmp_path / "node", 0, ports[0], "")
    (node.home / CONFIG_FILE).write_text(CONFIG.format(port=ports[0], bootstrap=f'"{peer.addr}"'))
    stderr = node.home / "stderr"  # outside the namespace: the test's view of the node's stderr
    try:
        peer.start()
        node.start()
        node.wait_status(lambda s: peer.peer_id in s["peers"], timeout=240)
        good = wait_for(node.checkpoint_step, node.proc, 120, node.log)
        if fault == "disk full":
            # fill the tmpfs, then the last page of the log (a bounded loop: under 4 KiB)
            node.do(
                f'cd "{node.home}" && {{ cat /dev/zero > filler; }} 2>/dev/null; '
                "for i in $(seq 64); do printf '%0127d\\n' 0 >> node.log || break; done "
                "2>/dev/null; test $i -lt 64"
            )
            reason = "No space left on device"
        else:  # a read-only bind of the home over itself; the open log file keeps going
            node.do(f'mount --bind "{node.home}" "{node.home}"')
            node.do(f'mount -o remount,bind,ro "{node.home}"')
            reason = "Read-only file system"

        def failures() -> list[str]:
            return lines_with(stderr.read_text(errors="replace"), "not written")

        # the first failure at once, its repeats counted in the next line (rate-limited)
        wait_for(lambda: len(failures()) >= 2, node.proc, 60, lambda: stderr.read_text())
        first, second = failures()[:2]
        assert reason in first and "stays" in first, first
        assert "more like this" in second, second
        kept = node.checkpoint_step()
        assert kept is not None and kept >= good and f"checkpoint of step {kept} stays" in first
        assert not [n for n in os.listdir(node.path("")) if n.endswith(".tmp")]
        during = node.status()
        assert during["checkpoint_failures"] >= 2 and during["step"] > kept
        assert peer.peer_id in during["peers"]
        assert "Traceback" not in stderr.read_text(errors="replace")
        # the fault goes away: the next checkpoint is written
        node.do(f'rm "{node.home}/filler"' if fault == "disk full" else f'umount "{node.home}"')
        wait_for(lambda: (node.checkpoint_step() or 0) > during["step"], node.proc, 60, node.log)
        if fault == "disk full":  # its log was full too: said once, counted at the next line
            assert len(lines_with(stderr.read_text(), "cannot write")) == 1
            peer.stop()  # "peer ... disconnected" is the next line
            counted = "of this log could not be written"
            wait_for(lambda: counted in node.log(), node.proc, 30, node.log)
    finally:
        node.stop()
        peer.stop()
    assert node.proc.returncode == 0, stderr.read_text()[-3000:]
    assert "Traceback" not in stderr.read_text(errors="replace")


@pytest.mark.slow
def test_a_node_back_on_another_port_from_its_previous_checkpoint_is_found_again(tmp_path):
    """A dials B (its bootstrap peer); B knows A only from its saved peer book. B stops, its
    newest checkpoint is made unusable (checksum fine, a key missing), and it comes back on
    port 0, so elsewhere: it resumes from the previous checkpoint, redials A from its book,
    and A takes it as a neighbour again and learns its new address (where A would redial)."""
    ports = free_ports(2)
    a, b = (Daemon(tmp_path / name, i, ports[i], "") for i, name in enumerate("ab"))
    (a.home / CONFIG_FILE).write_text(CONFIG.format(port=a.port, bootstrap=f'"{b.addr}"'))
    (b.home / CONFIG_FILE).write_text(CONFIG.format(port=b.port, bootstrap=""))
    try:
        a.start()
        b.start()
        b.wait_status(lambda s: a.peer_id in s["peers"] and s["checkpoint_step"] >= 200, 240)
        b.stop()
        assert b.proc is not None and b.proc.returncode == 0
        assert a.peer_id in json.loads((b.home / "peers.json").read_text())
        previous = decode_checkpoint((b.home / "ckpt.prev").read_bytes())["core"]["step"]
        state = decode_checkpoint((b.home / "ckpt").read_bytes())
        del state["model"]
        (b.home / "ckpt").write_bytes(encode_checkpoint(state))
        a.wait_status(lambda s: b.peer_id not in s["peers"], timeout=60)
        config = (b.home / CONFIG_FILE).read_text()
        (b.home / CONFIG_FILE).write_text(config.replace(f"/tcp/{b.port}", "/tcp/0"))
        b.start()
        back = a.wait_status(lambda s: b.peer_id in s["peers"], timeout=120)
        assert b.peer_id in back["neighbors"]
        moved = b.status()["listen_addrs"][0].split("/p2p/")[0]
        assert not moved.endswith(f"/tcp/{b.port}")
        log = b.log()
        assert "missing key 'model'" in log and "resumed from the previous checkpoint" in log
        assert f"resumed from checkpoint at step {previous}" in log
        assert (b.home / "ckpt.unusable").exists()
        # A heard B's new address from B itself (peer exchange) and keeps it, newest first
        book = a.home / "peers.json"  # not there until A first saves its peer book
        wait_for(
            lambda: book.exists() and moved in book.read_text(),
            a.proc,
            30,
            lambda: book.read_text() if book.exists() else "no peers.json yet",
        )
        assert json.loads((a.home / "peers.json").read_text())[b.peer_id]["addrs"][0] == moved
    finally:
        for d in (a, b):
            d.stop()
