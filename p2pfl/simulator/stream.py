"""The task of a run as it changes, and how nodes are scored on it as it arrives.

The task changes: the data set's concept drift applied step by step to the
nodes' training data, the global test set and (with communities) the own objectives.

Samples never change, only their labels (see ``p2pfl.data.datasets``). Each concept's labels
are computed once, when the run first needs them. During a gradual transition training
batches mix the two concepts (``NodeDataBank.set_labels``) and accuracy on the global test
set is the expectation under that mixture: ``(1 - share)·acc(old) + share·acc(new)``. Own
objectives follow the majority concept.

Prequential evaluation (test-then-train, as in river and the online-learning literature):
every node scores each new batch before training on it; ``Prequential`` sums those scores,
and ``drift_recovery`` reads from a run's evaluation rows how each drift was absorbed.

Comparing protocols on a stream (``sim/stream.py``): ``bytes_at_accuracy`` reads what a
family of runs (the best fair baseline) needs for a given prequential accuracy, and
``closest_traffic`` picks the run to compare recovery with at equal traffic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from p2pfl.data import Dataset, NodeData
from p2pfl.data.datasets import DriftEvent, DriftState
from p2pfl.learning.learner import StepResult
from p2pfl.learning.sampler import NodeDataBank
from p2pfl.simulator.objectives import OwnObjectives


class ChangingTask:
    """Keeps the bank's labels, the test labels and the objectives at the run's current
    concept (a fixed task if the data set has no drift)."""

    def __init__(
        self,
        dataset: Dataset,
        nodes: Sequence[NodeData],
        bank: NodeDataBank,
        objectives: OwnObjectives | None,
    ) -> None:
        self.drift = dataset.drift
        self.dataset, self.nodes, self.bank, self.objectives = dataset, nodes, bank, objectives
        self.state = DriftState(0)
        self._train: dict[int, torch.Tensor] = {}
        self._test: dict[int, torch.Tensor] = {}
        self.test_labels: list[tuple[float, torch.Tensor]] = [(1.0, dataset.y_test)]

    def events(self, steps: int) -> list[DriftEvent]:
        """The drifts of a run of ``steps`` steps."""
        return [] if self.drift is None else self.drift.events(steps)

    def advance(self, step: int) -> bool:
        """Bring the task to simulation step ``step``; True if it changed."""
        if self.drift is None:
            return False
        state = self.drift.state(step)
        if state == self.state:
            return False
        if self.objectives is not None and _majority(state) != _majority(self.state):
            self._relabel_objectives(_majority(state))
        self.state = state
        if state.next is None:
            self.bank.set_labels(self._train_labels(state.concept))
            self.test_labels = [(1.0, self._test_labels(state.concept))]
        else:
            old, new = state.concept, state.next
            self.bank.set_labels(self._train_labels(old), self._train_labels(new), state.share)
            self.test_labels = [
                (1.0 - state.share, self._test_labels(old)),
                (state.share, self._test_labels(new)),
            ]
        return True

    def _train_labels(self, concept: int) -> torch.Tensor:
        if concept not in self._train:
            assert self.drift is not None
            ys = [self.drift.relabel(d.x_train, d.y_train, concept) for d in self.nodes]
            self._train[concept] = self.bank.padded_labels(ys)
        return self._train[concept]

    def _test_labels(self, concept: int) -> torch.Tensor:
        if concept not in self._test:
            assert self.drift is not None
            self._test[concept] = self.drift.relabel(
                self.dataset.x_test, self.dataset.y_test, concept
            )
        return self._test[concept]

    def _relabel_objectives(self, concept: int) -> None:
        assert self.drift is not None and self.objectives is not None
        relabel = self.drift.relabel
        drifted = [
            NodeData(
                d.x_train,
                relabel(d.x_train, d.y_train, concept),
                d.x_test,
                relabel(d.x_test, d.y_test, concept),
            )
            for d in self.nodes
        ]
        self.objectives.relabel(drifted, self.dataset.num_classes)


def _majority(state: DriftState) -> int:
    """The concept that labels most samples in ``state``."""
    return state.concept if state.next is None or state.share < 0.5 else state.next


@dataclass
class Prequential:
    """Prequential scores summed over node-steps."""

    correct: float = 0.0
    loss: float = 0.0
    node_steps: int = 0

    def add(self, result: StepResult) -> None:
        """Add the scores of one learner step (its nodes' batches, before training)."""
        self.correct += float(result.accuracy.sum())
        self.loss += float(result.loss.sum())
        self.node_steps += len(result.accuracy)

    @property
    def accuracy(self) -> float | None:
        """Mean accuracy over the node-steps (None before any)."""
        return self.correct / self.node_steps if self.node_steps else None

    @property
    def mean_loss(self) -> float | None:
        return self.loss / self.node_steps if self.node_steps else None


RECOVERY_SHARE = 0.9
"""A drift is absorbed once prequential accuracy is back at this share of its level before."""


def drift_recovery(
    rows: Sequence[dict[str, Any]], events: Sequence[DriftEvent], share: float = RECOVERY_SHARE
) -> list[dict[str, Any]]:
    """For each drift: the prequential accuracy and traffic (bytes per step) over the
    evaluation windows ending in the last quarter of the stretch before it (the settled
    network), the steps from the drift's start until an evaluation window that lies wholly
    after the transition is back at ``share`` of that accuracy (None: not before the next
    drift or the end of the run), and the prequential accuracy over the first quarter of
    the stretch after the drift (how much the drift cost, free of the evaluation grid)."""
    if not events:
        return []
    out = []
    previous = [0, *(e.step for e in events[:-1])]
    ends = [e.step for e in events[1:]] + [rows[-1]["step"] if rows else 0]
    # (row before, row): each row's prequential accuracy covers the steps in between
    windows = list(zip([{"step": 0, "bytes": 0}, *rows], rows, strict=False))
    for event, last_drift, end in zip(events, previous, ends, strict=True):
        start = event.step - (event.step - last_drift) // 4
        before = [(a, b) for a, b in windows if start < b["step"] <= event.step]
        level = _mean([b["prequential_accuracy"] for _, b in before])
        settled = None
        if before:
            first, last = before[0][0], before[-1][1]
            settled = (last["bytes"] - first["bytes"]) / max(1, last["step"] - first["step"])
        back = next(
            (
                b["step"]
                for a, b in windows
                if a["step"] >= event.step + event.width
                and b["step"] <= end
                and level is not None
                and (b["prequential_accuracy"] or 0.0) >= share * level
            ),
            None,
        )
        after = [
            b["prequential_accuracy"]
            for _, b in windows
            if event.step < b["step"] <= event.step + (end - event.step) // 4
        ]
        out.append(
            {
                "step": event.step,
                "concept": event.concept,
                "width": event.width,
                "prequential_before": level,
                "bytes_per_step_before": settled,
                "recovery_steps": None if back is None else back - event.step,
                "prequential_after": _mean(after),
            }
        )
    return out


def settled_traffic(rows: Sequence[dict[str, Any]], events: Sequence[DriftEvent]) -> float:
    """Bytes per step of a settled network: the traffic over the evaluation windows in the
    last quarter of every concept phase (the stretches before each drift and the one after
    the last), summed over the phases and divided by their steps."""
    if not rows:
        return 0.0
    starts = [0, *(e.step + e.width for e in events)]
    ends = [*(e.step for e in events), rows[-1]["step"]]
    sent = steps = 0
    windows = list(zip([{"step": 0, "bytes": 0}, *rows], rows, strict=False))
    for start, end in zip(starts, ends, strict=True):
        first = end - (end - start) // 4
        inside = [(a, b) for a, b in windows if a["step"] >= first and b["step"] <= end]
        if inside:
            sent += inside[-1][1]["bytes"] - inside[0][0]["bytes"]
            steps += inside[-1][1]["step"] - inside[0][0]["step"]
    return sent / steps if steps else 0.0


def bytes_at_accuracy(points: Sequence[tuple[float, float]], level: float) -> float | None:
    """The bytes a family of runs needs for accuracy ``level``, read off its frontier.

    ``points`` are (bytes, accuracy) of the family's runs (0 bytes: training alone). The
    frontier keeps the runs no cheaper run beats in accuracy; between two of them the bytes
    are interpolated linearly in log(bytes) (accuracy grows about linearly with the log of
    the traffic; linear in bytes would overstate what the family needs), from 0 bytes
    linearly. None: no run of the family reaches ``level``."""
    frontier: list[tuple[float, float]] = []
    for sent, accuracy in sorted(points, key=lambda p: (p[0], -p[1])):
        # the best run of each cost first; a run no more accurate than a cheaper one is off
        if not frontier or (sent > frontier[-1][0] and accuracy > frontier[-1][1]):
            frontier.append((sent, accuracy))
    if not frontier or level > frontier[-1][1]:
        return None
    if level <= frontier[0][1]:
        return frontier[0][0]
    for (b0, a0), (b1, a1) in zip(frontier, frontier[1:], strict=False):
        if a0 < level <= a1:
            t = (level - a0) / (a1 - a0)
            if b0 <= 0:
                return t * b1
            return math.exp(math.log(b0) + t * (math.log(b1) - math.log(b0)))
    raise AssertionError("unreachable: level lies within the frontier")


def closest_traffic(runs: Sequence[dict[str, Any]], sent: float) -> dict[str, Any] | None:
    """The run whose total bytes are closest to ``sent`` in ratio (equal traffic); of runs
    with the same bytes, the most accurate (prequentially)."""
    paying = [r for r in runs if r["bytes_sent"] > 0]
    if not paying or sent <= 0:
        return None
    return min(
        paying,
        key=lambda r: (abs(math.log(r["bytes_sent"] / sent)), -r["prequential_accuracy"]),
    )


def _mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None
