"""A node behind NAT is reached through a circuit relay. The test builds the networks:
three namespaces on one LAN (the relay, another node, and a home router), and a fourth on a
private network behind that router, which masquerades it (iptables) and drops every
connection opened from outside. Everything is removed at the end."""

from __future__ import annotations

import pytest
from netns import behind_nat, can_connect, lan, lan_interface, nat_or_skip, run_in
from test_daemon_network import Daemon

from p2pfl.daemon.config import CONFIG_FILE
from p2pfl.daemon.peer_exchange import PeerExchangeError, check_tcp_addr

PORT = 4001
RELAY = "12D3KooWKbubyjcsGJXV8JRWJ2xMRMy3WXhAwrQSy9y6tgP4AxHu"


def test_circuit_addresses_travel_in_peer_exchange():
    circuit = f"/ip4/203.0.113.7/tcp/4001/p2p/{RELAY}/p2p-circuit"
    assert check_tcp_addr(circuit) == circuit
    for bad in (f"/ip4/203.0.113.7/tcp/4001/p2p/{RELAY}", "/ip4/1.2.3.4/tcp/1/p2p-circuit"):
        with pytest.raises(PeerExchangeError):
            check_tcp_addr(bad)


def config(address: str, extra: str = "") -> str:
    return (
        f'listen = "/ip4/{address}/tcp/{PORT}"\nprotocol = "dynamic"\nmdns = false\n'
        f"dashboard_port = 0\nstep_interval = 0.1\n{extra}"
    )


@pytest.mark.slow
def test_a_node_behind_nat_is_reached_through_a_relay(tmp_path):
    nat_or_skip()
    with lan(3) as members:
        (relay_ns, relay_ip), (other_ns, other_ip), (router_ns, _) = members
        # the home network cannot reach the other node directly either (else the home node
        # might dial it first, outbound through the NAT, and the relayed path would not be
        # taken): the relay is the only path between them, in either direction
        with behind_nat(router_ns, lan_interface(2), [other_ip]) as (home_ns, home_ip):
            relay = Daemon(tmp_path / "relay", 0, PORT, "")
            home = Daemon(tmp_path / "home", 1, PORT, "")
            other = Daemon(tmp_path / "other", 2, PORT, "")
            relay_addr = f"/ip4/{relay_ip}/tcp/{PORT}/p2p/{relay.peer_id}"
            (relay.home / CONFIG_FILE).write_text(config(relay_ip, "relay_service = true\n"))
            # target_degree = 1: the home node dials nobody but its relay, so the connection
            # between it and the other node can only be opened from outside, through the relay
            (home.home / CONFIG_FILE).write_text(
                config(home_ip, f'relay = ["{relay_addr}"]\ntarget_degree = 1\n')
            )
            (other.home / CONFIG_FILE).write_text(
                config(other_ip, f'bootstrap = ["{relay_addr}"]\n')
            )
            for d, ns in ((relay, relay_ns), (home, home_ns), (other, other_ns)):
                d.prefix = run_in(ns)
            # the NAT works: nobody reaches in; the home node does not reach the other node
            assert not can_connect(other_ns, home_ip, PORT)
            assert not can_connect(home_ns, other_ip, PORT)
            try:
                for d in (relay, home, other):
                    d.start()
                home.wait_status(lambda s: relay.peer_id in s["peers"], timeout=240)
                other.wait_status(lambda s: home.peer_id in s["peers"], timeout=180)
                home.wait_status(lambda s: other.peer_id in s["peers"], timeout=30)
                assert f"reachable at {relay_addr}/p2p-circuit" in home.log()
                # neither can open a TCP connection to the other: theirs runs over the relay
                assert not can_connect(other_ns, home_ip, PORT)
                assert not can_connect(home_ns, other_ip, PORT)
            finally:
                for d in (relay, home, other):
                    d.stop()
