"""Lying peers over the real transport. A daemon configured with ``byzantine = ATTACK``
speaks ``/p2pfl/sync/2.0.0`` with the project's codec exactly as an honest one does, but
every model it sends lies as the simulator's attackers do (``p2pfl.protocol.byzantine``).

An honest daemon whose only peer lies ends within 3 points of the same daemon trained alone
(same data, init and sampling): the liar's half of the data is lost to it either way, so
that is the best it can do, and what a lie that steered it would lose on. Measured with
the peer honest instead: a pair syncs (a lone liar used to steer its peer: 0.805 against
0.958 honest, in a fresh-clone CI run). All pairs run side by side,
fourteen processes (each pair costs two process start-ups: one after the other they took a
minute each; in two waves of four, 5 min on a loaded 2-core machine; all at once, 3 min)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from kit import free_ports
from test_daemon_network import Daemon, alone_accuracy

from p2pfl.daemon.config import CONFIG_FILE
from p2pfl.protocol.byzantine import ATTACKS

STEPS = 300
TOLERANCE = 0.03
DATA = "digits:part={i}/2,alpha=10,seed=1"
"""Near-IID halves: the honest node loses no class it cannot learn alone by shutting the
liar out, so the comparison measures the attack, not the lost data."""


def pair(
    tmp_path: Path, attack: str, protocol: str = "dynamic:timeout=5", steps: int = STEPS
) -> list[Daemon]:
    """An honest daemon (index 0) training ``steps`` steps of ``protocol`` and its peer
    (index 1), training until stopped and lying with ``attack`` if given."""
    ports = free_ports(2)
    daemons = [Daemon(tmp_path / f"{attack or 'honest'}{i}", i, ports[i], "") for i in range(2)]
    for d in daemons:
        other = daemons[1 - d.index]
        (d.home / CONFIG_FILE).write_text(
            f'listen = "/ip4/127.0.0.1/tcp/{d.port}"\nbootstrap = ["{other.addr}"]\n'
            f'data = "{DATA.format(i=d.index)}"\nprotocol = "{protocol}"\n'
            f"steps = {steps if d.index == 0 else 0}\n"
            "batch_size = 16\nlr = 0.1\nseed = 1\nstep_interval = 0.05\n"
            + (f'byzantine = "{attack}"\n' if attack and d.index == 1 else "")
        )
    return daemons


def final_statuses(tmp_path: Path, attacks: list[str]) -> dict[str, dict]:
    """Run one pair per attack ("" for an honest peer) side by side to the end; the honest
    daemon's last status by attack, with its accuracy trained alone as ``alone``."""
    pairs = {attack: pair(tmp_path, attack) for attack in attacks}
    try:
        # the peers first, so the honest node's whole run overlaps with them; at once, so
        # neither trains far alone (a peer far ahead is a stranger: its models are clipped
        # and the pair hardly syncs, honest or not)
        for daemons in pairs.values():
            for d in reversed(daemons):
                d.start()
        for honest, _ in pairs.values():
            # 600 s: 16 processes start at once; a fresh-clone CI at load 10-12 had one still
            # without its control socket after 300 s
            honest.wait_status(lambda s: s["done"], timeout=600)
        time.sleep(0.5)  # let a session in flight settle
        statuses = {attack: honest.status() for attack, (honest, _) in pairs.items()}
        for attack, (_, peer) in pairs.items():
            assert not attack or "this node lies to its peers" in peer.log()
    finally:
        for daemons in pairs.values():
            for d in daemons:
                d.stop()
    for attack, status in statuses.items():
        status["alone"] = alone_accuracy(pairs[attack][0], STEPS)
        print(
            f"{attack or 'honest'}: {status['test_accuracy']:.3f} (alone {status['alone']:.3f}) "
            f"{status['core_stats']}"
        )
    return statuses


@pytest.fixture(scope="module")
def statuses(tmp_path_factory) -> dict[str, dict]:
    found = final_statuses(tmp_path_factory.mktemp("pairs"), ["", *ATTACKS])
    honest = found[""]  # an honest pair syncs, and is no worse for it
    assert honest["syncs"] >= 5 and honest["test_accuracy"] >= honest["alone"] - TOLERANCE
    return found


SIGNFLIP_OPEN = pytest.mark.xfail(
    reason="not always met (issue 11): a sign-flipping lone liar first drags both models "
    "toward zero, so its distance shrinks as an honest stranger's does and it is judged "
    "only once that stops; measured 0.922 against 0.919 alone, and 0.864 against 0.922; on "
    "6c354a9 three runs 0.187, 0.340, 0.889 against 0.933, 0.919, 0.903 (the simulator's pair "
    "misses on 18 of 20 seeds; docs/byzantine.md, Not reached)",
    strict=False,
)


@pytest.mark.slow
@pytest.mark.parametrize(
    "attack", [pytest.param(a, marks=SIGNFLIP_OPEN) if a == "signflip" else a for a in ATTACKS]
)
def test_a_lying_peer_cannot_move_an_honest_daemon_by_more_than_3_points(statuses, attack):
    status = statuses[attack]
    assert status["test_accuracy"] >= status["alone"] - TOLERANCE, (attack, status)
    stats = status["core_stats"]
    if attack in ("signflip", "scale", "noise"):
        assert stats["clipped"] > 0  # the lies were seen and bounded, not missed
    if attack in ("flood", "fake-average"):
        assert stats["refused_peer"] > 0  # its flood of sessions was refused
