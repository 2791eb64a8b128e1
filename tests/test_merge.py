"""Merge rules and what a lying peer can do to a core: hypothesis checks of every rule
(permutation invariance, agreement with the mean when nobody lies, bounded influence of one
outlier), clipping, the member's check of an ``Average``, per-peer session rates, neighbour
admission and the byzantine wrappers."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from p2pfl.learning.merge import FEW_PAIRS, clip_around, distances_to, merge
from p2pfl.learning.rules import RULES, MergeRule
from p2pfl.protocol.actions import ReplaceModel, Send
from p2pfl.protocol.byzantine import (
    ATTACKS,
    FLOODING,
    Attackers,
    ByzantineCore,
    parse_byzantine,
)
from p2pfl.protocol.config import parse_protocol
from p2pfl.protocol.core import NodeCore, make_core
from p2pfl.protocol.dynamic import IDLE_SESSION_WAITS, MERGED_RADIUS
from p2pfl.protocol.trust import PeerProgress
from p2pfl.spec import SpecError
from p2pfl.wire.messages import Average, Busy, ModelReply, Pull, Push

DIM = 6
ROBUST = [MergeRule(r, f=1) for r in RULES if r not in ("uniform", "samples")]
finite = st.floats(-100, 100, allow_nan=False, width=32)


def groups(min_size: int = 1, max_size: int = 7):
    """Lists of flat float32 vectors of one size."""
    return st.lists(
        st.lists(finite, min_size=DIM, max_size=DIM), min_size=min_size, max_size=max_size
    ).map(lambda rows: [torch.tensor(r, dtype=torch.float32) for r in rows])


@settings(max_examples=150, deadline=None)
@given(groups(), st.randoms(use_true_random=False), st.sampled_from(RULES))
def test_every_rule_ignores_the_order_of_the_models(vectors, rnd, rule):
    samples = [1 + i for i in range(len(vectors))]
    order = list(range(len(vectors)))
    rnd.shuffle(order)
    shuffled = merge([vectors[i] for i in order], [samples[i] for i in order], rule)
    torch.testing.assert_close(merge(vectors, samples, rule), shuffled, atol=1e-3, rtol=1e-5)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(finite, min_size=DIM, max_size=DIM),
    st.integers(1, 9),
    st.sampled_from(ROBUST + [MergeRule("uniform")]),
)
def test_every_rule_agrees_with_the_mean_when_nobody_lies(center, n, rule):
    """Honest nodes that agree: every rule returns their common model. Symmetric honest
    spread around it: every rule returns the centre (the mean)."""
    c = torch.tensor(center)
    torch.testing.assert_close(merge([c] * n, [1] * n, rule), c)
    spread = torch.randn(DIM, generator=torch.Generator().manual_seed(n))
    pairs = [c + spread, c - spread] * n + [c]
    torch.testing.assert_close(merge(pairs, [1] * len(pairs), rule), c, atol=1e-4, rtol=1e-4)


@settings(max_examples=150, deadline=None)
@given(groups(min_size=4, max_size=8), st.lists(finite, min_size=DIM, max_size=DIM))
def test_one_outlier_moves_a_robust_rule_at_most_within_the_honest_range(honest, liar):
    """With one liar among ≥ 4 models, median, trimmed mean and (multi-)Krum stay inside the
    honest models' coordinate range (Krum: inside their convex hull's box), however far the
    lie is. The lie is farther from every honest model than twice their spread: a "liar"
    closer to the honest majority than an honest outlier is one multi-Krum rightly keeps
    (hypothesis found one: three zero models, one at 79 on one coordinate, a lie at 78 on
    another)."""
    stacked = torch.stack(honest)
    low, high = stacked.min(0).values, stacked.max(0).values
    far = torch.tensor(liar) * 1e4
    spread = float(torch.cdist(stacked, stacked).max())
    assume(float(torch.cdist(far[None], stacked).min()) > 2 * spread)
    for rule in ROBUST:
        got = merge([*honest, far], [1] * (len(honest) + 1), rule)
        assert bool(((got >= low - 1e-3) & (got <= high + 1e-3)).all()), rule.rule


@settings(max_examples=150, deadline=None)
@given(groups(min_size=2, max_size=6), st.floats(0.01, 50))
def test_clipping_bounds_what_any_one_model_can_do_to_the_mean(vectors, bound):
    own, others = vectors[0], vectors[1:]
    clipped, count = clip_around(own, others, bound)
    assert count == sum(float(torch.linalg.vector_norm(v - own)) > bound for v in others)
    for v, c in zip(others, clipped, strict=True):
        assert float(torch.linalg.vector_norm(c - own)) <= bound * (1 + 1e-5) + 1e-5
        if float(torch.linalg.vector_norm(v - own)) <= bound:
            torch.testing.assert_close(c, v)
    # a lie of any size moves the uniform mean of n models by at most bound / n
    n = len(vectors)
    honest = merge([own, *clipped], [1] * n)
    lied, _ = clip_around(own, [*others[:-1], others[-1] * 1e6 + 1e6], bound)
    moved = float(torch.linalg.vector_norm(merge([own, *lied], [1] * n) - honest))
    assert moved <= 2 * bound / n * (1 + 1e-4) + 1e-3


def test_rules_by_hand():
    a, b, c, d = (torch.tensor([x, 0.0]) for x in (1.0, 2.0, 3.0, 100.0))
    torch.testing.assert_close(merge([a, b, c, d], [1] * 4, "median"), torch.tensor([2.5, 0.0]))
    trimmed = merge([a, b, c, d], [1] * 4, MergeRule("trimmed", trim=0.25))
    torch.testing.assert_close(trimmed, torch.tensor([2.5, 0.0]))
    torch.testing.assert_close(merge([a, b, c, d], [1] * 4, "krum"), b)  # the most central
    multi = merge([a, b, c, d], [1] * 4, MergeRule("multikrum", f=1))
    torch.testing.assert_close(multi, torch.tensor([2.0, 0.0]))  # the 3 best: a, b, c


def test_merge_keys_in_every_protocol_spec():
    for kind in ("periodic:b=4", "gossip", "dynamic", "continuous"):
        config = parse_protocol(f"{kind}{',' if ':' in kind else ':'}merge=krum,f=2,clip=0")
        assert config.merge == MergeRule("krum", trim=0.2, f=2, clip=0.0)
    assert parse_protocol("dynamic").merge == MergeRule()  # uniform, clipped at κ=3
    for bad, fragment in [
        ("dynamic:merge=mode", "merge must be one of"),
        ("dynamic:clip=inf", "clip must be finite"),
        ("periodic:trim=0.6", "trim is the fraction"),
    ]:
        with pytest.raises(SpecError, match=fragment):
            parse_protocol(bad)


# -- cores under attack --
class FakeModel:
    def __init__(self, w: torch.Tensor) -> None:
        self.w = w.clone()

    def read(self) -> torch.Tensor:
        return self.w

    @property
    def samples(self) -> int:
        return 10


def vec(x: float) -> torch.Tensor:
    return torch.full((DIM,), x)


def replaced(actions):
    return next(a.params for a in actions if isinstance(a, ReplaceModel))


def test_member_refuses_an_average_beyond_what_it_and_the_protocol_vouch_for():
    model = FakeModel(vec(1.0))
    core = make_core("m", parse_protocol("dynamic:delta=0.01,b=1,correction=0"), model, ["c"])
    core.on_message(0.0, "c", Pull(7))
    reference = core.reference.clone()
    # τ = 3·max(own displacement 0, √Δ 0.1) = 0.3: an average beyond it is refused (our
    # model, reference and correction stay); with no vouched peers to compare with, the
    # member does not lower the coordinator's trust yet
    assert core.on_message(0.1, "c", Average(7, vec(1e6), 3)) == []
    assert core.trust["c"] == 1.0 and core.stats.refused_peer == 1
    torch.testing.assert_close(core.reference, reference)
    got = model.w
    assert core.stats.clipped == 1
    # an honest average within the bound is adopted as it is
    model.w = got + 0.05  # the model moved (by more than √Δ/2): the next pull is taken
    assert isinstance(core.on_message(1.0, "c", Pull(8))[0].message, ModelReply)
    close = model.w + 0.01
    torch.testing.assert_close(replaced(core.on_message(1.1, "c", Average(8, close, 3))), close)


def test_a_coordinator_merges_replies_within_twice_the_radius_a_member_adopts_whole():
    """τ = 3·√Δ = 0.3 here. A coordinator takes a reply 0.45 away (one model among the
    group's moves the average by a third of that) whole and keeps trusting its sender; a
    member refuses an ``Average`` 0.45 away from what it sent from a coordinator it never
    heard from (it would move by all of it; one it knows is checked at 2τ as well, see
    ``test_a_member_adopts_a_known_coordinators_honest_average_under_label_skew``); a
    reply beyond 2τ is clipped to 2τ."""
    far = torch.zeros(DIM)
    far[0] = 0.45
    model = FakeModel(vec(1.0))
    coordinator = make_core("c", parse_protocol("dynamic:delta=0.01,b=1,correction=0"), model, [])
    coordinator.neighbors = {"a", "b"}
    coordinator._start_session(0.0)
    sid = coordinator.session.id
    coordinator.on_message(0.1, "a", ModelReply(sid, vec(1.0) + far, 10, [], 3))
    out = coordinator.on_message(0.1, "b", ModelReply(sid, vec(1.0), 10, [], 3))
    average = next(a.message.params for a in out if isinstance(a, Send))
    torch.testing.assert_close(average, vec(1.0) + far / 3)
    assert coordinator.stats.clipped == 0 and coordinator.trust["a"] == 1.0
    member = make_core("m", parse_protocol("dynamic:delta=0.01,b=1,correction=0"), model, ["c"])
    member.on_message(0.0, "c", Pull(7))
    assert member.on_message(0.1, "c", Average(7, vec(1.0) + far, 3)) == []
    assert member.stats.refused_peer == 1
    beyond = make_core("c", parse_protocol("dynamic:delta=0.01,b=1,correction=0"), model, [])
    beyond.neighbors = {"a"}
    beyond._start_session(0.0)
    out = beyond.on_message(0.1, "a", ModelReply(beyond.session.id, vec(1.0) + 4 * far, 10, [], 3))
    average = next(a.message.params for a in out if isinstance(a, Send))
    torch.testing.assert_close(average, vec(1.0) + far / 0.45 * 0.6 / 2)
    assert beyond.stats.clipped == 1


def test_a_flooding_coordinator_is_refused_until_the_member_has_moved():
    model = FakeModel(vec(1.0))
    core = make_core("m", parse_protocol("dynamic:delta=0.04,b=1"), model, ["c"])
    assert isinstance(core.on_message(0.0, "c", Pull(1))[0].message, ModelReply)
    core.on_message(0.1, "c", Busy(1))  # released
    again = core.on_message(0.2, "c", Pull(2))
    assert isinstance(again[0].message, Busy) and core.stats.refused_peer == 1
    model.w = model.w + 0.1 / math.sqrt(DIM)  # moved √Δ/2 = 0.1
    assert isinstance(core.on_message(0.3, "c", Pull(3))[0].message, ModelReply)


def test_a_node_that_stopped_training_still_serves_a_peer_now_and_then():
    """Its own moves no longer time the peer (it does not move): one session per peer every
    IDLE_SESSION_WAITS round-trip waits (a restarted peer is served, a flood is not)."""
    model = FakeModel(vec(1.0))
    core = make_core("m", parse_protocol("dynamic:delta=0.04,b=1"), model, ["c"])
    for t in range(1, 5):
        core.on_local_step(t * 0.01)  # then training ends
    assert isinstance(core.on_message(1.0, "c", Pull(1))[0].message, ModelReply)
    core.on_message(1.1, "c", Busy(1))
    idle_gap = IDLE_SESSION_WAITS * core.round_trip.wait
    assert isinstance(core.on_message(1.0 + idle_gap / 2, "c", Pull(2))[0].message, Busy)
    assert isinstance(core.on_message(1.0 + idle_gap, "c", Pull(3))[0].message, ModelReply)
    assert core.stats.refused_peer == 1


def test_gossip_takes_one_push_per_peer_per_period_and_none_from_strangers():
    model = FakeModel(vec(0.0))
    core = make_core("r", parse_protocol("gossip:b=4,clip=0"), model, ["a"])
    for t in range(1, 9):
        core.on_local_step(t * 0.01)  # our step time: 0.01 s, so a gap of 4·0.01/2 s
    assert core.on_message(0.1, "x", Push(-1, vec(9.0), 1)) == []  # not a neighbour
    assert replaced(core.on_message(0.1, "a", Push(-1, vec(2.0), 1)))[0] == 1.0
    assert core.on_message(0.11, "a", Push(-1, vec(2.0), 1)) == []
    assert core.stats.refused_peer == 1
    assert core.on_message(0.13, "a", Push(-1, vec(2.0), 1))


def test_connecting_does_not_make_a_peer_a_neighbour():
    core = make_core("n", parse_protocol("dynamic"), FakeModel(vec(1.0)), ["a"], max_neighbors=2)
    core.on_peer_up(0.0, "b")
    core.on_peer_up(0.0, "c")  # over max_neighbors: connected, but not a neighbour
    assert core.neighbors == {"a", "b"}
    closed = make_core("n", parse_protocol("dynamic"), FakeModel(vec(1.0)), ["a"])
    closed.on_peer_up(0.0, "b")
    assert closed.neighbors == {"a"}


# -- byzantine wrappers --
def test_parse_byzantine():
    assert parse_byzantine("").count == 0
    assert parse_byzantine("3:fake-average") == parse_byzantine(" 3:FAKE-AVERAGE ")
    for bad, fragment in [("3", "K:ATTACK"), ("x:flood", "K:ATTACK"), ("2:nice", "unknown attack")]:
        with pytest.raises(SpecError, match=fragment):
            parse_byzantine(bad)
    with pytest.raises(SpecError, match="leaves no honest node"):
        parse_byzantine("4:flood", nodes=4)
    chosen = parse_byzantine("3:flood").choose(16, seed=5)
    assert chosen == parse_byzantine("3:noise").choose(16, seed=5) and len(set(chosen)) == 3
    assert Attackers(parse_byzantine("3:flood"), 16, 5).honest(16).sum() == 13


@pytest.mark.parametrize("attack", ATTACKS)
def test_each_attack_lies_as_documented(attack):
    model = FakeModel(vec(2.0))
    core = make_core("0", parse_protocol("dynamic:delta=1e9,b=1"), model, ["1"])
    liar = ByzantineCore(core, attack, seed=1)
    if attack == "silent":  # the core it wraps answers a pull (a reply, then Busy); it does not
        assert not [a for a in liar.on_message(0.0, "1", Pull(5)) if isinstance(a, Send)]
        assert [a for a in core.on_message(0.0, "1", Pull(6)) if isinstance(a, Send)]
        assert not [a for a in liar.on_message(0.0, "1", Pull(7)) if isinstance(a, Send)]
        return
    reply = liar.on_message(0.0, "1", Pull(5))[0].message
    sent = reply.params
    expected = {"signflip": vec(-2.0), "scale": vec(2000.0), "replay": vec(2.0)}
    if attack in expected:
        torch.testing.assert_close(sent, expected[attack])
    elif attack == "noise":
        assert not torch.equal(sent, vec(2.0))
        assert float(torch.linalg.vector_norm(sent - vec(2.0))) < 10 * float(sent.norm())
    else:
        torch.testing.assert_close(sent, vec(2.0))  # the floods reply honestly
    # floods claim a violation at every check even with Δ = 1e9; honest liars do not
    liar.on_message(0.1, "1", Busy(5))
    pulls = [a for a in liar.on_local_step(1.0) if isinstance(a, Send)]
    assert bool(pulls) == (attack in FLOODING)
    if pulls:
        sid = pulls[0].message.session
        answer = ModelReply(sid, vec(4.0), 10, [], 1)
        out = liar.on_message(1.1, "1", answer)
        average = next(a.message for a in out if isinstance(a, Send))
        want = vec(-3.0) if attack == "fake-average" else vec(3.0)
        torch.testing.assert_close(average.params, want)
    assert liar.stats is core.stats  # everything else is the honest core's
    model.w = vec(5.0)
    if attack == "replay":
        later = liar.on_message(2.0, "2", Pull(9))
        replies = [a.message for a in later if isinstance(a, Send)]
        torch.testing.assert_close(replies[0].params, vec(2.0))  # still the stale model


def test_signflip_against_a_clipped_merge_moves_an_honest_node_by_a_bounded_amount():
    """One sign-flipping neighbour among three in a periodic round: the honest node's merge
    moves by at most τ/4 from the honest neighbours' merge."""
    honest = {"a": vec(1.0), "b": vec(1.1), "c": vec(0.9)}
    spec = dataclasses.replace(parse_protocol("periodic:b=1"))

    def round_with(liar_params):
        model = FakeModel(vec(1.0))
        core = make_core("0", spec, model, list(honest) + ["z"])
        out = core.on_local_step(0.0)
        for peer, params in [*honest.items(), ("z", liar_params)]:
            out = core.on_message(0.001, peer, Push(1, params, 10)) or out
        return replaced(out)

    clean = round_with(vec(1.0))
    lied = round_with(vec(-1e6))
    tau = 3 * 0.1 * math.sqrt(DIM)  # κ · median peer distance (0.1 per coordinate)
    assert float(torch.linalg.vector_norm(lied - clean)) <= tau / 4 * 1.01


# -- per-peer trust ------------------------------------------------------------------------
def periodic_round(core, model, peers, step):
    """One periodic round of ``core`` at ``step`` with ``peers`` (name -> params); returns
    the merged model (which becomes ``model``)."""
    out = core.on_local_step(float(step))
    for peer, params in peers.items():
        out = core.on_message(step + 0.001, peer, Push(step, params, 10)) or out
    model.w = replaced(out)
    return model.w


def judged_periodic_core(model: FakeModel, neighbors: list[str]) -> NodeCore:
    """A periodic core (b=1, no correction) that judges trust, as dynamic does."""
    core = make_core("0", parse_protocol("periodic:b=1,correction=0"), model, neighbors)
    core._clip_floor = lambda: 1e-9  # a protocol bound on honest distances, as dynamic's √Δ
    return core


def test_a_peer_clipped_again_and_again_loses_its_pull_geometrically():
    """A liar beyond τ every round: its pull on the merge shrinks by DECAY a round, while
    the honest peers keep their full trust; the sum of everything it ever moved us stays
    below one τ/n."""
    model = FakeModel(vec(1.0))
    core = judged_periodic_core(model, ["a", "b", "z"])
    pulls = []
    for step in range(1, 9):
        model.w = model.w + 0.05  # a local step: the displacement that sizes τ
        own = model.w.clone()
        honest = {"a": own + 0.05, "b": own - 0.05}
        clean = (own + honest["a"] + honest["b"] + own) / 4  # the liar's model clipped to own
        got = periodic_round(core, model, {**honest, "z": -1e6 * own}, step)
        pulls.append(float(torch.linalg.vector_norm(got - clean)))
    assert core.trust["a"] == core.trust["b"] == 1.0 and core.trust["z"] < 1e-4
    # the first round vouches for the honest peers; from the second on the liar is judged
    judged = pulls[1:]
    assert all(b <= a * 0.26 + 1e-6 for a, b in zip(judged, judged[1:], strict=False))
    tau = 3 * 0.05 * math.sqrt(DIM)  # κ · (own displacement = the peers' distances)
    assert sum(judged) <= tau / 4 * (1 / 3) * 1.01


def test_liars_that_are_most_of_a_nodes_peers_cannot_inflate_the_clip_bound():
    """Two of three neighbours send ×1000 models from the first round on: their distances
    never enter τ's median (they were never within τ). In the first round, with no peer
    vouched for yet, they are clipped but not judged; from then on they lose their trust,
    and τ stays within a small factor of what the honest peer and the protocol allow
    (unguarded, their 3,000·‖w‖ distances would have set it)."""
    model = FakeModel(vec(1.0))
    core = judged_periodic_core(model, ["a", "y", "z"])
    bounds = []
    for step in range(1, 7):
        model.w = model.w + 0.1  # a local step: the displacement that sizes τ
        before = model.w.clone()
        bounds.append(core.clip_bound(before))
        periodic_round(core, model, {"a": before + 0.1, "y": before * 1e3, "z": before * 1e3}, step)
    assert core.trust["a"] == 1.0 and core.trust["y"] < 0.01 and core.trust["z"] < 0.01
    assert max(bounds) <= 3 * bounds[0] and bounds[-1] <= bounds[2] * 1.01


def test_a_lone_peer_is_judged_once_it_stops_closing_in():
    """A node whose only peer is beyond τ has nobody vouched for to compare it with. A
    peer that started elsewhere but comes closer model after model (an honest stranger)
    keeps its trust; one whose distance does not shrink (a liar: ×1000 models) loses it
    from its second model on."""
    for peer, lie, kept in (("stranger", None, True), ("liar", 1e3, False)):
        model = FakeModel(vec(1.0))
        core = judged_periodic_core(model, [peer])
        far = vec(40.0)
        for step in range(1, 6):
            model.w = model.w + 0.05  # a local step: the displacement that sizes τ
            own = model.w.clone()
            far = own * lie if lie else far + (own - far) * 0.2  # closing in on us
            periodic_round(core, model, {peer: far}, step)
        assert core.stats.clipped == 5
        assert (core.trust[peer] == 1.0) is kept, (peer, core.trust[peer])
    assert core.trust["liar"] <= 0.25**3


def test_distances_in_one_operation_equal_each_pair_measured_alone():
    """``distances_to`` stacks the pairs (or broadcasts one side): bit for bit the norms of
    each pair on its own, so a merge's decisions do not change."""
    gen = torch.Generator().manual_seed(5)
    for size in (1, 7, 4810):
        for count in range(1, 6):
            vectors = list(torch.randn(count, size, generator=gen) * 3)
            one = torch.randn(size, generator=gen)
            for to in ([one], [one] * count, list(torch.randn(count, size, generator=gen))):
                alone = [
                    float(torch.linalg.vector_norm(v - t))
                    for v, t in zip(vectors, to * count if len(to) == 1 else to, strict=True)
                ]
                assert distances_to(vectors, to) == alone
            assert distances_to([one], vectors) == [
                float(torch.linalg.vector_norm(one - v)) for v in vectors
            ]


def test_distances_of_many_pairs_with_shared_sides_equal_each_pair_alone():
    """Beyond ``FEW_PAIRS`` pairs, runs that share a side are subtracted with it broadcast
    (a merge's pairs: each peer from us, each peer's progress, ours, our displacement) and a
    pair that repeats is measured once: bit for bit each pair on its own, whatever the runs,
    and mixed dtypes still measured."""
    gen = torch.Generator().manual_seed(6)
    for size, k in ((1, 4), (7, 5), (4810, 6), (4810, 12)):
        peers = list(torch.randn(k, size, generator=gen))
        own, anchor = torch.randn(size, generator=gen), torch.randn(size, generator=gen)
        theirs = list(torch.randn(k, size, generator=gen))
        ours = list(torch.randn(k, size, generator=gen))
        cases = [
            ([*peers, *peers, *[own] * k, own], [*[own] * k, *theirs, *ours, anchor]),
            ([*peers, own, *peers], [*theirs, anchor, *[anchor] * k]),
            ([own, *peers, own, own], [anchor, *theirs, *ours[:2]]),
            (peers + theirs, ours + ours),
            ([*peers, *[own] * k], [*theirs, *([ours[0], ours[1]] * k)[:k]]),  # repeated pairs
            (peers + peers, theirs + theirs),
            ([p.half() for p in peers] + theirs, ours + ours),  # mixed dtypes: stacked
        ]
        for vectors, to in cases:
            alone = [
                float(torch.linalg.vector_norm(v - t)) for v, t in zip(vectors, to, strict=True)
            ]
            assert len(vectors) > FEW_PAIRS
            assert distances_to(vectors, to) == alone


# -- progress: a stale model earns no pull ----------------------------------------------------
def share(progress: PeerProgress, peer: str, model: torch.Tensor, own: torch.Tensor) -> float:
    """One peer's share, asked alone."""
    return progress.shares([peer], [model], own)[0]


def test_a_peer_earns_its_radius_by_moving_as_we_do():
    """``PeerProgress.shares``: a peer's first model is measured from our origin, later ones
    from its previous one; a replayed model earns nothing once we moved on, an honest peer
    moving as far as we do keeps its whole radius, one moving half as far half of it."""
    origin = vec(0.0)
    progress = PeerProgress(8, origin)
    own = vec(1.0)
    assert share(progress, "stale", origin + 0.01, own) == pytest.approx(0.01)
    assert share(progress, "honest", own + 0.1, own) == 1.0  # a newcomer as far on as we are
    own = own + 0.5
    assert share(progress, "stale", origin + 0.01, own) == 0.0  # the same model again
    assert share(progress, "honest", own + 0.1, own) == 1.0
    assert share(progress, "slow", own, own) == 1.0
    own = own + 0.5
    assert share(progress, "slow", own - 0.25, own) == pytest.approx(0.5)
    # two messages at one time (our model did not move since): the first verdict stands
    assert share(progress, "stale", origin + 0.01, own) == 0.0
    assert share(progress, "slow", own + 7.0, own) == pytest.approx(0.5)


def test_progress_remembers_a_bounded_number_of_peers():
    progress = PeerProgress(2, vec(0.0))
    for peer in "abc":
        share(progress, peer, vec(1.0), vec(1.0))
    assert list(progress._last) == ["b", "c"]


def test_progress_of_several_peers_at_once_equals_asking_one_by_one():
    """A merge asks for all its peers' shares in one call: the same shares and the same
    table (incl. which peers the bound drops within the call) as asking for each in turn."""
    gen = torch.Generator().manual_seed(3)
    for remembered in (2, 3, 8):
        batched, single = PeerProgress(remembered, vec(0.0)), PeerProgress(remembered, vec(0.0))
        own = vec(0.0)
        for step in range(12):
            peers = [f"p{(step * 2 + i) % 5}" for i in range(1 + step % 4)]
            models = torch.randn(len(peers), DIM, generator=gen)
            if step % 3 == 2:
                models[0] = 0.0  # a model back at our origin
            if step % 4 != 3:  # sometimes our model does not move between two merges
                own = own + torch.randn(DIM, generator=gen)
            one_by_one = [share(single, p, m, own) for p, m in zip(peers, models, strict=True)]
            assert batched.shares(peers, list(models), own) == one_by_one
            assert list(batched._last) == list(single._last)


def test_a_replayed_model_never_pulls_a_merge_back():
    """A periodic node with an honest peer and one that sends the node's initial model
    every round: from the first round on (measured from where the node started) the replayed
    model counts as the node's own model (no pull back) and is counted as clipped, the
    honest peer never is; the node trains on past it (plain clipping kept it within τ for
    ever: it dragged the node back)."""
    model = FakeModel(vec(1.0))
    core = make_core("0", parse_protocol("periodic:b=1,correction=0"), model, ["a", "z"])
    stale = vec(1.0)
    for step in range(1, 6):
        model.w = model.w + 0.1  # a local step
        own = model.w.clone()
        honest = own + 0.02
        got = periodic_round(core, model, {"a": honest, "z": stale}, step)
        torch.testing.assert_close(got, (own + honest + own) / 3)
    assert core.stats.clipped == 5
    assert core.trust["z"] == 1.0  # close, so never distrusted: progress alone shut it out


def test_a_member_refuses_a_replayed_average_but_learns_from_a_merge_with_a_stale_reply():
    """A dynamic member refuses an ``Average`` that repeats what its coordinator sent
    before (its lack of progress clipped it); a coordinator whose merge had a stale reply
    clipped for its lack of progress still learns its drift correction (the stale model
    counts as its own, no poison in it), unlike one clipped beyond its trusted radius."""
    model = FakeModel(vec(1.0))
    core = make_core("m", parse_protocol("dynamic:delta=0.01,b=1"), model, ["c"])
    stale = vec(1.0)
    core.on_message(0.0, "c", Pull(1))
    core.on_message(0.1, "c", Average(1, stale, 3))  # first: judged from our origin
    model.w = model.w + 0.05  # moved past √Δ/2: the next pull is taken
    core.on_message(1.0, "c", Pull(2))
    assert core.on_message(1.1, "c", Average(2, stale, 3)) == []
    assert core.stats.refused_peer == 1 and core.stats.clipped == 1
    # the coordinator's side: a stale reply is clipped, the correction still learns
    for t in range(1, 4):
        model.w = model.w + 0.05
        core.on_local_step(float(t))
    core._start_session(5.0)
    sid = core.session.id
    out = core.on_message(5.1, "c", ModelReply(sid, stale, 10, [], 3))
    assert core.stats.clipped == 2 and core.correction is not None
    assert any(isinstance(a, Send) and isinstance(a.message, Average) for a in out)


def _member_of_two_sessions(local: float, jump: float) -> tuple[FakeModel, NodeCore, torch.Tensor]:
    """A dynamic member (Δ = 0.01, so τ = 3·√Δ = 0.3; degree 4, so n = 5) that adopted
    coordinator c's average ``first``, moved ``local`` by its own steps, adopted d's average
    lying ``jump`` away, and took 0.05 of steps more, each move along its own unit axis
    (0-3): ``(model, core, first)``."""
    unit = torch.eye(DIM)
    model = FakeModel(vec(1.0))
    spec = parse_protocol("dynamic:delta=0.01,b=1,correction=0")
    core = make_core("m", spec, model, ["c", "d", "e", "f"])
    core.on_message(0.0, "c", Pull(1))
    first = vec(1.0) + 0.02 * unit[0]
    model.w = replaced(core.on_message(0.1, "c", Average(1, first, 3)))
    model.w = model.w + local * unit[1]  # local steps (under label skew: client drift)
    core.on_message(1.0, "d", Pull(2))
    model.w = replaced(core.on_message(1.1, "d", Average(2, model.w + jump * unit[2], 3)))
    model.w = model.w + 0.05 * unit[3]
    return model, core, first


def test_a_member_adopts_an_honest_average_that_moved_less_than_it_did():
    """Sessions every few steps (small Δ): a member moves by its local steps' noise and by
    jumps onto other coordinators' averages, while an honest coordinator's next average, a
    mean of its group's models, moves about 1/√n as far (the noise averages out) and never
    made our jumps. Its share is measured from the average we adopted last (our model right
    after adopting it) with √n allowed for the pooling (n: our degree + 1): the average is
    adopted (today's rule, from what we sent then, gave it a fifth of the radius and
    refused it). The same average again, a replay, is still refused."""
    unit = torch.eye(DIM)
    model, core, first = _member_of_two_sessions(local=0.05, jump=0.1)
    sent = model.w.clone()
    core.on_message(2.0, "c", Pull(3))
    honest = first + (sent - first) / 5  # our reply among five models near ``first``
    # τ = 3·√Δ = 0.3; the average lies 0.098 from what we sent
    torch.testing.assert_close(replaced(core.on_message(2.1, "c", Average(3, honest, 3))), honest)
    assert core.stats.refused_peer == 0
    model.w = model.w + 0.05 * unit[4]
    core.on_message(3.0, "c", Pull(4))
    assert core.on_message(3.1, "c", Average(4, honest, 3)) == []  # replayed
    assert core.stats.refused_peer == 1


def test_a_member_adopts_a_known_coordinators_honest_average_under_label_skew():
    """Label skew: a member moves by its client drift and its jumps onto other groups'
    averages, while its coordinator's next average moves only by what the group learnt
    (0.18-0.28 as far on Dirichlet 0.1), and it can lie farther than τ from what the member
    sent. An average of n models with ours among them moves at least 1/n as far as we did
    (our own share): it earns its whole radius there, and a coordinator the member knows is
    checked at the radius it merged the member's reply at (2τ). Before, both of these
    honest averages were refused (a share of √5/5 of the radius; 1.5τ away), and every
    refusal in an honest network broke its session's zero sum and lowered the coordinator's
    trust: a cascade on Dirichlet 0.1. A replay, exact or with a 1e-4 relative change, is
    still refused."""
    unit = torch.eye(DIM)
    model, core, first = _member_of_two_sessions(local=0.08, jump=0.15)  # n = 5, τ = 0.3
    sent = model.w.clone()
    core.on_message(2.0, "c", Pull(3))
    moved = float((sent - first).norm())
    honest = first + moved / 5 * unit[4]  # our share of it, the rest of the group still
    assert float((honest - sent).norm()) > math.sqrt(5) / 5 * 0.3  # the old radius
    torch.testing.assert_close(replaced(core.on_message(2.1, "c", Average(3, honest, 3))), honest)
    model.w = honest + 0.06 * unit[5]
    sent = model.w.clone()
    core.on_message(3.0, "c", Pull(4))
    far = sent + 0.45 * unit[0]  # 1.5τ
    torch.testing.assert_close(replaced(core.on_message(3.1, "c", Average(4, far, 3))), far)
    assert core.stats.refused_peer == 0 and core.trust["c"] == 1.0
    noise = torch.randn(DIM, generator=torch.Generator().manual_seed(0))
    for sid, lie in ((5, far), (6, far + 1e-4 * float(far.norm()) * noise / noise.norm())):
        model.w = model.w + 0.06 * unit[sid - 4]
        core.on_message(float(sid), "c", Pull(sid))
        assert core.on_message(sid + 0.1, "c", Average(sid, lie, 3)) == []
    assert core.stats.refused_peer == 2


def test_a_member_never_adopts_a_sign_flipped_average_of_a_coordinator_it_refused_before():
    """A ``fake-average`` peer (a node's only peer: no median of other peers' distances
    sizes τ) coordinates a session with a member that merged nothing since it started, so
    τ = 3·s with ``s`` the member's displacement since then. Its first sign-flipped average
    (``2||w||`` from what the member sent) is refused at τ. Its second comes once the member
    trained alone far enough that it fits 2τ = 6s: a coordinator known only from a refused
    model earns no 2τ, so it is refused too (it was adopted, and the honest daemon ended at
    0.245 against 0.930 trained alone, CI on a912145)."""
    unit = torch.eye(DIM)
    start = vec(5.0 / math.sqrt(DIM))  # ||w|| 5 at the start, as the daemons' model
    model = FakeModel(start)
    core = make_core("m", parse_protocol("dynamic:delta=0.01,b=1"), model, ["c"])
    model.w = start + 1.5 * unit[0]  # trained alone
    core.on_message(0.0, "c", Pull(1))
    assert core.on_message(0.1, "c", Average(1, -model.w, 3)) == []  # 10.4 from it, τ = 4.5
    model.w = start + 2.5 * unit[0]  # trained on: s = 2.5, τ = 7.5
    sent = model.w.clone()
    core.on_message(1.0, "c", Pull(2))
    flipped = -sent
    assert 3 * 2.5 < float((flipped - sent).norm()) < MERGED_RADIUS * 3 * 2.5  # 11.2
    assert core.on_message(1.1, "c", Average(2, flipped, 3)) == []
    assert core.stats.refused_peer == 2 and core.stats.syncs == 0
    torch.testing.assert_close(model.w, sent)


def test_a_dynamic_coordinator_learns_the_liars_update_so_the_honest_ones_sum_to_zero():
    """A dynamic coordinator's merge with a model far beyond its sender's trusted radius
    still teaches the drift correction, and its lesson takes the liar's (clipped) update
    in the liar's place: the members learn ``sent - average`` from the average, so the
    coordinator's update and the honest member's sum to zero, as in a session without a
    liar. (With the lie standing at our own model in the lesson they did not: 3 liars of
    16 cost 5.1 (noise) and 6.7 (signflip) points at 1,000 steps; about the correction's
    whole gain.)"""
    own = torch.linspace(-1.0, 1.0, DIM)
    core = make_core("0", parse_protocol("dynamic:delta=0.5,b=1"), FakeModel(own), ["a", "z"])
    honest = own + 0.01
    merged, lesson = core._merge(own, 10, {"a": (honest, 10), "z": (-50.0 * own, 10)})
    assert core.stats.clipped == 1
    lie = 3 * merged - own - honest  # the liar's model as clipped into the merge
    assert float((lie - own).norm()) < 50.0 * float(own.norm())  # clipped
    torch.testing.assert_close(lesson, merged - (lie - merged))
    torch.testing.assert_close(
        (own - lesson) + (honest - merged), torch.zeros(DIM), atol=1e-6, rtol=0
    )


def test_a_merge_measured_in_one_operation_decides_as_one_measured_pair_by_pair(monkeypatch):
    """``NodeCore._clip`` measures every distance of a merge (each peer's, our displacement,
    the peers' progress and ours) in one tensor operation: the same merged models, clip
    counts, trust and progress tables as measuring each pair alone, for a dynamic core
    (trust judged, liars among honest peers, peers coming and going) and a periodic one."""
    import p2pfl.protocol.core as core_module

    def pair_by_pair(vectors, to):
        to = list(to) * len(vectors) if len(to) == 1 else list(to)
        vectors = list(vectors) * len(to) if len(vectors) == 1 else list(vectors)
        return [float(torch.linalg.vector_norm(v - t)) for v, t in zip(vectors, to, strict=True)]

    gen = torch.Generator().manual_seed(11)
    for spec in ("dynamic:delta=0.5,b=1,correction=0", "periodic:b=1,correction=0"):
        runs = []
        for measure in (core_module.distances_to, pair_by_pair):
            monkeypatch.setattr(core_module, "distances_to", measure)
            gen.manual_seed(11)
            own = torch.randn(DIM, generator=gen)
            core = make_core("0", parse_protocol(spec), FakeModel(own), list("abcdz"))
            merged = []
            for step in range(30):
                own = own + 0.1 * torch.randn(DIM, generator=gen)
                peers = list("abcdz")[step % 3 : 2 + step % 4]
                models = {p: own + 0.2 * torch.randn(DIM, generator=gen) for p in peers}
                if "z" in models:
                    models["z"] = -50.0 * own  # a liar
                got, lesson = core._merge(own, 10, {p: (m, 10) for p, m in models.items()})
                merged.append((got, lesson))
            progress = [(p, float(last[2])) for p, last in core.progress._last.items()]
            runs.append((merged, core.stats.clipped, dict(core.trust._trust), progress))
        (merged_a, *rest_a), (merged_b, *rest_b) = runs
        assert rest_a == rest_b and rest_a[0] > 0
        for (a, la), (b, lb) in zip(merged_a, merged_b, strict=True):
            assert torch.equal(a, b) and (la is None) == (lb is None)
            assert la is None or torch.equal(la, lb)


def test_the_mean_of_a_pair_is_the_stacked_mean_bit_for_bit():
    """``merge`` averages a pair (gossip) without stacking it: bit for bit the same."""
    gen = torch.Generator().manual_seed(2)
    for size in (1, 7, 4810):
        for scale in (1e-3, 1.0, 1e3):
            a, b = torch.randn(2, size, generator=gen) * scale
            assert torch.equal(merge([a, b], [1, 1]), torch.stack([a, b]).mean(0))
