"""``BatchedLearner``: every node's parameters in one ``[nodes, params]`` tensor, trained
together: the simulator's fast path behind the ``Learner`` interface (``learner.py``), which
pins the update rule; ``test_learner.py`` pins it to ``PerNodeLearner``.

Plain ``Linear``/``ReLU`` stacks take a hand-written path (strided weight views, batched matrix
products, a backward pass written out); any other model goes through ``torch.func``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.func import functional_call

from p2pfl.learning.learner import (
    Learner,
    SGDConfig,
    StepResult,
    evaluating,
    predicted,
    score_logits,
)
from p2pfl.learning.params import ParamSchema
from p2pfl.learning.sampler import NodeDataBank

# ReLU's backward as autograd computes it (the gradient where the ReLU output is > 0, else 0),
# written into a given tensor.
_relu_backward_into = torch.ops.aten.threshold_backward.grad_input


class BatchedLearner(Learner):
    """All nodes' parameters in one ``[nodes, params]`` tensor, trained together.

    Two paths compute the same thing. Plain ``nn.Sequential`` stacks of ``Linear`` and
    ``ReLU`` layers (the built-in ``mlp`` and ``logistic``) take a hand-written fast path: the
    weights are strided views of the flat tensor, every layer is one batched matrix product
    (``torch.baddbmm``) with activations kept as ``[nodes, features, batch]``, and the
    backward pass and the SGD update are written out by hand (no autograd). Every other model
    goes through ``vmap`` over ``functional_call`` and one ``autograd.grad``.
    """

    def __init__(self, model: nn.Module, data: NodeDataBank, sgd: SGDConfig) -> None:
        self.schema = ParamSchema.from_module(model)
        self.data = data
        self.sgd = sgd
        self.template = copy.deepcopy(model).to("meta")
        self.params = self.schema.flatten(model).repeat(data.num_nodes, 1)
        self._param_rows, self._correction_rows = _RowViews(), _RowViews()
        self.buffers = {
            name: b.detach().unsqueeze(0).repeat(data.num_nodes, *[1] * b.dim())
            for name, b in model.named_buffers()
        }
        self.momentum = torch.zeros_like(self.params) if sgd.momentum else None
        self.corrections: torch.Tensor | None = None
        self.steps_taken = torch.zeros(data.num_nodes, dtype=torch.long)
        self._everyone = torch.arange(data.num_nodes)
        self._dense = _dense_plan(model, self.schema)
        self._scratch = _Scratch()
        # Fast path: nodes per block (weights and activations of a block stay in cache).
        self.block_nodes = 128
        self._forward = torch.vmap(self._forward_one)

    @property
    def fast(self) -> bool:
        """Whether this model trains on the hand-written ``Linear``/``ReLU`` fast path."""
        return self._dense is not None

    def _forward_one(
        self, flat: torch.Tensor, buffers: dict[str, torch.Tensor], x: torch.Tensor
    ) -> torch.Tensor:
        tensors = dict(zip(self.schema.names, self.schema.split(flat), strict=True))
        return functional_call(self.template, tensors | buffers, (x,))

    def _predict(
        self, params: torch.Tensor, buffers: dict[str, torch.Tensor], x: torch.Tensor
    ) -> torch.Tensor:
        """Generic-path predictions in eval mode (running statistics, no update)."""
        with evaluating([self.template]):
            return self._forward(params, buffers, x)

    def step(self, nodes: torch.Tensor, window: tuple[int, int] | None = None) -> StepResult:
        nodes = nodes.long()
        k, scratch = len(nodes), self._scratch
        if k == 0:
            return StepResult(torch.empty(0), torch.empty(0))
        lrs = self._next_lrs(nodes)
        if self._dense is not None:
            xb, yb = self.data.draw(
                nodes,
                out=(
                    scratch.get("x", (k, self.data.batch_size, self.data.x.shape[-1])),
                    scratch.get("y", (k, self.data.batch_size), torch.long),
                ),
                window=window,
            )
        else:
            xb, yb = self.data.draw(nodes, window=window)
        every = k == self.num_nodes and torch.equal(nodes, self._everyone)
        # Active rows: the stored tensors themselves, or gathered copies written back below.
        w, m, c = self.params, self.momentum, self.corrections
        if not every:
            w = torch.index_select(w, 0, nodes, out=scratch.get("w", (k, w.shape[1])))
            if m is not None:
                m = torch.index_select(m, 0, nodes, out=scratch.get("m", (k, m.shape[1])))
            if c is not None:
                c = torch.index_select(c, 0, nodes, out=scratch.get("c", (k, c.shape[1])))
        if self._dense is not None:
            # Blocks of nodes small enough for their weights and activations to stay in cache
            # through forward, backward and update (whole-tensor passes at 1,000 nodes are
            # memory-bound and almost twice as slow).
            size = self.block_nodes
            parts = [
                self._dense_step(
                    w[s : s + size],
                    None if m is None else m[s : s + size],
                    None if c is None else c[s : s + size],
                    xb[s : s + size],
                    yb[s : s + size],
                    lrs if isinstance(lrs, float) else lrs[s : s + size],
                )
                for s in range(0, k, size)
            ]
            result = (
                parts[0]
                if len(parts) == 1
                else StepResult(*(torch.cat(column) for column in zip(*parts, strict=True)))
            )
        else:
            buffers = self.buffers
            if not every:
                buffers = {name: b.index_select(0, nodes) for name, b in buffers.items()}
            result = self._generic_step(w, m, c, buffers, xb, yb, lrs)
            if not every:
                for name, b in buffers.items():
                    self.buffers[name].index_copy_(0, nodes, b)
        if not every:
            self.params.index_copy_(0, nodes, w)
            if self.momentum is not None and m is not None:
                self.momentum.index_copy_(0, nodes, m)
        return result

    def _update(
        self,
        w: torch.Tensor,
        grad: torch.Tensor,
        m: torch.Tensor | None,
        c: torch.Tensor | None,
        lr: float | torch.Tensor,
    ) -> None:
        """``v = momentum * v + (grad + correction + weight_decay * w); w -= lr * v``, in place
        (the order of ``torch.optim.SGD`` after the correction is added to the gradient);
        ``lr`` is one float or a ``[k, 1]`` column of per-node rates."""
        sgd = self.sgd
        if c is not None:
            grad.add_(c)
        if sgd.weight_decay:
            grad.add_(w, alpha=sgd.weight_decay)
        if m is not None:
            grad = torch.add(grad, m, alpha=sgd.momentum, out=m)  # one pass over m
        if isinstance(lr, float):
            w.sub_(grad, alpha=lr)
        else:
            w.addcmul_(grad, lr, value=-1.0)

    @torch.no_grad()
    def _dense_step(
        self,
        w: torch.Tensor,
        m: torch.Tensor | None,
        c: torch.Tensor | None,
        xb: torch.Tensor,
        yb: torch.Tensor,
        lr: float | torch.Tensor,
    ) -> StepResult:
        """Forward, cross-entropy and backward of a ``Linear``/``ReLU`` stack, by hand."""
        assert self._dense is not None
        k, batch = yb.shape
        # Large temporaries live in reused scratch tensors: allocating tens of MB afresh every
        # step costs more in page faults than the arithmetic at 1,000 nodes.
        scratch = self._scratch
        acts = [xb.transpose(1, 2)]  # [k, features, batch]
        for i, layer in enumerate(self._dense):
            out = scratch.get(f"a{i}", (k, layer.out_features, batch))
            acts.append(layer.forward(w, acts[-1], out))
        logp = acts[-1].log_softmax(1)  # [k, classes, batch]: fast along dim 1
        target = yb.unsqueeze(1)
        losses = logp.gather(1, target).squeeze(1).mean(1).neg_()
        accuracy = (predicted(logp) == yb).float().mean(1)  # prequential: before the update
        # d(mean cross-entropy)/d(logits) = (softmax - one_hot) / batch
        minus_one = torch.full_like(target, -1.0, dtype=logp.dtype)
        dz = logp.exp_().scatter_add_(1, target, minus_one).mul_(1.0 / batch)
        for i in range(len(self._dense) - 1, -1, -1):
            layer = self._dense[i]
            if layer.relu:
                _relu_backward_into(dz, acts[i + 1], 0.0, grad_input=dz)
            dh = None
            if i:  # the gradient of the layer's input, before the weights change
                dh = scratch.get(f"d{i}", (k, layer.in_features, batch))
                torch.bmm(layer.weight(w).transpose(1, 2), dz, out=dh)
            grad_w = scratch.get(f"g{i}", (k, layer.out_features, layer.in_features))
            torch.bmm(dz, acts[i].transpose(1, 2), out=grad_w)
            for sl, grad in (
                (layer.w, grad_w.view(k, -1)),
                (layer.b, dz.sum(2) if layer.b is not None else None),
            ):
                if sl is None or grad is None:
                    continue
                self._update(
                    w[:, sl],
                    grad,
                    m[:, sl] if m is not None else None,
                    c[:, sl] if c is not None else None,
                    lr,
                )
            if dh is not None:
                dz = dh
        return StepResult(losses, accuracy)

    def _generic_step(
        self,
        w: torch.Tensor,
        m: torch.Tensor | None,
        c: torch.Tensor | None,
        buffers: dict[str, torch.Tensor],
        xb: torch.Tensor,
        yb: torch.Tensor,
        lr: float | torch.Tensor,
    ) -> StepResult:
        """``vmap`` forward over ``functional_call`` and one ``autograd.grad`` (any model)."""
        leaf = w.detach().requires_grad_(True)
        out = self._forward(leaf, buffers, xb)  # [k, batch, classes]
        losses = nn.functional.cross_entropy(out.transpose(1, 2), yb, reduction="none").mean(1)
        (grad,) = torch.autograd.grad(losses.sum(), leaf)
        accuracy = (out.detach().argmax(2) == yb).float().mean(1)  # prequential
        with torch.no_grad():
            self._update(w, grad, m, c, lr)
        return StepResult(losses.detach(), accuracy)

    def get(self, node: int) -> torch.Tensor:
        return self._rows()[node]

    def set(self, node: int, vector: torch.Tensor) -> None:
        self._rows()[node].copy_(vector)

    def _rows(self) -> tuple[torch.Tensor, ...]:
        """One view per node's row of ``params``."""
        return self._param_rows(self.params)

    def stacked(self) -> torch.Tensor:
        return self.params

    def set_correction(self, node: int, vector: torch.Tensor | None) -> None:
        if vector is None:
            if self.corrections is not None:
                self.corrections[node] = 0.0
            return
        if self.corrections is None:
            self.corrections = torch.zeros_like(self.params)
        self._correction_rows(self.corrections)[node].copy_(vector)

    def correction(self, node: int) -> torch.Tensor:
        if self.corrections is None:
            return torch.zeros(self.schema.numel)
        return self.corrections[node].clone()

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if self._dense is None:
            return self._predict(self.params, self.buffers, x.expand(self.num_nodes, *x.shape))
        return torch.cat([z.transpose(1, 2) for z in self._dense_logits(x)])

    @torch.no_grad()
    def logits_each(self, x: torch.Tensor) -> torch.Tensor:
        if self._dense is None:
            return self._predict(self.params, self.buffers, x)
        size = max(1, (1 << 22) // max(1, x.shape[1] * max(la.out_features for la in self._dense)))
        blocks = []
        for start in range(0, self.num_nodes, size):
            w, h = self.params[start : start + size], x[start : start + size].transpose(1, 2)
            for layer in self._dense:
                h = layer.forward(w, h)
            blocks.append(h.transpose(1, 2))
        return torch.cat(blocks)

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._dense is None:
            return super().evaluate(x, y)
        scores = [score_logits(z, y) for z in self._dense_logits(x)]
        return torch.cat([a for a, _ in scores]), torch.cat([loss for _, loss in scores])

    @torch.no_grad()
    def _logits_of(self, vector: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self._dense is None:
            mean = {  # the nodes' mean running statistics
                name: (b.mean(0) if b.is_floating_point() else b[0]).unsqueeze(0)
                for name, b in self.buffers.items()
            }
            return self._predict(vector[None], mean, x[None])[0].T
        h = x.T[None]
        for layer in self._dense:
            h = layer.forward(vector[None], h)
        return h[0]

    def _dense_logits(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        """Fast-path logits ``[nodes, classes, n]`` on shared inputs, a block of nodes at a
        time so that no hidden activation exceeds ~16 MB at any scale."""
        assert self._dense is not None
        first, rest = self._dense[0], self._dense[1:]
        widest = max(layer.out_features for layer in self._dense)
        size = max(1, (1 << 22) // max(1, len(x) * widest))
        for start in range(0, self.num_nodes, size):
            w = self.params[start : start + size]
            # The inputs are shared: the first layer is one large matrix product.
            h = torch.matmul(first.weight(w), x.T)
            if first.b is not None:
                h.add_(w[:, first.b].unsqueeze(2))
            if first.relu:
                h.relu_()
            for layer in rest:
                h = layer.forward(w, h)
            yield h


@dataclass(frozen=True)
class _DenseLayer:
    """One ``Linear`` layer (and the ``ReLU`` after it, if any) of the fast path: where its
    weight and bias sit in the flat parameter vector."""

    w: slice
    b: slice | None
    out_features: int
    in_features: int
    relu: bool = False

    def weight(self, flat: torch.Tensor) -> torch.Tensor:
        """``[k, out, in]`` strided view of the rows of ``flat``."""
        return flat[:, self.w].view(len(flat), self.out_features, self.in_features)

    def forward(
        self, flat: torch.Tensor, h: torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[k, in, batch]`` activations to ``[k, out, batch]`` (into ``out`` if given)."""
        weight = self.weight(flat)
        if self.b is None:
            z = torch.bmm(weight, h, out=out)
        else:
            z = torch.baddbmm(flat[:, self.b].unsqueeze(2), weight, h, out=out)
        return z.relu_() if self.relu else z


class _Scratch:
    """Named scratch tensors reused from step to step; each grows to the largest size asked."""

    def __init__(self) -> None:
        self._store: dict[str, torch.Tensor] = {}

    def get(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` (valid until the next ``get`` of ``name``)."""
        numel = math.prod(shape)
        buf = self._store.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = self._store[name] = torch.empty(numel, dtype=dtype)
        return buf[:numel].view(shape)


class _RowViews:
    """One view per row of a tensor, made once (indexing a tensor costs more than the small
    operations the cores do on a row), and again when the tensor is replaced."""

    def __init__(self) -> None:
        self._views: tuple[torch.Tensor, ...] = ()
        self._of: torch.Tensor | None = None

    def __call__(self, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self._of is not tensor:
            self._views, self._of = tensor.unbind(), tensor
        return self._views


def _dense_plan(model: nn.Module, schema: ParamSchema) -> list[_DenseLayer] | None:
    """The fast-path layers of a plain ``nn.Sequential`` of ``Linear`` and ``ReLU`` (float32,
    starting with a ``Linear``), or None if the model is anything else."""
    if type(model) is not nn.Sequential or any(p.dtype != "float32" for p in schema.params):
        return None
    where: dict[str, slice] = {}
    offset = 0
    for p in schema.params:
        where[p.name] = slice(offset, offset + p.numel)
        offset += p.numel
    layers: list[_DenseLayer] = []
    for name, module in model.named_children():
        if type(module) is nn.Linear:
            w, b = where.get(f"{name}.weight"), where.get(f"{name}.bias")
            if w is None or (module.bias is not None and b is None):
                return None
            layers.append(_DenseLayer(w, b, module.out_features, module.in_features))
        elif type(module) is nn.ReLU and layers:
            layers[-1] = replace(layers[-1], relu=True)
        else:
            return None
    return layers or None
