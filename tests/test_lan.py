"""Nodes find each other on a LAN with mDNS: three network namespaces on one bridge, made
and removed by the test; two nodes announce themselves, the third runs with mDNS off."""

from __future__ import annotations

import time

import pytest
from netns import lan, netns_or_skip, run_in
from test_daemon_network import Daemon

from p2pfl.daemon.config import CONFIG_FILE
from p2pfl.daemon.lan import is_lan_listen_addr

PORT = 4001


def test_mdns_runs_only_for_lan_listen_addresses():
    assert not is_lan_listen_addr("/ip4/127.0.0.1/tcp/0")
    assert not is_lan_listen_addr("/ip6/::1/tcp/0")
    assert is_lan_listen_addr("/ip4/0.0.0.0/tcp/4001")
    assert is_lan_listen_addr("/ip4/192.168.1.20/tcp/4001")


@pytest.mark.slow
def test_nodes_on_a_lan_find_each_other_with_mdns(tmp_path):
    netns_or_skip()
    with lan(3) as members:
        daemons = []
        for i, (namespace, address) in enumerate(members):
            d = Daemon(tmp_path / f"n{i}", i, PORT, "")
            (d.home / CONFIG_FILE).write_text(
                f'listen = "/ip4/{address}/tcp/{PORT}"\ndata = "digits:part={i}/3"\n'
                f'protocol = "dynamic"\nmdns = {"false" if i == 2 else "true"}\n'
                "dashboard_port = 0\nstep_interval = 0.1\n"
            )
            d.prefix = run_in(namespace)
            daemons.append(d)
        a, b, quiet = daemons
        try:
            for d in daemons:
                d.start()
            a.wait_status(lambda s: b.peer_id in s["peers"], timeout=240)
            b.wait_status(lambda s: a.peer_id in s["peers"], timeout=60)
            time.sleep(3)
            assert quiet.status()["peers"] == [] and quiet.peer_id not in a.status()["peers"]
            heard = [line for line in a.log().splitlines() if "from mdns" in line]
            assert any(b.peer_id in line and members[1][1] in line for line in heard), heard
        finally:
            for d in daemons:
                d.stop()
