"""An installed p2pfl (not the source tree) runs its own demo: the scenario ships as package
data. Built offline from a copy of the sources into a fresh venv outside the tree, which sees
the dependencies of the test's interpreter through a .pth file instead of downloading them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_pip_install_then_demo_works_outside_the_source_tree(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "p2pfl", source / "p2pfl", ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.strip()
    # The deps (torch, libp2p, ...) come from this interpreter's site-packages; a plain path
    # line does not run that directory's .pth files, so its editable p2pfl stays invisible.
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["P2PFL_THREADS"] = "1"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps"]
        + ["--no-build-isolation", "--no-index", str(source)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stderr
    shutil.rmtree(source)  # nothing may come from the sources any more
    where = subprocess.run(
        [python, "-c", "import p2pfl; print(p2pfl.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert where.stdout.strip().startswith(str(venv)), where.stdout + where.stderr
    out = tmp_path / "demo"
    done = subprocess.run(
        [venv / "bin" / "p2pfl", "demo", "--steps", "20", "--quiet", "--out", out],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert [r["protocol"] for r in summary["runs"]] == [
        "none",
        "continuous",
        "periodic:b=10",
        "dynamic",
    ]
    assert summary["scenario"]["nodes"] == 16 and summary["scenario"]["steps"] == 20
    assert (out / "report.png").stat().st_size > 0
