"""The dashboard in a real browser: headless Debian Chromium, driven by Playwright, against
three running node daemons in a community (and one outsider whose frame is refused).

Needs ``/usr/bin/chromium`` (``apt-get install chromium``; ``make test`` installs it when it
runs as root) and the ``playwright`` package (its bundled browsers are never downloaded).
Without them the test is skipped on a developer machine and fails under CI (``CI`` set).
Set ``P2PFL_SCREENSHOT=docs/dashboard.png`` to refresh the README's screenshot.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from test_daemon_network import REPO, Daemon, make_network
from typer.testing import CliRunner

from p2pfl.cli import app
from p2pfl.daemon.config import CONFIG_FILE
from p2pfl.daemon.sync import SYNC_PROTOCOL, WHOLE_MODEL, sync_frame
from p2pfl.daemon.transport import Transport

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
NODES = 3
STEPS = 1500
GARBAGE = b"\xc1garbage"
"""Not msgpack: the whole model's channel refuses it."""


def _browser_or_skip():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is None or not CHROMIUM.exists():
        missing = "the playwright package" if sync_playwright is None else str(CHROMIUM)
        if os.environ.get("CI"):
            pytest.fail(f"{missing} is missing: `make test` installs it")
        pytest.skip(f"{missing} is missing (apt-get install chromium; pip install playwright)")
    return sync_playwright


def node_status(daemon: Daemon) -> dict:
    """``p2pfl node status --json`` of ``daemon``, as a user runs it."""
    done = subprocess.run(
        [sys.executable, "-m", "p2pfl", "node", "status", "--home", str(daemon.home), "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def form_community(daemons: list[Daemon], tmp_path: Path) -> str:
    """The first node founds an open community sharing fc1.* (synced every 50 steps), the
    others join it."""
    draft = (REPO / "examples" / "community" / "manifest.toml").read_text()
    draft = draft.replace('admission = "invite"', 'admission = "open"')
    draft = draft.replace('protocol = "dynamic"', 'protocol = "periodic"').replace(
        "b = 2", "b = 50"
    )
    (tmp_path / "draft.toml").write_text(draft)
    founder = daemons[0]
    created = CliRunner().invoke(
        app, ["community", "create", "--home", str(founder.home), str(tmp_path / "draft.toml")]
    )
    assert created.exit_code == 0, created.output
    community = created.stdout.split()[1]
    manifest = founder.home / "communities" / community / "manifest.toml"
    for member in daemons[1:]:
        args = ["community", "join", "--home", str(member.home), str(manifest)]
        joined = CliRunner().invoke(app, [*args, "--bootstrap", founder.addr])
        assert joined.exit_code == 0, joined.output
    return community


async def send_garbage(target: Daemon) -> str:
    async with Transport(create_new_key_pair()) as outsider:
        peer = await outsider.connect(target.addr)
        await outsider.send(peer, SYNC_PROTOCOL, sync_frame(WHOLE_MODEL, GARBAGE))
        return outsider.peer_id


def card(page, key: str) -> str:
    return page.get_attribute(f"#stat-{key}", "data-value")


@pytest.mark.slow
def test_the_dashboard_shows_the_node_as_node_status_does(tmp_path):
    sync_playwright = _browser_or_skip()
    daemons = make_network(tmp_path, NODES, STEPS, protocol="none")
    for d in daemons:
        with open(d.home / CONFIG_FILE, "a") as config:
            config.write('model = "mlp:hidden=64"\n')
    community = form_community(daemons, tmp_path)
    node = daemons[0]
    try:
        for d in daemons:
            d.start()
        node.wait_status(lambda s: len(s["communities"][0]["members"]) == NODES - 1, timeout=300)
        outsider = trio.run(send_garbage, node)
        for d in daemons:
            d.wait_status(lambda s: s["done"], timeout=180)
        before = node_status(node)
        url = before["dashboard_url"]
        assert url.startswith("http://127.0.0.1:") and "?token=" in url

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile"),
                executable_path=str(CHROMIUM),
                args=CHROMIUM_FLAGS,
                headless=True,
                viewport={"width": 1400, "height": 1250},
            )
            try:
                page = browser.new_page()
                errors: list[str] = []
                page.on("pageerror", lambda exc: errors.append(str(exc)))

                refused = page.goto(url.split("?")[0])
                assert refused is not None and refused.status == 401
                assert "needs its token" in page.content()

                assert page.goto(url).status == 200
                page.wait_for_selector("#live[data-ok='1']", timeout=30_000)
                # the page polls every 2 s: wait for a poll after `before`, then ask again
                page.wait_for_function(
                    "s => Number(document.getElementById('stat-step').dataset.value) >= s",
                    arg=before["step"],
                    timeout=30_000,
                )
                time.sleep(2.5)
                shown = {
                    key: card(page, key)
                    for key in ("step", "syncs", "bytes_sent", "bytes_received", "rejected")
                }
                accuracy = float(card(page, "test_accuracy"))
                after = node_status(node)
                row = page.locator(f"#communities tr[data-community='{community}']")
                community_text = row.inner_text()
                outsider_row = page.locator(f"#peers tr[data-peer='{outsider}']").inner_text()
                page.wait_for_timeout(500)
                page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
                assert page.url.endswith("/"), "the token is taken out of the address bar"
                assert not errors, errors
            finally:
                browser.close()
    finally:
        for d in daemons:
            d.stop()

    for key, value in shown.items():
        assert before[key] <= int(value) <= after[key], (key, value, before[key], after[key])
    assert shown["step"] == str(STEPS) and int(shown["rejected"]) >= 1
    accuracies = (before["test_accuracy"], after["test_accuracy"])
    assert min(accuracies) - 1e-9 <= accuracy <= max(accuracies) + 1e-9, (accuracy, accuracies)
    entry = after["communities"][0]
    assert "digits-body" in community_text and "open" in community_text
    assert str(entry["syncs"]) in community_text and entry["members"]
    assert "refused" in outsider_row and "malformed msgpack" in outsider_row
    screenshot = os.environ.get("P2PFL_SCREENSHOT")
    if screenshot:
        shutil.copy(tmp_path / "dashboard.png", REPO / screenshot)
