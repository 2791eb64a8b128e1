"""Faults a node must survive or explain: failed checkpoint writes, unusable checkpoints,
a port in use, a read-only home, bad data and bad model factories, floods of refusals."""

from __future__ import annotations

import errno
import logging
import os
import socket
import subprocess
import sys
import textwrap

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
from p2pfl.daemon.logformat import LogFile
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


def test_a_log_file_that_cannot_be_written_says_so_once_and_counts_the_lost_lines(tmp_path, capsys):
    handler = LogFile(tmp_path / "node.log")
    logger = logging.getLogger("p2pfl.test.logfile")
    logger.addHandler(handler)
    real_flush = handler.flush
    try:

        def full() -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        handler.flush = full  # type: ignore[method-assign]
        for i in range(5):
            logger.warning("line %d", i)
        handler.flush = real_flush  # type: ignore[method-assign]
        logger.warning("back")
    finally:
        logger.removeHandler(handler)
        handler.close()
    err = capsys.readouterr().err
    assert err.count("cannot write") == 1 and "No space left on device" in err
    assert "Traceback" not in err and "Logging error" not in err
    assert "5 line(s) of this log could not be written" in (tmp_path / "node.log").read_text()
