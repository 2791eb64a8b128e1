"""Byzantine nodes for experiments: an honest core wrapped so that what it sends lies.

``--byzantine K:ATTACK`` makes K nodes (chosen by the seed) attackers. An attacker trains and
runs its protocol like everyone else (its own model stays honest, so its lies track the
network), but every model it sends is replaced as the attack says:

* ``signflip``: the model with every sign flipped (``-w``);
* ``scale``: the model times ``SCALE`` (the ×1000 models of issue 11);
* ``noise``: the model plus Gaussian noise as large as the model itself;
* ``replay``: the first model it ever sent, again and again (a stale model);
* ``flood``: honest models, but it always claims a violation (dynamic: a session at every
  check; gossip: a push to every neighbour at every step) to keep its peers busy;
* ``flood-confirm``: floods, and on gossip confirms every reply it gets (``Confirm``) without
  merging it: the adaptive flooder the gossip confirmation cannot tell from an honest peer;
* ``fake-average``: floods, and the averages it returns as coordinator are sign-flipped;
* ``silent``: sends nothing at all, neither models nor refusals (a peer crashed behind a
  connection that stays open, or one that withholds on purpose): whoever waits for it waits
  in vain.

The wrapper is sans-I/O like the core it wraps, so the simulator and a daemon can run it.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable
from typing import Any, cast

import torch

from p2pfl.protocol.actions import Action, Send
from p2pfl.protocol.core import NodeCore
from p2pfl.protocol.dynamic import DynamicCore
from p2pfl.protocol.scheduled import GossipCore
from p2pfl.spec import SpecError
from p2pfl.wire.messages import Average, Confirm, Message, ModelReply, Push

ATTACKS = (
    "signflip",
    "scale",
    "noise",
    "replay",
    "flood",
    "flood-confirm",
    "fake-average",
    "silent",
)
SCALE = 1000.0
FLOODING = ("flood", "flood-confirm", "fake-average")


@dataclasses.dataclass(frozen=True)
class ByzantineConfig:
    """``K:ATTACK``: how many attackers and what they do (``count`` 0: nobody lies)."""

    count: int = 0
    attack: str = "signflip"

    def choose(self, nodes: int, seed: int) -> list[int]:
        """The attackers among ``nodes`` node indices, fixed by ``seed``."""
        return sorted(random.Random(f"byzantine:{seed}").sample(range(nodes), self.count))


def parse_byzantine(text: str, nodes: int | None = None) -> ByzantineConfig:
    """Parse ``K:ATTACK`` (empty: no attacker); bad input raises SpecError naming the fix."""
    text = text.strip()
    if not text:
        return ByzantineConfig()
    count, sep, attack = text.partition(":")
    hint = f"write K:ATTACK, e.g. 3:signflip; attacks: {', '.join(ATTACKS)}"
    if not sep or not count.strip().isdigit():
        raise SpecError(f"byzantine {text!r}: {hint}")
    attack = attack.strip().lower()
    if attack not in ATTACKS:
        raise SpecError(f"byzantine {text!r}: unknown attack {attack!r}; {hint}")
    config = ByzantineConfig(int(count), attack)
    if nodes is not None and config.count >= nodes:
        raise SpecError(
            f"byzantine {text!r}: {config.count} attackers among {nodes} nodes leaves no honest "
            "node; use fewer attackers"
        )
    return config


class ByzantineCore:
    """An honest ``core`` whose outgoing models lie (see the module docstring). Everything
    else (stats, step, neighbours) is the wrapped core's."""

    _OWN = frozenset({"core", "attack", "_noise", "_first"})

    def __init__(self, core: NodeCore, attack: str, seed: int = 0) -> None:
        if attack not in ATTACKS:
            raise ValueError(f"unknown attack {attack!r}")
        self.core = core
        self.attack = attack
        self._noise = torch.Generator().manual_seed(seed)
        self._first: torch.Tensor | None = None
        if attack in FLOODING and isinstance(core, DynamicCore):
            core._condition = lambda: math.inf  # type: ignore[method-assign]

    def __getattr__(self, name: str) -> Any:
        """Everything is the honest core's, but every event handler's sends lie."""
        value = getattr(self.core, name)
        if name.startswith("on_") and callable(value):
            return lambda *args: self._lie(value(*args))
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self.core, name, value)  # e.g. the driver telling the step size

    def on_local_step(self, now: float) -> list[Action]:
        actions = self.core.on_local_step(now)
        if self.attack in FLOODING and isinstance(self.core, GossipCore):
            sent = {a.to for a in actions if isinstance(a, Send)}
            model = self.core.model
            for peer in self.core.live_neighbors:
                if peer not in sent:
                    message = Push(-1, model.read().clone(), model.samples)
                    actions.append(Send(peer, message))
        return self._lie(actions)

    def on_message(self, now: float, sender: str, message: Message) -> list[Action]:
        actions = self.core.on_message(now, sender, message)
        if (
            self.attack == "flood-confirm"
            and isinstance(message, ModelReply)
            and isinstance(self.core, GossipCore)
            and not any(isinstance(a, Send) and isinstance(a.message, Confirm) for a in actions)
        ):
            actions.append(Send(sender, Confirm(message.session)))  # as if it merged it
        return self._lie(actions)

    def _lie(self, actions: list[Action]) -> list[Action]:
        if self.attack == "silent":
            return [a for a in actions if not isinstance(a, Send)]
        return [self._lie_in(a) if isinstance(a, Send) else a for a in actions]

    def _lie_in(self, send: Send) -> Send:
        params = getattr(send.message, "params", None)
        if params is None:
            return send
        poison = self._poison(send.message)
        if poison is None:
            return send
        return Send(send.to, dataclasses.replace(send.message, params=poison(params)))

    def _poison(self, message: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
        if self.attack == "signflip":
            return torch.neg
        if self.attack == "scale":
            return lambda p: p * SCALE
        if self.attack == "noise":
            return self._noisy
        if self.attack == "replay":
            return self._stale
        if self.attack == "fake-average" and isinstance(message, Average):
            return torch.neg
        return None

    def _noisy(self, params: torch.Tensor) -> torch.Tensor:
        z = torch.randn(params.shape, generator=self._noise, dtype=params.dtype)
        return params + z * (torch.linalg.vector_norm(params) / math.sqrt(params.numel()))

    def _stale(self, params: torch.Tensor) -> torch.Tensor:
        if self._first is None:
            self._first = params.detach().clone()
        return self._first


class Attackers:
    """Which nodes of a run lie, and the hook a driver calls on each core it builds."""

    def __init__(self, config: ByzantineConfig, nodes: int, seed: int) -> None:
        self.config = config
        self.nodes = set(config.choose(nodes, seed)) if config.count else set()
        self.seed = seed

    def wrap(self, node: int, core: NodeCore) -> NodeCore:
        """``core`` itself for an honest node, else ``core`` wrapped to lie."""
        if node not in self.nodes:
            return core
        liar = ByzantineCore(core, self.config.attack, seed=self.seed * 7919 + node)
        return cast(NodeCore, liar)

    def honest(self, nodes: int) -> torch.Tensor:
        """Boolean mask over ``nodes`` node indices: True for honest nodes."""
        mask = torch.ones(nodes, dtype=torch.bool)
        mask[sorted(self.nodes)] = False
        return mask
