"""The round-trip wait every core uses: learnt from answers, backed off after silence, and
what lets slow links (a busy daemon, a home router) merge at all."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kit import VirtualNet, complete

from p2pfl.protocol.round_trip import MAX_WAIT_S, RoundTrip


def test_without_samples_the_wait_is_the_configured_timeout() -> None:
    assert RoundTrip(0.5).wait == 0.5


def test_fast_answers_keep_the_configured_floor() -> None:
    rt = RoundTrip(0.5)
    for _ in range(20):
        rt.sample(0.01)
    assert rt.wait == 0.5


def test_slow_answers_stretch_the_wait_beyond_them() -> None:
    rt = RoundTrip(0.5)
    for _ in range(50):
        rt.sample(0.8)
    assert rt.wait == pytest.approx(1.0, rel=0.05)  # 0.8 and a quarter of it
    rt.sample(2.0)  # a slower one widens the margin
    assert rt.wait > 2.0


def test_expiry_doubles_the_wait_until_a_fresh_answer() -> None:
    rt = RoundTrip(0.5)
    rt.expired()
    assert rt.wait == 1.0
    rt.expired()
    assert rt.wait == 2.0
    rt.sample(0.1)
    assert rt.wait == 0.5


@given(st.lists(st.one_of(st.floats(allow_nan=True), st.just("expired")), max_size=60))
def test_the_wait_is_always_between_the_floor_and_the_cap(events: list) -> None:
    rt = RoundTrip(0.25)
    for event in events:
        if event == "expired":
            rt.expired()
        else:
            rt.sample(event)
        assert 0.25 <= rt.wait <= MAX_WAIT_S


@pytest.mark.parametrize("spec", ["dynamic:delta=0.01,b=1", "gossip:b=2"])
def test_links_slower_than_the_timeout_still_merge(spec: str) -> None:
    """One-way latency 0.4 s (a round trip of 0.8 s) against a 0.5 s timeout: with a fixed
    wait every session or exchange timed out and nobody ever merged."""
    net = VirtualNet(f"{spec},timeout=0.5", complete(3), latency=0.4, step_scale=0.5)
    for t in range(400):
        net.advance(t * 0.05)
        for node in net.nodes:
            net.step(node)
    net.settle()
    assert net.stat("syncs") > 0
    waits = [core.round_trip.wait for core in net.cores.values()]
    assert all(w > 0.8 for w in waits), waits
