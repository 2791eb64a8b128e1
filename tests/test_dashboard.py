"""The dashboard's server (token, Host check, assets, state), its history and its settings;
the page in a real browser is in test_dashboard_browser.py."""

from __future__ import annotations

import json
import socket
import stat
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import trio

from p2pfl.daemon.config import ConfigError, load_config
from p2pfl.daemon.dashboard import open_dashboard
from p2pfl.daemon.dashboard.history import History
from p2pfl.daemon.dashboard.server import COOKIE, STATIC, TOKEN_FILE, Dashboard, read_token
from p2pfl.daemon.peers import PeerLedger

STATUS = {"peer_id": "me", "step": 7, "peers": ["a", "b"], "loss": 0.5, "bytes_sent": 10}


def fetch(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def with_dashboard(tmp_path: Path, check) -> None:
    """Run a dashboard on a free port, call ``check(dashboard)`` in a thread, then stop."""

    async def main() -> None:
        dashboard = Dashboard(tmp_path, 0, lambda: dict(STATUS), lambda: {"peer_table": []})
        async with trio.open_nursery() as nursery:
            dashboard.bind()
            await nursery.start(dashboard.run)
            await trio.to_thread.run_sync(check, dashboard)
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_requests_without_the_token_are_refused(tmp_path: Path):
    def check(dashboard: Dashboard) -> None:
        base = f"http://127.0.0.1:{dashboard.bound_port}"
        token = dashboard.token
        for path in ("/", "/api/state", "/static/dashboard.js", "/static/vendor/uPlot.min.css"):
            status, _, body = fetch(base + path)
            assert status == 401 and b"needs its token" in body, path
            assert fetch(base + path + "?token=wrong" + token[5:])[0] == 401
            assert fetch(base + path, {"Authorization": "Bearer " + token[:-1]})[0] == 401
        # a page elsewhere that rebinds its DNS name to 127.0.0.1 is refused even with a token
        status, _, _ = fetch(f"{base}/api/state?token={token}", {"Host": "evil.example:80"})
        assert status == 403

        status, headers, page = fetch(dashboard.url)
        assert status == 200 and b"dashboard.js" in page
        cookie = headers["set-cookie"]
        assert cookie.startswith(f"{COOKIE}={token}") and "HttpOnly" in cookie
        assert "samesite=strict" in cookie.lower()
        for headers in ({"Authorization": f"Bearer {token}"}, {"Cookie": f"{COOKIE}={token}"}):
            status, _, body = fetch(base + "/api/state", headers)
            assert status == 200
            state = json.loads(body)
            assert state["status"] == STATUS and state["peer_table"] == []
            assert {"history", "log", "now"} <= set(state)
        status, _, script = fetch(f"{base}/static/vendor/uPlot.iife.min.js?token={token}")
        assert status == 200 and script == (STATIC / "vendor" / "uPlot.iife.min.js").read_bytes()

    with_dashboard(tmp_path, check)
    token_file = tmp_path / TOKEN_FILE
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert read_token(tmp_path) == token_file.read_text().strip()


def test_the_token_survives_a_restart(tmp_path: Path):
    tokens = []
    with_dashboard(tmp_path, lambda d: tokens.append(d.token))
    with_dashboard(tmp_path, lambda d: tokens.append(d.token))
    assert tokens[0] == tokens[1] and len(tokens[0]) >= 40


def test_page_assets_are_all_in_the_package():
    page = (STATIC / "index.html").read_text()
    script = (STATIC / "dashboard.js").read_text()
    assert "http://" not in page + script and "https://" not in page + script
    for asset in ("vendor/uPlot.iife.min.js", "vendor/uPlot.min.css", "dashboard.js"):
        assert f"/static/{asset}" in page and (STATIC / asset).is_file()
    assert (STATIC / "vendor" / "LICENSE.uPlot").read_text().startswith("The MIT License")
    assert "innerHTML" not in script  # peer-supplied text is only ever set as textContent


def test_the_log_tail_keeps_node_log_lines(tmp_path: Path):
    import logging

    def check(dashboard: Dashboard) -> None:
        logging.getLogger("p2pfl.daemon").warning("refused message from peer %s: %s", "x", "bad")
        lines = json.loads(fetch(dashboard.url.replace("/?", "/api/state?"))[2])["log"]
        assert any(
            line["message"] == "refused message from peer x: bad" and line["level"] == "WARNING"
            for line in lines
        )

    with_dashboard(tmp_path, check)
    assert not any(type(h).__name__ == "LogTail" for h in logging.getLogger("p2pfl").handlers), (
        "the log handler is removed when the dashboard stops"
    )


def test_history_thins_itself_and_stays_bounded():
    history = History(interval=2.0, capacity=8)
    for i in range(100):
        history.add(float(i), {"step": i, "loss": float("nan"), "peers": ["a"] * (i % 3)})
        assert len(history) < 8
    data = history.as_dict()
    assert data["interval_s"] > 2.0
    assert data["t"] == sorted(data["t"]) and data["t"][0] == 0.0
    assert data["step"] == [int(t) for t in data["t"]]
    assert set(data["loss"]) == {None}  # NaN is not JSON
    assert data["peers"] == [int(t) % 3 for t in data["t"]]
    assert data["bytes_sent"] == [None] * len(history)
    assert data["community_syncs"] == [None] * len(history)  # in no community
    history.add(1000.0, {"communities": [{"syncs": 2}, {"syncs": 3}]})
    assert history.as_dict()["community_syncs"][-1] == 5


@pytest.mark.parametrize(
    ("value", "expected"), [("auto", "auto"), ("off", 0), ("0", 0), ("8080", 8080), (9000, 9000)]
)
def test_dashboard_port_setting(tmp_path: Path, value, expected):
    assert load_config(tmp_path, {"dashboard_port": value}).dashboard_port == expected


@pytest.mark.parametrize("value", ["80000", "eighty", -1, 1.5])
def test_bad_dashboard_port_names_the_key(tmp_path: Path, value):
    with pytest.raises(ConfigError, match="'dashboard_port' \\(from --dashboard-port\\)"):
        load_config(tmp_path, {"dashboard_port": value})


def test_a_port_in_use_is_a_config_error(tmp_path: Path):
    class Node:
        config = load_config(tmp_path)

        def status(self) -> dict:
            return {}

        def details(self) -> dict:
            return {}

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        node = Node()
        node.config = load_config(tmp_path, {"dashboard_port": taken.getsockname()[1]})

        with pytest.raises(ConfigError, match="cannot listen on 127.0.0.1"):
            open_dashboard(node)  # type: ignore[arg-type]
    node.config = load_config(tmp_path, {"dashboard_port": 0})
    assert open_dashboard(node) is None  # type: ignore[arg-type]


def test_peer_ledger_counts_and_forgets_idle_peers_first():
    ledger = PeerLedger(max_peers=2)
    ledger.connection("a", True)
    ledger.sent("a", 10)
    ledger.received("b", 5)
    ledger.refused("b", "rate limit exceeded")
    ledger.refused("b", "frame too large")
    assert ledger.snapshot()["b"]["refused"] == 2
    assert ledger.snapshot()["b"]["last_refusal"] == "frame too large"
    ledger.sent("c", 1)  # full: b (not connected) goes, a (connected) stays
    assert set(ledger.snapshot()) == {"a", "c"}
    assert ledger.snapshot()["a"]["bytes_sent"] == 10


def test_library_warnings_are_condensed_to_one_line(tmp_path: Path):
    import io
    import logging

    from p2pfl.daemon.logformat import MAX_CHARS, condense_library_logs

    stream = io.StringIO()
    added = condense_library_logs([logging.StreamHandler(stream)], "%(levelname)s %(message)s")
    library = logging.getLogger("libp2p.network.swarm")
    try:
        try:
            raise ConnectionError("dial failed:\n  attempt 1: refused\n  attempt 2: refused")
        except ConnectionError:
            library.exception("Failed to\nupgrade connection")
        library.info("not shown: below WARNING")
        library.warning("x" * 2000)
    finally:
        for handler in added:
            logging.getLogger("libp2p").removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert lines[0] == (
        "ERROR Failed to | upgrade connection (ConnectionError: dial failed: | attempt 1: "
        "refused | attempt 2: refused)"
    )
    assert len(lines) == 2 and len(lines[1]) == MAX_CHARS and lines[1].endswith("…")
