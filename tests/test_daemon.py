"""Node daemon, fast parts: config validation, checkpoints, core state, control socket."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest
import torch
import trio
from kit import FakeModel, recorded_runtime
from typer.testing import CliRunner

from p2pfl.cli import app
from p2pfl.daemon.checkpoint import (
    CheckpointError,
    decode_checkpoint,
    encode_checkpoint,
    load_newest,
    write_atomically,
)
from p2pfl.daemon.config import CONFIG_FILE, ConfigError, load_config, write_template
from p2pfl.daemon.control import ControlError, bind_socket, request, serve, socket_path
from p2pfl.daemon.node import build_learning
from p2pfl.daemon.state import node_state, restore_node_state
from p2pfl.protocol.config import parse_protocol
from p2pfl.protocol.core import make_core
from p2pfl.protocol.dynamic import DynamicCore

PEER = "12D3KooWKbubyjcsGJXV8JRWJ2xMRMy3WXhAwrQSy9y6tgP4AxHu"
OTHER = f"/ip4/127.0.0.1/tcp/4001/p2p/{PEER}"


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result, " ".join(result.output.split())


# ------------------------------------------------------------------------------ config


def test_template_is_all_comments_and_defaults_load(tmp_path):
    path = write_template(tmp_path / "node")
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    assert all(line.startswith("#") for line in lines)
    for key in ("listen", "bootstrap", "data", "model", "protocol", "steps", "lr", "seed"):
        assert f"# {key} = " in path.read_text()
    config = load_config(path.parent)
    assert config.protocol == "dynamic" and config.steps == 0 and config.bootstrap == ()


def test_flags_override_the_file(tmp_path):
    (tmp_path / CONFIG_FILE).write_text(f'lr = 0.5\nsteps = 10\nbootstrap = ["{OTHER}"]\n')
    config = load_config(tmp_path, {"steps": 20, "lr": None, "bootstrap": []})
    assert (config.lr, config.steps, config.bootstrap) == (0.5, 20, (OTHER,))
    assert load_config(tmp_path, {"protocol": "periodic:b=5"}).protocol_config.b == 5


def test_daemon_runs_the_growth_condition(tmp_path):
    """The daemon builds its core from the same spec: ``condition=growth,window=W`` parses
    (a bad window is a config error naming the key) and its core measures the noise rate
    for ``window`` steps after the sync, then fires once the distance grows faster."""
    config = load_config(tmp_path, {"protocol": "dynamic:delta=1,b=1,condition=growth,window=4"})
    assert (config.protocol_config.condition, config.protocol_config.window) == ("growth", 4)
    with pytest.raises(ConfigError, match="window"):
        load_config(tmp_path, {"protocol": "dynamic:condition=growth,window=0"})
    model = FakeModel(torch.zeros(4))
    core = make_core("a", config.protocol_config, model, ["b"])
    fired = []
    for step in range(1, 6):
        model.w = torch.full((4,), 0.1 * step**2)  # D = 0.04 t⁴: faster than linear
        fired.append(bool(core.on_local_step(0.0)))
        # the noise rate: the largest squared move per step, 4 · (0.1 (2t − 1))² by t = 4
        assert core._noise_rate == pytest.approx(0.04 * (2 * min(step, 4) - 1) ** 2)
    assert fired == [False] * 4 + [True]  # at 5: D − 1.96·5 = 15.2 > Δ = 1: a session


@pytest.mark.parametrize(
    ("text", "flags", "expected"),
    [
        ("lr = -1\n", {}, "'lr' (from"),
        ("steps = 1.5\n", {}, "'steps'"),
        ("colour = 3\n", {}, "unknown key 'colour'"),
        ("lr = [\n", {}, "not valid TOML"),
        ("", {"listen": "/ip4/127.0.0.1/udp/1"}, "'listen' (from --listen)"),
        ("", {"bootstrap": ["/ip4/127.0.0.1/tcp/1"]}, "full peer address"),
        ("", {"protocol": "dynamic:b=0"}, "'protocol'"),
        ("", {"step_interval": float("nan")}, "'step_interval'"),
        ("", {"metrics_port": 70000}, "'metrics_port'"),
        ('data = ""\n', {}, "'data'"),
        ('lr_schedule = "sawtooth"\n', {}, "'lr_schedule'"),
        ('lr_schedule = "cosine"\n', {}, "cosine:steps=T"),
    ],
)
def test_bad_values_name_the_key(tmp_path, text, flags, expected):
    (tmp_path / CONFIG_FILE).write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, flags)
    assert expected in str(info.value)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--lr", "-1"], "bad value for 'lr' (from --lr)"),
        (["--data", "digits:part=5/3"], "bad value for 'data'"),
        (["--model", "transformer"], "bad value for 'model'"),
        (["--bootstrap", "nowhere"], "bad value for 'bootstrap'"),
    ],
)
def test_start_with_a_bad_value_exits_2_without_traceback(tmp_path, args, expected):
    write_template(tmp_path)
    result, text = invoke("node", "start", "--home", tmp_path, *args)
    assert result.exit_code == 2, text
    assert "Traceback" not in text
    assert expected in text or expected in caplog_text(tmp_path)


def caplog_text(home: Path) -> str:
    log = home / "node.log"
    return log.read_text() if log.exists() else ""


def test_start_without_init_and_status_without_node(tmp_path):
    result, text = invoke("node", "start", "--home", tmp_path / "missing")
    assert result.exit_code == 2 and "p2pfl node init" in text
    result, text = invoke("node", "status", "--home", tmp_path)
    assert result.exit_code == 1 and "no node is running" in text


def test_init_creates_a_private_identity(tmp_path):
    home = tmp_path / "n"
    result, text = invoke("node", "init", "--home", home)
    assert result.exit_code == 0 and "peer id 12D3KooW" in text
    assert stat.S_IMODE((home / "identity.key").stat().st_mode) == 0o600
    again, text2 = invoke("node", "init", "--home", home)
    assert again.exit_code == 0 and text2.split()[2] == text.split()[2]


# -------------------------------------------------------------------------- checkpoints


def test_checkpoint_roundtrip_keeps_the_previous_one(tmp_path):
    write_atomically(tmp_path, encode_checkpoint({"step": 1, "w": torch.ones(3)}))
    write_atomically(tmp_path, encode_checkpoint({"step": 2, "w": torch.zeros(3)}))
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "ckpt.prev"]
    assert stat.S_IMODE((tmp_path / "ckpt").stat().st_mode) == 0o600
    assert load_newest(tmp_path)["step"] == 2
    assert decode_checkpoint((tmp_path / "ckpt.prev").read_bytes())["step"] == 1


def test_corrupt_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
    caplog.set_level(logging.ERROR, logger="p2pfl.daemon")
    write_atomically(tmp_path, encode_checkpoint({"step": 1}))
    write_atomically(tmp_path, encode_checkpoint({"step": 2}))
    data = bytearray((tmp_path / "ckpt").read_bytes())
    data[-5] ^= 0xFF
    (tmp_path / "ckpt").write_bytes(bytes(data))
    assert load_newest(tmp_path)["step"] == 1
    assert "checksum mismatch" in caplog.text
    assert (tmp_path / "ckpt.corrupt").exists()
    write_atomically(tmp_path, encode_checkpoint({"step": 3}))  # the good copy stays
    assert decode_checkpoint((tmp_path / "ckpt.prev").read_bytes())["step"] == 1


def test_no_usable_checkpoint_is_a_clear_error(tmp_path):
    assert load_newest(tmp_path) is None
    (tmp_path / "ckpt").write_bytes(b"P2PFLCK1" + b"\x00" * 10)
    (tmp_path / "ckpt.prev").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="bad header.*start again"):
        load_newest(tmp_path)
    assert load_newest(tmp_path) is None


def test_interrupted_write_leaves_the_old_checkpoint(tmp_path):
    write_atomically(tmp_path, encode_checkpoint({"step": 7}))
    (tmp_path / "ckpt.tmp").write_bytes(b"half a chec")  # a crash mid-write
    assert load_newest(tmp_path)["step"] == 7


# --------------------------------------------------------------------------- node state


def test_dynamic_core_state_roundtrip():
    model = FakeModel(torch.arange(4.0))
    config = parse_protocol("dynamic:outer_lr=0.7,outer_momentum=0.9")
    core = make_core("a", config, model, ["b"])
    assert isinstance(core, DynamicCore)
    core.step, core.steps_since_sync, core.stats.syncs = 42, 5, 3
    core.reference, core.drift_correction.vector = torch.ones(4), torch.full((4,), 0.5)
    assert core.outer is not None
    core.outer.velocity = torch.full((4,), 0.25)
    fresh = make_core("a", config, model, ["b"])
    fresh.load_state_dict(core.state_dict())
    assert (fresh.step, fresh.steps_since_sync, fresh.stats.syncs) == (42, 5, 3)
    assert torch.equal(fresh.reference, core.reference)
    assert torch.equal(fresh.correction, core.correction)
    assert torch.equal(fresh.outer.velocity, core.outer.velocity)
    assert torch.equal(fresh.correction, core.correction)
    assert fresh.delta == pytest.approx(config.rel * 4)


def trained_node(config, steps: int):
    """A node's learner and whole-model runtime after ``steps`` local steps."""
    learner = build_learning(config, PEER).learner
    runtime = recorded_runtime(learner, config.protocol, node=PEER)
    for _ in range(steps):
        learner.step(torch.tensor([0]))
        runtime.local_step(0.0)
    return learner, runtime


def test_node_state_restores_model_optimizer_and_sampling(tmp_path):
    config = load_config(tmp_path, {"data": "digits:part=1/4,alpha=0.5", "model": "logistic"})
    first, runtime = trained_node(config, 5)
    nodes = torch.tensor([0])
    saved = node_state(first, runtime.core, PEER, {"rejected": 2})
    state = decode_checkpoint(encode_checkpoint(saved))
    second = build_learning(config, PEER).learner
    runtime2 = recorded_runtime(second, config.protocol, node=PEER)
    assert restore_node_state(second, runtime2, PEER, state) == {"rejected": 2}
    assert runtime2.core.step == 5
    assert torch.equal(second.correction(0), first.correction(0))
    first.step(nodes)
    second.step(nodes)
    assert torch.equal(first.get(0), second.get(0))
    with pytest.raises(ValueError, match="belongs to peer"):
        restore_node_state(second, runtime2, "someone-else", state)


def test_a_node_follows_its_learning_rate_schedule_across_a_restart(tmp_path):
    """``lr_schedule`` in the config: the learner decays the rate, the core is told the
    current step size, and a restored node goes on from its step instead of restarting the
    schedule."""
    flags = {"data": "digits:part=1/4", "model": "logistic", "steps": 20}
    config = load_config(tmp_path, {**flags, "lr_schedule": "cosine:min=0.1"})
    first, runtime = trained_node(config, 10)
    nodes = torch.tensor([0])
    assert first.lr(0) == pytest.approx(0.1 * config.schedule.factor(9))
    assert 0.01 < first.lr(0) < 0.1
    assert runtime.core.step_size == pytest.approx(first.lr(0))
    state = decode_checkpoint(encode_checkpoint(node_state(first, runtime.core, PEER, {})))
    second = build_learning(config, PEER).learner
    restore_node_state(second, recorded_runtime(second, config.protocol, node=PEER), PEER, state)
    first.step(nodes)
    second.step(nodes)
    assert second.lr(0) == first.lr(0) == pytest.approx(0.1 * config.schedule.factor(10))
    assert torch.equal(first.get(0), second.get(0))


# ------------------------------------------------------------------------ control socket


def test_control_socket_is_private_and_answers(tmp_path):
    async def respond(req):
        return {"echo": req["cmd"]}

    async def body():
        sock = await bind_socket(tmp_path)
        assert stat.S_IMODE(socket_path(tmp_path).stat().st_mode) == 0o600
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve, sock, respond)
            reply = await trio.to_thread.run_sync(request, tmp_path, "status")
            assert reply == {"echo": "status"}
            with pytest.raises(ControlError, match="already running"):
                await bind_socket(tmp_path)
            nursery.cancel_scope.cancel()
        sock.close()
        # a stale socket file left by a killed node is replaced
        again = await bind_socket(tmp_path)
        again.close()

    async def bounded():
        with trio.fail_after(10):
            await body()

    trio.run(bounded)


def test_request_without_a_node_is_a_clear_error(tmp_path):
    with pytest.raises(ControlError, match="no node is running"):
        request(tmp_path, "status")


def test_start_with_only_corrupt_checkpoints_exits_2(tmp_path):
    write_template(tmp_path)
    (tmp_path / "ckpt").write_bytes(b"garbage")
    result, text = invoke("node", "start", "--home", tmp_path, "--model", "logistic")
    assert result.exit_code == 2 and "Traceback" not in text
    assert "no usable checkpoint" in caplog_text(tmp_path)
    assert (tmp_path / "ckpt.corrupt").exists()
    assert logging.getLogger("p2pfl").propagate  # the in-process CLI left logging as it was
