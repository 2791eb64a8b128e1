"""Parameter schemas: the names, shapes and dtypes that turn a model into one flat vector."""

from __future__ import annotations

import fnmatch
import functools
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

# torch is imported where tensors are touched: schemas alone (community manifests, the CLI)
# must not pay its ~1 s import.
if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class ParamSpec:
    """One named tensor of a model."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class ParamSchema:
    """An ordered list of parameters; the flat vector is their concatenation in this order."""

    params: tuple[ParamSpec, ...]

    def __hash__(self) -> int:
        return self._hash

    @functools.cached_property
    def _hash(self) -> int:
        """Computed once: schemas key the codec's caches, so they are hashed per message."""
        return hash(self.params)

    @classmethod
    def from_module(cls, module: nn.Module, include: Iterable[str] | None = None) -> ParamSchema:
        """Schema of a module's trainable parameters, optionally only names matching globs."""
        globs = list(include) if include is not None else None
        specs = []
        for name, p in module.named_parameters():
            if globs is not None and not any(fnmatch.fnmatchcase(name, g) for g in globs):
                continue
            specs.append(ParamSpec(name, tuple(p.shape), str(p.dtype).removeprefix("torch.")))
        return cls(tuple(specs))

    @functools.cached_property
    def numel(self) -> int:
        return sum(p.numel for p in self.params)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def digest(self) -> bytes:
        """A 16-byte hash of names, shapes and dtypes: peers compare it before trusting data."""
        h = hashlib.sha256()
        for p in self.params:
            h.update(f"{p.name}|{','.join(map(str, p.shape))}|{p.dtype};".encode())
        return h.digest()[:16]

    def flatten(self, module: nn.Module) -> torch.Tensor:
        """Copy the module's parameters named in this schema into one float32 vector."""
        import torch

        named = dict(module.named_parameters())
        return torch.cat([named[p.name].detach().reshape(-1).float() for p in self.params])

    def load(self, module: nn.Module, vector: torch.Tensor) -> None:
        """Write a flat vector into the module's parameters (in place, no autograd)."""
        import torch

        named = dict(module.named_parameters())
        with torch.no_grad():
            for spec, chunk in zip(self.params, self.split(vector), strict=True):
                named[spec.name].copy_(chunk)

    def split(self, vector: torch.Tensor) -> list[torch.Tensor]:
        """Views of a flat vector (last dim) shaped like each parameter."""
        if vector.shape[-1] != self.numel:
            raise ValueError(f"vector has {vector.shape[-1]} entries, schema needs {self.numel}")
        lead = tuple(vector.shape[:-1])
        out, offset = [], 0
        for p in self.params:
            out.append(vector[..., offset : offset + p.numel].reshape(*lead, *p.shape))
            offset += p.numel
        return out
