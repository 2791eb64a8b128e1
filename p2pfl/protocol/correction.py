"""Drift correction: one mechanism every merging protocol uses on every merge.

Under non-IID data each local model drifts steadily toward its own data; that costs accuracy
and, for dynamic averaging, triggers syncs that carry no news. After each merge a node adds

    g(K) · (w_sent − merged) / (η · K)

to a per-node vector the learner adds to every gradient (SCAFFOLD in spirit, from quantities
the node already has, no extra bytes): ``w_sent`` is the model it contributed, ``merged``
the plain merge of the group (before any outer step), ``K`` the local steps the merged
models took since their previous merge and ``η`` the mean step size over those ``K`` steps
(``NodeCore.mean_step_size``; under a decaying learning-rate schedule the current step size
would overstate the offset by the ratio of the mean rate to the current one, and after a
long quiet stretch that ratio is large). It is an integral controller: it
learns the constant offset between the node's gradient and its group's. The gain ``g(K)``
is ``λ`` for merges up to ``CORRECTION_STEPS`` steps apart, and for rarer ones what
``K / CORRECTION_STEPS`` merges of gain ``λ`` would have compounded to, so the offset is
learned at the same pace in steps for merges at least ``CORRECTION_STEPS`` apart.

**One pace for every interval** (``pace=1``, off by default). With it the compounding holds
below ``CORRECTION_STEPS`` too, ``g(K) = 1 − (1 − λ)^(K/CORRECTION_STEPS)``: a merge ``K``
steps after the previous one learns less than ``λ``. A lesson of ``K`` steps carries SGD
noise of variance ∝ ``1/K``, so at one pace per step the noise a node integrates per step
does not depend on how often it merges; with ``λ`` per merge the bursts of frequent merges
after a concept drift learn up to ``CORRECTION_STEPS / K`` times faster per step, integrate
the transient's noise into a bias per node and set the models apart when they settle again.
It depends only on ``K``, which the group shares, so the zero sums below hold. It wins on
the IID streams and costs early training under label skew, where learning the offset fast
from the first frequent merges pays (docs/fair-comparison.md, "The correction's pace").

**Lesson agreement** (``agreement=H``, off by default). On IID data there is no offset to
learn: each lesson is the mean SGD noise of ``K`` steps, independent from one merge to the
next, and a fixed gain integrates it into a persistent random bias per node that drives the
models apart (a dynamic network then syncs more for nothing). With ``agreement=H`` each node
keeps an exponential mean, memory ``H`` merges, of the cosine between its successive lessons
(``LessonAgreement``), clamped to [0, 1], and scales every gain by it: lessons that keep
pointing the same way (an offset not learnt yet: label skew, or data that just changed) are
learnt at up to the full gain, uncorrelated ones hardly at all; once an offset is learnt the
residual lessons are noise again and the correction holds still. The factor a merge learns
with is **shared by the group**: the mean of the factors the members told each other
(``ModelReply``/``Push`` carry the sender's, ``Average`` the coordinator's mean of its
group's), so the zero sums below hold with it. A peer's factor is clamped to [0, 1]: it can
at most restore the fixed gain or freeze the group's learning for one merge.

**What it preserves.** With one ``K`` shared by everyone whose merge used the same vectors,
and a uniform merge, the updates of a group sum to ``g/(ηK) · Σ (w_i − mean) = 0``: the mean
gradient stays unbiased. Per schedule:

* ``dynamic``: a session's members all adopt the same average with the group's mean step
  count sent along: the updates sum to zero over every session in which every member adopts
  it. A member that does not (it refused the average as beyond its coordinator's trusted
  radius, or left the session before it came) keeps its correction while the others learn
  theirs: on the fresh stream at ``rel=0.0002`` the corrections' sum grew to a third of
  their summed norms within 1,000 steps, all of it the refusers' missing updates, and
  dragged every model (docs/fair-comparison.md, "Long changing streams"). With
  ``dynamic:stand_in=1`` such a member tells its coordinator (``Busy``), which learns that
  member's update in its place (``DynamicCore._take_over``): the sum stays zero. (A
  coordinator whose merge had a model beyond its trusted radius learns with that model at
  its own, and stands in for nobody.)
* ``gossip`` (pairwise exchange): both ends of an exchange merge the same two vectors with
  ``K = b``: the two updates cancel exactly, on any graph.
* ``periodic``/``continuous``: every node merges its own closed neighbourhood (``K = b``).
  ``Σ_i (w_i − mean of N[i])`` is zero when every neighbourhood has the same size (a
  regular graph, or a complete one) but **not** on a non-regular graph, where the global
  mean of the corrections (and of the models) drifts toward the high-degree nodes.
* A sample-weighted or robust merge breaks the zero sum for every schedule.

**A floor for rare merges** (``floor=S`` with ``agreement=H``, off by default). The
agreement needs successive lessons, and merges hundreds of steps apart give few: learnt at
a factor that starts at 0 and climbs by ``1/H`` per merge, the offset of label skew is never
learnt before the run ends (Dirichlet 0.1, periodic b=500: 0.527 against 0.819 with the fixed
gain). A lesson of ``K`` steps averages ``K`` steps of SGD noise, so the noise a fixed gain
integrates from it shrinks with ``K`` while an offset does not. With ``floor=S`` a merge
``K`` steps after the previous one learns at least ``1 − S/K`` of the fixed gain
(``rare_floor``): nothing more for merges up to ``S`` steps apart (the frequent merges of a
stream, where the agreement keeps the noise out), nearly the fixed gain for rare ones. It
depends only on ``K``, which the group shares, so the zero sums below hold with it.

**Against the lessons' mean** (``against=mean`` with ``agreement=H``, off by default). The
cosine between two successive lessons is small whenever each is mostly noise, even if they
share an offset: with frequent merges under label skew (``K`` small, each lesson's noise
large) the agreement stays low and the offset is learnt slowly (Dirichlet 0.1, dynamic at
``rel=0.005``: 0.951 with ``agreement=4,floor=16`` against 0.959 with the fixed gain). With
``against=mean`` each lesson is compared with the exponential mean (memory ``H`` merges) of
the earlier ones, whose noise has averaged out: a shared offset shows at about the square
root of the cosine of two lessons, while independent noise still gives a cosine near 0
(the mean of noise is as unrelated to the next lesson as one lesson is). ``boost=k`` scales
the factor by ``k`` before the clamp to [0, 1]: an offset read through noise then reaches the
fixed gain sooner, noise (cosine near 0) stays near 0.

With the lesson agreement on, a session's members all use the factor the ``Average``
carries (a coordinator standing in for a member uses the same one), and both ends of a
gossip exchange the mean of the two factors they told each other: the sums stay zero. A
periodic round uses the mean over the node's closed neighbourhood, the same group everywhere
only on a complete graph: on any other graph the factors of neighbouring nodes differ a
little and the sum drifts slightly, as it does on non-regular graphs.
"""

from __future__ import annotations

from typing import Any

import torch

from p2pfl.protocol.actions import SetCorrection

CORRECTION_STEPS = 16


def rare_floor(floor: int, steps: int) -> float:
    """The least agreement factor a merge after ``steps`` local steps learns with under
    ``floor=S`` (``1 − S/steps``, never below 0; 0 when ``floor`` is 0: no floor)."""
    return max(0.0, 1.0 - floor / steps) if floor else 0.0


def correction_gain(lam: float, steps: int, pace: bool = False) -> float:
    """The gain of a merge after ``steps`` local steps: what ``steps / CORRECTION_STEPS``
    merges of gain ``lam`` would have compounded to, and at least ``lam`` unless ``pace``."""
    merges = steps / CORRECTION_STEPS
    return 1.0 - (1.0 - lam) ** (merges if pace else max(1.0, merges))


class DriftCorrection:
    """One node's gradient correction (``None`` until its first update); see the module
    docstring. ``lam = 0`` turns it off. ``agreement = H > 0`` scales every gain by how much
    the node's successive lessons agree (``LessonAgreement``, memory ``H`` merges), with
    ``floor = S`` at least ``rare_floor(S, K)`` of it, with ``against = "mean"`` each lesson
    compared with the earlier lessons' mean, with ``boost = k`` the factor times ``k``;
    ``pace`` learns at one pace per step below ``CORRECTION_STEPS`` too (``correction_gain``)."""

    def __init__(
        self,
        lam: float,
        agreement: int = 0,
        floor: int = 0,
        against: str = "last",
        boost: float = 1.0,
        pace: bool = False,
    ) -> None:
        self.lam = lam
        self.pace = pace
        self.vector: torch.Tensor | None = None
        self.agreement = LessonAgreement(agreement, against, boost) if agreement else None
        self.floor = floor

    def update(
        self,
        sent: torch.Tensor,
        merged: torch.Tensor,
        steps: int,
        step_size: float,
        factor: float | None = None,
        observe: bool = True,
    ) -> list[SetCorrection]:
        """Learn from one merge after ``steps`` local steps of mean size ``step_size``;
        returns the action that hands the new vector to the learner (nothing when off or
        after zero steps). With the lesson agreement on, the gain is scaled by ``factor``
        (the group's shared one; None: this node's own, ``self.factor``; at least the rare
        merges' floor), and the lesson is
        folded into the agreement unless ``observe`` is false (a lesson learnt in a
        member's place)."""
        if not self.lam or steps <= 0:
            return []
        gain = correction_gain(self.lam, steps, self.pace)
        if self.agreement is None:
            change = (sent - merged).mul_(gain / (step_size * steps))  # scaled in place: fresh
        else:
            told = self.factor if factor is None else min(1.0, max(0.0, factor))
            gain *= max(told, rare_floor(self.floor, steps))
            lesson = (sent - merged).div_(step_size * steps)
            if observe:
                self.agreement.observe(lesson)
            change = lesson.mul_(gain)
        # A new tensor each time, never modified in place: the learner copies what it is
        # handed, so the action may share it.
        self.vector = change if self.vector is None else self.vector + change
        return [SetCorrection(self.vector)]

    @property
    def factor(self) -> float:
        """This node's gain factor for its next lesson (1 with the agreement off)."""
        return 1.0 if self.agreement is None else self.agreement.factor

    def shared(self) -> float | None:
        """What this node tells the peers it merges with (``agreement`` of ``ModelReply``,
        ``Average`` and ``Push``): its factor, or None with the agreement off."""
        return None if self.agreement is None else self.agreement.factor

    def group_factor(self, *peers: float | None, own: float | None = None) -> float | None:
        """The factor a merge with peers that told ``peers`` learns with: the mean of ours
        (``own``, what we told them; None: our factor now) and theirs (a peer that told none
        is left out), the same at every member of a group that merges the same vectors, so
        their updates still sum to zero; None when off."""
        if self.agreement is None:
            return None
        told = [min(1.0, max(0.0, p)) for p in peers if p is not None]
        mine = self.agreement.factor if own is None else own
        return (mine + sum(told)) / (1 + len(told))

    def state_dict(self) -> dict[str, Any]:
        state = {"correction": None if self.vector is None else self.vector.clone()}
        return state if self.agreement is None else state | self.agreement.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        vector = state.get("correction")
        self.vector = None if vector is None else vector.clone()
        if self.agreement is not None:
            self.agreement.load_state_dict(state)


class LessonAgreement:
    """How much a node's successive lessons agree: an exponential mean (memory ``horizon``
    merges) of the cosine between each lesson and the previous one (``against="mean"``: the
    exponential mean of the earlier lessons, memory ``horizon``), times ``boost``, clamped
    to [0, 1].

    A steady offset between a node's gradient and its group's (label skew) gives lessons that
    point the same way until the correction has learnt it; SGD noise on IID data gives
    lessons that are independent from one merge to the next (cosine near 0), which a fixed
    gain would integrate into a persistent random bias. Scaling the gain by the agreement
    learns the first and ignores the second; once an offset is learnt the residual lessons
    are noise again and the correction holds still until the data change."""

    def __init__(self, horizon: int, against: str = "last", boost: float = 1.0) -> None:
        self.rate = 1.0 / horizon
        self.against_mean = against == "mean"
        self.boost = boost
        self.mean_cosine = 0.0
        self.previous: torch.Tensor | None = None
        """What the next lesson is compared with: the last lesson, or the lessons' mean."""

    @property
    def factor(self) -> float:
        return min(1.0, max(0.0, self.boost * self.mean_cosine))

    def observe(self, lesson: torch.Tensor) -> None:
        """Fold in ``lesson``'s cosine with the previous one (or the earlier lessons' mean)."""
        if self.previous is None:
            self.previous = lesson.clone()
            return
        cosine = float(torch.nn.functional.cosine_similarity(lesson, self.previous, dim=0))
        self.mean_cosine += self.rate * (cosine - self.mean_cosine)
        if self.against_mean:
            self.previous = self.previous + self.rate * (lesson - self.previous)
        else:
            self.previous = lesson.clone()

    def state_dict(self) -> dict[str, Any]:
        previous = None if self.previous is None else self.previous.clone()
        return {"agreement_mean_cosine": self.mean_cosine, "agreement_previous": previous}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean_cosine = float(state.get("agreement_mean_cosine", 0.0))
        previous = state.get("agreement_previous")
        self.previous = None if previous is None else previous.clone()
