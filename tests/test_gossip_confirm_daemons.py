"""The gossip confirmation over the real transport: daemons send and handle ``Confirm`` as the
simulator does (the core is the same), so an honest pair leaves no exchange unconfirmed,
while a flooder's offers are never confirmed (``tests/test_gossip_confirm.py`` holds the
core and the simulator)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_daemon_network import Daemon
from test_robust_daemons import pair

STEPS = 200


def gossip_pair(tmp_path: Path, attack: str) -> list[Daemon]:
    """An honest gossip daemon (index 0) training ``STEPS`` steps and its peer (index 1),
    training until stopped, flooding with ``attack`` if given."""
    return pair(tmp_path, attack, protocol="gossip:b=5,timeout=5", steps=STEPS)


@pytest.mark.slow
def test_daemons_confirm_gossip_exchanges_and_flooders_do_not(tmp_path):
    pairs = {attack: gossip_pair(tmp_path, attack) for attack in ("", "flood")}
    try:
        for daemons in pairs.values():
            for d in reversed(daemons):
                d.start()
        done = {a: ds[0].wait_status(lambda s: s["done"], timeout=600) for a, ds in pairs.items()}
        honest_peer = pairs[""][1].status()["core_stats"]
    finally:
        for daemons in pairs.values():
            for d in daemons:
                d.stop()
    honest, flooded = done[""]["core_stats"], done["flood"]["core_stats"]
    # both ends of the honest pair merged, and every exchange one received was confirmed
    assert honest["syncs"] >= 10 and honest_peer["syncs"] >= 10
    assert honest["unconfirmed"] == 0 and honest_peer["unconfirmed"] == 0
    # the flooder's offers were merged (its own exchanges confirmed), never all confirmed
    assert flooded["syncs"] >= 10 and flooded["unconfirmed"] > 0
