"""A lying peer over the real transport. A daemon configured with ``byzantine = ATTACK``
speaks ``/p2pfl/sync/2.0.0`` with the project's codec exactly as an honest one does, but
every model it sends lies as the simulator's attackers do (``p2pfl.protocol.byzantine``).
An honest daemon paired with it ends within 3 points of the same daemon paired with an
honest peer. Only ``signflip`` runs here (each pair costs a minute or two on a shared
machine); the simulator's table covers every attack."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from kit import free_ports
from test_daemon_network import Daemon

from p2pfl.daemon.config import CONFIG_FILE

STEPS = 300
TOLERANCE = 0.03
DATA = "digits:part={i}/2,alpha=10,seed=1"
"""Near-IID halves: the honest node loses no class it cannot learn alone by shutting the
liar out, so the comparison measures the attack, not the lost data."""


def pair(tmp_path: Path, attack: str) -> list[Daemon]:
    """An honest daemon (index 0) training ``STEPS`` steps and its peer (index 1), training
    until stopped and lying with ``attack`` if given."""
    ports = free_ports(2)
    daemons = [Daemon(tmp_path / f"{attack or 'honest'}{i}", i, ports[i], "") for i in range(2)]
    for d in daemons:
        other = daemons[1 - d.index]
        (d.home / CONFIG_FILE).write_text(
            f'listen = "/ip4/127.0.0.1/tcp/{d.port}"\nbootstrap = ["{other.addr}"]\n'
            f'data = "{DATA.format(i=d.index)}"\nprotocol = "dynamic:timeout=5"\n'
            f"steps = {STEPS if d.index == 0 else 0}\n"
            "batch_size = 16\nlr = 0.1\nseed = 1\nstep_interval = 0.05\n"
            + (f'byzantine = "{attack}"\n' if attack and d.index == 1 else "")
        )
    return daemons


def final_status(tmp_path: Path, attack: str) -> dict:
    """Run the pair to the end; the honest daemon's last status."""
    honest, peer = pair(tmp_path, attack)
    try:
        peer.start()  # the peer first: the honest node's whole run overlaps with it
        peer.wait_status(lambda s: s["step"] > 0, timeout=120)
        honest.start()
        honest.wait_status(lambda s: s["done"], timeout=240)
        time.sleep(0.5)  # let a session in flight settle
        status = honest.status()
        if attack:
            assert "this node lies to its peers" in peer.log()
    finally:
        for d in (honest, peer):
            d.stop()
    print(f"{attack or 'honest'}: {status['test_accuracy']:.3f} {status['core_stats']}")
    return status


@pytest.fixture(scope="module")
def honest_accuracy(tmp_path_factory) -> float:
    status = final_status(tmp_path_factory.mktemp("honest"), "")
    assert status["syncs"] > 0
    return status["test_accuracy"]


@pytest.mark.slow
@pytest.mark.xfail(
    reason="not met yet (issue 11): a node whose only peer lies has no vouched peer to judge "
    "it against, so its trust is never lowered and the clipped lies still steer it; a "
    "fresh-clone CI run measured 0.852 against 0.944 honest (an earlier run 0.914 vs 0.905)",
    strict=False,
)
@pytest.mark.parametrize("attack", ["signflip"])
def test_a_lying_peer_cannot_move_an_honest_daemon_by_more_than_3_points(
    tmp_path, honest_accuracy, attack
):
    status = final_status(tmp_path, attack)
    assert status["test_accuracy"] >= honest_accuracy - TOLERANCE, (attack, honest_accuracy)
    assert status["core_stats"]["clipped"] > 0  # the lies were seen and bounded, not missed
