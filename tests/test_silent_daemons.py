"""A peer that connects and never answers, over the real transport: three daemons on
loopback, one of them ``byzantine = "silent"`` (it connects and is a neighbour but sends
nothing). The honest daemons' sessions go on without it once it is a straggler (the same
sans-I/O core as the simulator's, ``p2pfl.protocol.round_trip.PeerWaits``) and they sync
with each other."""

from __future__ import annotations

import pytest
from test_daemon_network import make_network

from p2pfl.daemon.config import CONFIG_FILE

STEPS = 300
PROTOCOL = "dynamic:timeout=20"
"""A node-wide wait of 20 s: longer than an honest first contact takes even on a machine at
load 20 (a 5 s wait expired once there, for the honest peer's answer), so a session that
times out can only have waited for the silent peer, and one that did held the pair for 400
steps."""


@pytest.mark.slow
def test_honest_daemons_sync_past_a_silent_peer(tmp_path):
    daemons = make_network(tmp_path, 3, STEPS, protocol=PROTOCOL)
    for d in daemons:
        config = d.home / CONFIG_FILE
        text = config.read_text().replace("step_interval = 0.01", "step_interval = 0.05")
        if d.index == 2:
            text = text.replace(f"steps = {STEPS}", "steps = 0") + 'byzantine = "silent"\n'
        config.write_text(text)
    silent = daemons[2]
    try:
        for d in reversed(daemons):
            d.start()
        statuses = [d.wait_status(lambda s: s["done"], timeout=300) for d in daemons[:2]]
        assert "this node lies to its peers" in silent.log()
    finally:
        for d in daemons:
            d.stop()
    for status in statuses:
        stats = status["core_stats"]
        print(stats)
        # the silent peer was cut off as a straggler, never waited out, and the pair synced
        assert stats.get("stragglers", 0) > 0 and stats["timeouts"] == 0, stats
        assert stats["syncs"] >= 5, stats
