"""Faults a node must survive or explain: failed checkpoint writes, unusable checkpoints,
a port in use, a read-only home, bad data and bad model factories, floods of refusals."""

from __future__ import annotations

import base64
import errno
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from p2pfl.daemon.checkpoint import (
    CheckpointError,
    decode_checkpoint,
    encode_checkpoint,
    load_newest,
    restore_newest,
    write_atomically,
)
from p2pfl.daemon.transport import check_can_listen
from p2pfl.data import DataError
from p2pfl.data.datasets import load_npz
from p2pfl.files import writable_problem
from p2pfl.models import build_model
from p2pfl.ratelog import RateLimitedLog
from p2pfl.spec import SpecError


# -- checkpoints --
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_failed_write_keeps_both_checkpoints_and_leaves_no_temp_file(tmp_path, monkeypatch, code):
    write_atomically(tmp_path, encode_checkpoint({"step": 1}))
    write_atomically(tmp_path, encode_checkpoint({"step": 2}))
    real_fsync = os.fsync

    def full(fd):  # the data is written, but the disk is full when it is flushed
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).endswith(".tmp"):
            raise OSError(code, os.strerror(code))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        write_atomically(tmp_path, encode_checkpoint({"step": 3}))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "ckpt.prev"]
    assert load_newest(tmp_path)["step"] == 2
    assert decode_checkpoint((tmp_path / "ckpt.prev").read_bytes())["step"] == 1


def test_a_verified_but_unusable_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
    caplog.set_level(logging.ERROR, logger="p2pfl.daemon")
    write_atomically(tmp_path, encode_checkpoint({"step": 1, "model": torch.ones(2)}))
    write_atomically(tmp_path, encode_checkpoint({"step": 2}))  # valid checksum, no "model"
    applied = restore_newest(tmp_path, lambda state: (state["step"], state["model"]))
    assert applied is not None and applied[0] == 1
    assert "missing key 'model'" in caplog.text
    assert (tmp_path / "ckpt.unusable").exists()
    write_atomically(tmp_path, encode_checkpoint({"step": 3, "model": torch.zeros(2)}))
    # the good copy was not rotated away by the unusable one
    assert decode_checkpoint((tmp_path / "ckpt.prev").read_bytes())["step"] == 1


def test_no_applicable_checkpoint_is_a_clear_error(tmp_path):
    write_atomically(tmp_path, encode_checkpoint({"step": 2}))
    with pytest.raises(CheckpointError, match="missing key 'model'.*start again"):
        restore_newest(tmp_path, lambda state: state["model"])


# -- start-up --
def test_a_port_in_use_is_detected_before_the_node_starts():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(OSError) as info:
            check_can_listen(f"/ip4/127.0.0.1/tcp/{port}")
        assert info.value.errno == errno.EADDRINUSE
    check_can_listen(f"/ip4/127.0.0.1/tcp/{port}")  # free again
    check_can_listen("/ip4/127.0.0.1/tcp/0")


def test_a_read_only_home_is_named(tmp_path, monkeypatch):
    assert writable_problem(tmp_path) is None
    assert os.listdir(tmp_path) == []  # the probe leaves nothing behind

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr("tempfile.mkstemp", read_only)
    assert writable_problem(tmp_path) == os.strerror(errno.EROFS)


# -- data and models --
def test_a_huge_label_is_a_data_error_not_an_allocation(tmp_path):
    path = tmp_path / "huge.npz"
    y = np.array([0, 1] * 10)
    y[3] = 1_000_000_000
    np.savez(path, x=np.random.default_rng(0).normal(size=(20, 4)), y=y)
    with pytest.raises(DataError, match="label 1000000000.*map your labels to 0..C-1"):
        load_npz(path, 0)


FACTORIES = """
import torch

def raises(input_shape, num_classes):
    raise RuntimeError("no GPU here")

def wrong_signature(shape):
    return torch.nn.Linear(4, 2)

def wrong_output(input_shape, num_classes):
    return torch.nn.Linear(input_shape[0], num_classes + 3)

def wrong_input(input_shape, num_classes):
    return torch.nn.Linear(input_shape[0] + 1, num_classes)

def fine(input_shape, num_classes):
    return torch.nn.Linear(input_shape[0], num_classes)
"""


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("usermodels:raises", "raised RuntimeError: no GPU here; fix the factory"),
        ("usermodels:wrong_signature", "must accept the keyword arguments input_shape"),
        ("usermodels:wrong_output", r"returned \(2, 5\) for 2 samples.*\[batch, 2\] logits"),
        ("usermodels:wrong_input", "fails on input of shape \\[2, 4\\]"),
        ("brokenmodels:fine", "importing module 'brokenmodels' failed \\(ZeroDivisionError"),
        ("nosuchmodule_xyz:fine", "cannot import module"),
    ],
)
def test_bad_model_factories_are_spec_errors(tmp_path, monkeypatch, spec, message):
    (tmp_path / "usermodels.py").write_text(textwrap.dedent(FACTORIES))
    (tmp_path / "brokenmodels.py").write_text("x = 1 / 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("usermodels", "brokenmodels"):
        sys.modules.pop(name, None)
    with pytest.raises(SpecError, match=message):
        build_model(spec, (4,), 2, 0)
    assert isinstance(build_model("usermodels:fine", (4,), 2, 0), torch.nn.Linear)


# -- logging repeated refusals --
def test_repeated_refusals_are_logged_once_with_a_count(caplog):
    caplog.set_level(logging.WARNING, logger="p2pfl.test")
    now = [0.0]
    log = RateLimitedLog(logging.getLogger("p2pfl.test"), every=10.0, clock=lambda: now[0])
    for _ in range(2000):
        log.warning(("frame", "peer-a"), "refused message from %s", "peer-a")
        now[0] += 0.001
    log.warning(("frame", "peer-b"), "refused message from %s", "peer-b")  # another kind
    now[0] = 30.0
    log.warning(("frame", "peer-a"), "refused message from %s", "peer-a")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "refused message from peer-a",
        "refused message from peer-b",
        "refused message from peer-a (1999 more like this in the last 30 s)",
    ]


@pytest.mark.slow
def test_node_start_on_a_port_in_use_exits_2_with_the_fix(tmp_path):
    home = tmp_path / "node"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = [sys.executable, "-m", "p2pfl", "node"]
    subprocess.run([*run, "init", "--home", str(home)], check=True, env=env, timeout=120)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        listen = f"/ip4/127.0.0.1/tcp/{port}"
        args = [*run, "start", "--home", str(home), "--listen", listen, "--steps", "1"]
        result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "cannot listen on" in result.stderr and "port 0" in result.stderr
    assert "Traceback" not in result.stderr


# -- a real full disk and a real read-only home, in a private mount namespace --
def _can_mount_privately() -> bool:
    if os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("nsenter")):
        return False
    probe = subprocess.run(
        ["unshare", "-m", "--", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
        capture_output=True,
        timeout=30,
    )
    return probe.returncode == 0


class NamespacedNode:
    """A ``p2pfl node start`` whose home is a small tmpfs in its own mount namespace (so the
    test can fill it or make it read-only for real); the test looks inside with nsenter."""

    def __init__(self, tmp_path, tmpfs_size: str = "4m") -> None:
        self.home = tmp_path / "home"
        stage = tmp_path / "stage"
        stage.mkdir()
        self.home.mkdir()
        (stage / "config.toml").write_text(
            'listen = "/ip4/127.0.0.1/tcp/0"\nprotocol = "none"\nsteps = 0\n'
            'step_interval = 0.02\ndashboard_port = "off"\n'
        )
        script = (
            f'mount -t tmpfs -o size={tmpfs_size},mode=0700 tmpfs "{self.home}" && '
            f'cp -a "{stage}/." "{self.home}/" && '
            f'exec "{sys.executable}" -m p2pfl node start --home "{self.home}"'
        )
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.stderr_path = tmp_path / "stderr"
        self.stderr = open(self.stderr_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            ["unshare", "-m", "--", "sh", "-c", script], stderr=self.stderr, env=env
        )

    def inside(self, script: str, check: bool = True) -> str:
        """Run a shell ``script`` in the node's mount namespace; its stdout."""
        done = subprocess.run(
            ["nsenter", "-t", str(self.proc.pid), "-m", "--", "sh", "-c", script],
            capture_output=True,
            timeout=60,
        )
        if check:
            assert done.returncode == 0, done.stderr.decode()
        return done.stdout.decode(errors="replace")

    def wait_for(self, what, timeout: float = 120.0):
        """Poll ``what()`` every 0.5 s until it returns something true, node alive."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.stderr_path.read_text()[-3000:]
            got = what()
            if got:
                return got
            time.sleep(0.5)
        raise AssertionError(f"timed out; log:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.inside(f'cat "{self.home}/node.log" 2>/dev/null || true')

    def checkpoint_step(self) -> int | None:
        raw = self.inside(f'base64 "{self.home}/ckpt" 2>/dev/null || true')
        if not raw.strip():
            return None
            return int(decode_checkpoint(base64.b64decode(raw))["core"]["step"])

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.stderr.close()
        return self.proc.returncode


@pytest.mark.slow
@pytest.mark.skipif(not _can_mount_privately(), reason="needs root, unshare -m and nsenter")
@pytest.mark.parametrize("fault", ["disk full", "read-only home"])
def test_a_full_or_read_only_home_keeps_the_node_training_on_its_last_checkpoint(tmp_path, fault):
    node = NamespacedNode(tmp_path)
    try:
        good = node.wait_for(lambda: node.checkpoint_step(), timeout=600)  # a slow start
        size = int(node.inside(f'stat -c %s "{node.home}/ckpt"'))
        if fault == "disk full":
            # fill the tmpfs, then free half a checkpoint: log lines fit, a checkpoint not
            node.inside(f'cat /dev/zero > "{node.home}/filler" 2>/dev/null', check=False)
            node.inside(f'truncate -s -{size // 2} "{node.home}/filler"')
            reason = "No space left on device"
        else:  # a read-only bind of the home over itself (the log's open file keeps going)
            node.inside(f'mount --bind "{node.home}" "{node.home}"')
            node.inside(f'mount -o remount,bind,ro "{node.home}"')
            reason = "Read-only file system"
        line = node.wait_for(
            lambda: next((x for x in node.log().splitlines() if "not written" in x), None)
        )
        assert reason in line and "stays" in line, line
        kept = node.checkpoint_step()
        assert kept is not None and kept >= good and f"checkpoint of step {kept} stays" in line
        assert ".tmp" not in node.inside(f'ls -a "{node.home}"')  # no temporary file left
        before = int(line.split("checkpoint at step ")[1].split()[0])
        # it keeps training (and retrying) ...
        node.wait_for(lambda: "Traceback" not in node.log() and node.proc.poll() is None)
        # ... and once the fault is gone, the next checkpoint is written again
        if fault == "disk full":
            node.inside(f'rm "{node.home}/filler"')
        else:
            node.inside(f'umount "{node.home}"')
        node.wait_for(lambda: (node.checkpoint_step() or 0) > before)
    finally:
        code = node.stop()
    assert code == 0
