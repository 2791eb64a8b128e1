"""Mini-batch sampling shared by all learners, so that per-node and batched training see
exactly the same batches for the same seed."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from p2pfl.data.datasets import FreshSamples


class NodeDataBank:
    """Every node's training set, padded into one ``[nodes, max_n, features]`` tensor.

    Batches are drawn with replacement (uniform over the node's own samples), one row of
    indices per node, from one seeded generator. During a gradual concept drift each drawn
    sample carries its label under the next concept with probability ``share`` (see
    :meth:`set_labels`). A bank may hold a range of a larger simulation's nodes (a shard): it
    then draws the numbers of every node stepping in the whole simulation and uses its own
    (``window``), so its batches equal the whole simulation's.

    With ``fresh`` (a data stream) a drawn sample only picks a class and a label: its features
    are a new draw of that class from ``fresh``, so no sample is ever seen twice and each node
    keeps its own class mix. Labels follow the concept of the stored sample's class (drift by
    label permutation), set as usual with :meth:`set_labels`.
    """

    def __init__(
        self,
        xs: Sequence[torch.Tensor],
        ys: Sequence[torch.Tensor],
        batch_size: int,
        seed: int,
        fresh: FreshSamples | None = None,
    ) -> None:
        if not xs or len(xs) != len(ys):
            raise ValueError("need one (x, y) pair per node")
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.fresh = fresh
        self.replace_all(xs, ys)

    def replace_all(self, xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> None:
        """Swap every node's data (e.g. after concept drift); shapes may change."""
        counts = [len(y) for y in ys]
        if min(counts) < 1:
            raise ValueError("every node needs at least one training sample")
        width = max(counts)
        features = xs[0].shape[1]
        self.x = torch.zeros(len(xs), width, features)
        self.y = torch.zeros(len(ys), width, dtype=torch.long)
        for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
            self.x[i, : len(y)] = x
            self.y[i, : len(y)] = y
        self.counts = torch.tensor(counts)
        self.classes = self.y  # the original labels: the class a fresh sample is drawn from
        self.y_next: torch.Tensor | None = None
        self.share = 0.0

    def padded_labels(self, ys: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-node labels of the bank's samples (e.g. under another concept), padded like
        the bank: ``[nodes, max_n]``."""
        y = torch.zeros_like(self.y)
        for i, labels in enumerate(ys):
            if len(labels) != self.counts[i]:
                raise ValueError(f"node {i}: {len(labels)} labels for {self.counts[i]} samples")
            y[i, : len(labels)] = labels
        return y

    def set_labels(
        self, y: torch.Tensor, y_next: torch.Tensor | None = None, share: float = 0.0
    ) -> None:
        """Label samples with ``y`` (from :meth:`padded_labels`); with ``y_next``, each drawn
        sample takes its ``y_next`` label with probability ``share`` instead."""
        self.y, self.y_next, self.share = y, y_next, share

    @property
    def num_nodes(self) -> int:
        return len(self.counts)

    def skip(self, total: int) -> None:
        """Use up the numbers of ``total`` nodes of the whole simulation stepping while none
        of this bank's nodes do (``draw``'s window), so later draws stay in step."""
        torch.rand(total, self.batch_size, generator=self.generator)
        if self.fresh is not None:
            self.fresh.skip(total, self.batch_size, self.generator)
        if self.y_next is not None:
            torch.rand(total, self.batch_size, generator=self.generator)

    def draw(
        self,
        nodes: torch.Tensor,
        out: tuple[torch.Tensor, torch.Tensor] | None = None,
        window: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch for each listed node: ``x [k, batch, features]``, ``y [k, batch]``
        (written into ``out`` if given, e.g. to reuse memory from step to step). With
        ``window = (before, total)`` the listed nodes are rows ``before..before + k`` of
        ``total`` nodes stepping in the whole simulation."""
        before, total = (0, len(nodes)) if window is None else window
        rows = slice(before, before + len(nodes))
        u = torch.rand(total, self.batch_size, generator=self.generator)[rows]
        idx = (u * self.counts[nodes, None]).long()
        # Row of sample idx[k, j] of node nodes[k] in the flattened [nodes * max_n] bank.
        flat = idx.add_(nodes[:, None] * self.x.shape[1]).view(-1)
        features = self.x.shape[-1]
        x_out = y_out = None
        if out is not None:
            x_out, y_out = out[0].view(-1, features), out[1].view(-1)
        if self.fresh is None:
            x = torch.index_select(self.x.view(-1, features), 0, flat, out=x_out)
        else:
            classes = self.classes.view(-1)[flat].view(len(nodes), self.batch_size)
            x = self.fresh.draw(classes, rows, total, self.generator).view(-1, features)
            x = x if x_out is None else x_out.copy_(x)
        y = torch.index_select(self.y.view(-1), 0, flat, out=y_out)
        if self.y_next is not None:
            mix = torch.rand(total, self.batch_size, generator=self.generator)[rows]
            take = mix.reshape(-1) < self.share
            y[take] = self.y_next.view(-1)[flat[take]]
        return x.view(len(nodes), self.batch_size, features), y.view(len(nodes), self.batch_size)
