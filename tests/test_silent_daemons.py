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


@pytest.mark.slow
def test_honest_daemons_sync_past_a_silent_peer(tmp_path):
    daemons = make_network(tmp_path, 3, STEPS, protocol="dynamic")
    silent = daemons[2]
    config = silent.home / CONFIG_FILE
    config.write_text(config.read_text().replace(f"steps = {STEPS}", "steps = 0"))
    config.write_text(config.read_text() + 'byzantine = "silent"\n')
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
        # the silent peer was given up on, and the honest pair still synced
        assert stats["stragglers"] + stats["timeouts"] > 0
        assert stats["syncs"] >= 5, stats
