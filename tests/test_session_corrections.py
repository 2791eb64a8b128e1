"""With ``dynamic:stand_in=1`` the drift corrections of a session sum to zero even when a
member does not adopt the average: one that refuses it (beyond its coordinator's trusted
radius) or leaves the session before it arrives tells its coordinator (``Busy``), which
learns that member's update in its place. Without it the members that adopted learnt
one-sided updates, and on a stream with thousands of refusals the integrator summed them
into a bias that dragged every model (docs/fair-comparison.md, "Long changing streams").

Runs the cores in the kit's ``VirtualNet`` on a path 0 - 1 - 2: node 1 violates and pulls
both neighbours."""

from __future__ import annotations

import dataclasses

import networkx as nx
import pytest
import torch
from kit import VirtualNet

from p2pfl.protocol.config import parse_protocol
from p2pfl.spec import SpecError
from p2pfl.wire.messages import Average, Busy

DIM = 32
SPEC = "dynamic:condition=distance,stand_in=1"


def session(
    *, clip_member: bool = False, late_average: bool = False, liar: bool = False
) -> VirtualNet:
    """Node 1 coordinates a session with 0 and 2 after 8 steps. ``clip_member``: node 2
    clips (so it refuses an average far from its model); ``late_average``: the average
    reaches node 2 after its membership timed out; ``liar``: node 1 clips and node 2 replies
    with a model far beyond its radius."""
    graph = nx.path_graph(3)
    adjacency = {str(i): {str(j) for j in graph[i]} for i in graph}
    start = {str(i): torch.ones(DIM) for i in graph}
    net = VirtualNet(SPEC, adjacency, start, seed=0, latency=0.002, dim=DIM)
    if clip_member:
        core = net.cores["2"]
        core.config = dataclasses.replace(
            core.config, merge=dataclasses.replace(core.config.merge, clip=3.0)
        )
    if liar:
        core = net.cores["1"]
        core.config = dataclasses.replace(
            core.config, merge=dataclasses.replace(core.config.merge, clip=3.0)
        )
    if late_average:
        net.delay = lambda src, dst, m: 1e4 if isinstance(m, Average) and dst == "2" else None
    tiny = torch.zeros(DIM)
    for step in range(8):  # tiny distinct steps (within Δ) taken by each, then 1 jumps
        for node, sign in (("0", 1.0), ("2", -1.0)):
            tiny[step] = 1e-3 * sign
            net.step(node, tiny.clone())
            tiny[step] = 0.0
        if liar and step == 7:
            net.models["2"].w = 1e3 * torch.ones(DIM)  # its reply lies (no check of its own)
        net.step("1", torch.ones(DIM) if step == 7 else 2e-4 * torch.ones(DIM))
    net.settle()
    assert net.stat("sessions") == 1
    return net


def total(net: VirtualNet) -> torch.Tensor:
    return sum(net.corrections.values(), torch.zeros(DIM))


def test_corrections_of_a_session_everyone_adopts_sum_to_zero():
    net = session()
    assert net.stat("syncs") == 3 and len(net.corrections) == 3
    assert all(float(c.norm()) > 0 for c in net.corrections.values())
    torch.testing.assert_close(total(net), torch.zeros(DIM), atol=1e-6, rtol=0)


def test_corrections_sum_to_zero_when_a_member_refuses_the_average():
    net = session(clip_member=True)
    assert net.stat("refused_peer") == 1  # node 2 refused: no sync, no correction
    assert "2" not in net.corrections and net.stat("syncs") == 2
    torch.testing.assert_close(total(net), torch.zeros(DIM), atol=1e-6, rtol=0)
    assert net.stat("taken_over") == 1
    # the coordinator learnt node 2's update once: a repeated Busy changes nothing
    before = net.corrections["1"].clone()
    sid = next(m.session for _, _, _, m in net.sends(Busy, src="2", dst="1"))
    net.runtimes["1"].message(net.now, "2", Busy(sid))
    net.runtimes["1"].message(net.now, "0", Busy(sid + 1))  # nor one of an unknown session
    torch.testing.assert_close(net.corrections["1"], before, atol=0, rtol=0)
    assert net.stat("taken_over") == 1


def test_corrections_sum_to_zero_when_a_member_misses_the_average():
    net = session(late_average=True)
    assert net.stat("timeouts") == 1  # node 2 left the session before the average came
    assert "2" not in net.corrections and net.stat("syncs") == 2
    torch.testing.assert_close(total(net), torch.zeros(DIM), atol=1e-6, rtol=0)
    assert net.stat("taken_over") == 1


def test_stand_in_is_a_switch():
    assert not parse_protocol("dynamic").stand_in  # off by default
    assert parse_protocol("dynamic:stand_in=1").stand_in
    with pytest.raises(SpecError, match="stand_in"):
        parse_protocol("dynamic:stand_in=yes")
    with pytest.raises(SpecError, match="unknown argument"):
        parse_protocol("periodic:b=5,stand_in=1")


def test_a_liar_that_refuses_its_average_teaches_the_coordinator_nothing():
    """A session whose merge had a model beyond its sender's trusted radius is not one a
    coordinator stands in for: a liar that answers the average with ``Busy`` must not get
    its lie learnt into the coordinator's correction."""
    net = session(liar=True)
    assert net.cores["1"].stats.clipped >= 1
    before = net.corrections["1"].clone()
    sid = next(m.session for _, _, _, m in net.sends(Average, src="1", dst="2"))
    net.runtimes["1"].message(net.now, "2", Busy(sid))
    torch.testing.assert_close(net.corrections["1"], before, atol=0, rtol=0)
    assert net.stat("taken_over") == 0
