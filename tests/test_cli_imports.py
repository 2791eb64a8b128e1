"""The command line starts fast: importing it, ``--help`` and the control commands load
neither torch, matplotlib nor libp2p; the commands that train set torch's thread count from
``P2PFL_THREADS`` (default 1) and refuse a value that is not a positive whole number."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from p2pfl.cli import app

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "matplotlib", "libp2p")


def heavy_modules_after(code: str) -> list[str]:
    """Run ``code`` in a fresh interpreter; return the heavy top-level modules it loaded."""
    report = f"import json, sys; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    done = subprocess.run(
        [sys.executable, "-c", f"{code}\n{report}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_importing_the_cli_loads_no_heavy_module():
    assert heavy_modules_after("import p2pfl.cli") == []


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["sim", "--help"],
        ["topology", "show", "--help"],
        ["node", "status", "--help"],
        ["node", "status", "--home", "{home}"],
        ["node", "stop", "--home", "{home}"],
        ["community", "list", "--help"],
    ],
)
def test_commands_that_do_not_train_load_no_heavy_module(tmp_path, args):
    args = [arg.format(home=tmp_path) for arg in args]
    code = (
        "from typer.testing import CliRunner\n"
        "from p2pfl.cli import app\n"
        f"result = CliRunner().invoke(app, {args!r})\n"
        "assert result.exception is None or isinstance(result.exception, SystemExit)\n"
        "assert result.exit_code in (0, 1), result.output"
    )
    assert heavy_modules_after(code) == []


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_sim_sets_the_thread_count_from_the_environment(tmp_path, monkeypatch, restore_threads):
    monkeypatch.setenv("P2PFL_THREADS", "2")
    torch.set_num_threads(1)
    result = CliRunner().invoke(app, ["sim", "--nodes", "0", "--out", str(tmp_path)])
    assert result.exit_code == 2  # no nodes: refused after torch was set up
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("value", ["0", "two", "-1", ""])
def test_bad_thread_count_exits_2_with_the_fix(tmp_path, monkeypatch, value):
    monkeypatch.setenv("P2PFL_THREADS", value)
    result = CliRunner().invoke(app, ["sim", "--out", str(tmp_path)])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert f"P2PFL_THREADS={value!r}" in text and "positive whole number" in text
    assert not (tmp_path / "summary.json").exists()


def test_node_start_sets_up_torch(tmp_path):
    home = tmp_path / "node"
    assert CliRunner().invoke(app, ["node", "init", "--home", str(home)]).exit_code == 0
    # A separate process with a deadline: were the check missing, the node would keep running.
    done = subprocess.run(
        [sys.executable, "-m", "p2pfl", "node", "start", "--home", str(home)],
        cwd=ROOT,
        env={**os.environ, "P2PFL_THREADS": "none"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "P2PFL_THREADS='none'" in " ".join(done.stderr.split())


def test_reading_memberships_does_not_import_torch():
    """`p2pfl community list` and friends read signed manifests: schemas need no torch (the
    signature checks need libp2p's crypto, which is lighter)."""
    assert "torch" not in heavy_modules_after("import p2pfl.community.store")
