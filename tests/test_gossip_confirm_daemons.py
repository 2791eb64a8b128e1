"""The gossip confirmation over the real transport: daemons send and handle ``Confirm`` as the
simulator does (the core is the same), so an honest pair leaves no exchange unconfirmed,
while a flooder's offers are never confirmed (``tests/test_gossip_confirm.py`` holds the
core and the simulator)."""

from __future__ import annotations

from pathlib import Path

import pytest
from kit import free_ports
from test_daemon_network import Daemon

from p2pfl.daemon.config import CONFIG_FILE

STEPS = 200


def gossip_pair(tmp_path: Path, attack: str) -> list[Daemon]:
    """An honest gossip daemon (index 0) training ``STEPS`` steps and its peer (index 1),
    training until stopped, flooding with ``attack`` if given."""
    ports = free_ports(2)
    daemons = [Daemon(tmp_path / f"{attack or 'honest'}{i}", i, ports[i], "") for i in range(2)]
    for d in daemons:
        other = daemons[1 - d.index]
        (d.home / CONFIG_FILE).write_text(
            f'listen = "/ip4/127.0.0.1/tcp/{d.port}"\nbootstrap = ["{other.addr}"]\n'
            f'data = "digits:part={d.index}/2,alpha=10,seed=1"\n'
            'protocol = "gossip:b=5,timeout=5"\n'
            f"steps = {STEPS if d.index == 0 else 0}\n"
            "batch_size = 16\nlr = 0.1\nseed = 1\nstep_interval = 0.05\n"
            + (f'byzantine = "{attack}"\n' if attack and d.index == 1 else "")
        )
    return daemons


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
