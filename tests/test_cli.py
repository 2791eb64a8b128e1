"""The command line: `p2pfl sim` and `p2pfl demo` write their results and print the table;
user mistakes exit with code 2 and a clear message, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from p2pfl.cli import app, simulate
from p2pfl.simulator.scenario import load_scenario

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--nodes", "6", "--steps", "30", "--topology", "ring", "--quiet"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small models: one thread is much faster, above all on a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result, " ".join(result.output.split())  # rich wraps long lines


def test_sim_writes_results_and_prints_the_table(tmp_path):
    out = tmp_path / "run"
    result, text = invoke(
        "sim", *SMALL, "--protocol", "none", "--protocol", "continuous", "--seed", "3", "--out", out
    )
    assert result.exit_code == 0, result.output
    for name in ("summary.json", "metrics.jsonl", "report.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scenario"]["nodes"] == 6 and summary["scenario"]["seed"] == 3
    assert summary["scenario"]["topology"] == "ring"
    assert [r["protocol"] for r in summary["runs"]] == ["none", "continuous"]
    assert all(r["steps"] == 30 for r in summary["runs"])
    assert "p2pfl simulation" in text
    for column in ("protocol", "accuracy", "MB sent", "messages", "syncs"):
        assert column in text
    lines = result.output.splitlines()
    row = next(line for line in lines if "continuous" in line)
    assert f"{summary['runs'][1]['messages']:,}" in row  # 6 nodes x 2 x 30 = 360
    assert summary["runs"][1]["messages"] == 360
    assert f"results in {out}" in text


def test_sim_flags_override_the_scenario_file(tmp_path):
    scenario = tmp_path / "s.toml"
    scenario.write_text('nodes = 5\nsteps = 50\ntopology = "ring"\nprotocols = ["gossip"]\n')
    out = tmp_path / "run"
    result, _ = invoke("sim", scenario, "--steps", "12", "--quiet", "--out", out)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["scenario"]["nodes"], summary["scenario"]["steps"]) == (5, 12)
    assert [r["protocol"] for r in summary["runs"]] == ["gossip"]


def test_demo_runs_its_scenario(tmp_path, monkeypatch):
    shipped = load_scenario(simulate.DEMO_SCENARIO, {})  # the shipped demo file is valid
    assert len(shipped.protocols) >= 3
    tiny = tmp_path / "demo.toml"
    tiny.write_text('nodes = 4\nsteps = 10\ntopology = "ring"\nprotocols = ["none", "dynamic"]\n')
    monkeypatch.setattr(simulate, "DEMO_SCENARIO", tiny)
    result, text = invoke("demo", "--quiet", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [r["protocol"] for r in summary["runs"]] == ["none", "dynamic"]
    assert "p2pfl simulation" in text


def only_x_npz(tmp_path):
    path = tmp_path / "only_x.npz"
    np.savez(path, x=np.zeros((20, 3), dtype=np.float32))
    return path


@pytest.mark.parametrize(
    ("flags", "fragments"),
    [
        (["--topology", "hypercube"], ["unknown kind 'hypercube'", "small-world"]),
        (["--topology", "ring:k=3"], ["unknown argument(s) ['k']"]),
        (["--protocol", "dynamic:b=0"], ["'b'", "must be >= 1"]),
        (["--protocol", "telepathy"], ["unknown kind 'telepathy'", "dynamic"]),
        (["--partition", "zipf"], ["unknown kind 'zipf'", "dirichlet"]),
        (["--partition", "dirichlet:alpha=0"], ["alpha must be > 0"]),
        (["--topology", "erdos-renyi:p=0.0"], ["disconnected graph", "raise p"]),
        (["--model", "transformer"], ["unknown model 'transformer'"]),
        (["--dataset", "{tmp}/missing.npz"], ["file not found"]),
        (["--dataset", "{only_x}"], ["missing array 'y'", "numpy.savez"]),
        (["--shards", "0"], ["shards must be between 1 and the number of nodes"]),
        (["--dataset", "digits:drift_every=10,drift_width=12"], ["must be shorter than"]),
        (["--lr-schedule", "cosine:min=2"], ["'min'", "between 0 and 1"]),
    ],
)
def test_user_errors_exit_2_with_a_message(tmp_path, flags, fragments):
    flags = [f.format(tmp=tmp_path, only_x=only_x_npz(tmp_path)) for f in flags]
    out = tmp_path / "run"
    result, text = invoke("sim", *SMALL, *flags, "--out", out)
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert text.startswith("error:")
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in text
    assert not (out / "summary.json").exists()


def test_bad_scenario_file_exits_2(tmp_path):
    scenario = tmp_path / "s.toml"
    scenario.write_text("nodes = 4\nspeed = 3\n")
    result, text = invoke("sim", scenario, "--quiet", "--out", tmp_path / "run")
    assert result.exit_code == 2
    assert "unknown scenario key(s) ['speed']" in text
    result, text = invoke("sim", tmp_path / "nope.toml", "--quiet", "--out", tmp_path / "run")
    assert result.exit_code == 2 and "not found" in text


def test_error_text_is_printed_verbatim(tmp_path):
    path = tmp_path / "scalar.npz"
    np.savez(path, x=np.float32(1.0), y=np.array([0, 1]))
    result, text = invoke("sim", *SMALL, "--dataset", path, "--out", tmp_path / "run")
    assert result.exit_code == 2
    assert "x must have shape [samples, features...] with samples > 0" in text


def test_a_user_batchnorm_model_runs_on_the_batched_learner(tmp_path, monkeypatch, caplog):
    (tmp_path / "bn_factory_for_cli_test.py").write_text(
        "import math\nfrom torch import nn\n\n\n"
        "def make(input_shape, num_classes):\n"
        "    width = math.prod(input_shape)\n"
        "    norm = nn.BatchNorm1d(8)\n"
        "    return nn.Sequential(nn.Linear(width, 8), norm, nn.Linear(8, num_classes))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    result, text = invoke("sim", *SMALL, "--model", "bn_factory_for_cli_test:make", "--out", out)
    assert result.exit_code == 0, repr(result.exception)
    assert (out / "summary.json").exists()
    assert "falling back to the per-node learner" not in caplog.text  # BatchNorm is batched now


def test_python_dash_m_help():
    done = subprocess.run(
        [sys.executable, "-m", "p2pfl", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    for command in ("sim", "demo", "topology"):
        assert command in done.stdout
    assert "Traceback" not in done.stderr


def test_sim_help_lists_the_flags():
    result, text = invoke("sim", "--help")
    assert result.exit_code == 0
    for flag in (
        "--nodes",
        "--topology",
        "--protocol",
        "--partition",
        "--dataset",
        "--lr-schedule",
        "--out",
    ):
        assert flag in text


def test_every_error_type_is_a_p2pfl_error_with_its_exit_code():
    from p2pfl.community import CommunityError
    from p2pfl.community.sharing import SharingError
    from p2pfl.daemon.checkpoint import CheckpointError
    from p2pfl.daemon.config import ConfigError
    from p2pfl.daemon.control import ControlError
    from p2pfl.daemon.identity import IdentityError
    from p2pfl.daemon.transport import TransportError
    from p2pfl.data import DataError
    from p2pfl.errors import EXIT_BAD_INPUT, EXIT_FAILED, P2pflError
    from p2pfl.simulator.scenario import ScenarioError
    from p2pfl.spec import SpecError
    from p2pfl.topology import TopologyError
    from p2pfl.wire.codec import WireError

    bad_input = [SpecError, TopologyError, ScenarioError, DataError, ConfigError, CommunityError]
    bad_input += [SharingError, CheckpointError, IdentityError, WireError]
    for error in bad_input:
        assert issubclass(error, P2pflError) and error.exit_code == EXIT_BAD_INPUT, error
    for error in (ControlError, TransportError):
        assert issubclass(error, P2pflError) and error.exit_code == EXIT_FAILED, error


def test_a_failed_operation_exits_1_and_a_bad_input_2(tmp_path, monkeypatch):
    from p2pfl.daemon.control import ControlError

    def no_node(*args, **kwargs):
        raise ControlError("the node went away; start it again")

    monkeypatch.setattr(simulate, "load_scenario", no_node)
    result, text = invoke("sim", "--out", tmp_path)
    assert result.exit_code == 1 and text == "error: the node went away; start it again"
    monkeypatch.setattr(
        simulate, "load_scenario", lambda *a: (tmp_path / "no" / "file").read_text()
    )
    result, text = invoke("sim", "--out", tmp_path)
    assert result.exit_code == 1 and text.startswith("error: [Errno 2] No such file")
    assert "Traceback" not in result.output
