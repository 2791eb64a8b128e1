"""Compressed links: what a node's codec remembers per peer, for every protocol.

A lossy codec sends deltas, not models, and keeps what it left out (error feedback):

* **Delta chain** (model replies, pushes): the sender and the receiver both keep the
  receiver's reconstruction ("mirror") of the sender's messages. A message is
  ``compress(x - mirror[base])``; the receiver adds it to the same mirror. What the codec
  left out, ``x - mirror``, is therefore in the next delta: the sum of what was sent tracks
  the sum of what was meant, with an error of one compression of one delta (it never
  accumulates). Deltas are taken on the last message the receiver acknowledged (every
  compressed message carries ``ack``, the last one its sender decoded from the receiver),
  so a lost message costs a larger delta, not a broken chain. The first message, and the
  first after a peer came back or asked for it (``resync``), is a key frame: the vector
  itself (in ``CodecConfig.key_codec``: int8 for the codecs coarser than int8 unless the
  spec's ``key=`` says otherwise).
* **Echo** (a session's average back to a member): the average is sent as
  ``compress(average - x̂_member + e)``, a delta on the member's own reply ``x̂_member`` as the
  coordinator decoded it; ``e`` is what earlier averages to that member left out (classic
  error feedback, kept per peer). The member adds it to that same ``x̂_member`` (it holds the
  coordinator's copy of its reply: ``echo_base``), so every member adopts the average up to
  one echo's codec error, and drops its reply's chain error ``x_member - x̂_member``, which
  no one in the group saw. Adding the echo to its exact model instead kept that error in
  the member's model (the global mean was exact), but the drift correction then read it as
  gradient drift at the next session and integrated it: with 2-bit codecs (chain error
  ~50 % of a reply's delta) corrections wound up and models drifted apart until the run
  diverged (Dirichlet 0.1, int2: distances between models 2 -> 33 in 1,500 steps).

* **Shared bases** (``base=shared``): besides the sender's last acknowledged message, both
  ends of a link hold the receiver's last message (as the sender decoded it) and the
  averages echoed on either side's messages (``mirror + decoded echo``, computed alike on
  both ends). A message is then a delta on whichever of these is closest to the vector
  (``Compressed.base_kind`` says which). On a rarely used link the sender's last message is
  old, while the average of the last session both ends were in is close to both models:
  the delta shrinks from everything the node moved since it last wrote on the link to what
  it moved since that average.

* **Tolerance** (``tol=T``, ``dynamic``): a session hands each model over once, on a link
  the node may not have used for hundreds of steps, so a reply is a delta on an old message
  and carries everything the node moved since (median 5-7 √Δ under Dirichlet 0.1). ``sign``
  leaves out ~60 % of it, about 4 √Δ: the coordinator averages that stale copy, and the
  member adopts the average on it, dropping the error (above); nothing feeds it back. An
  echo's error does return (the coordinator's residual), and replies are the part that
  breaks first: with exact replies and sign echoes ``dynamic`` learned as well as float32
  over 400 steps (over 3,000 under Dirichlet 0.1 int8 replies still left it ten points
  short). With a
  tolerance the sender measures the error its codec would leave in a chain message (it
  holds the receiver's reconstruction) and, beyond ``T·√Δ``, sends it in the key codec
  instead (the frame names its codec); the codec still carries echoes and the small deltas
  of links used often.

* **Unbiased int2 chain messages** (``scale=unbiased``, ``dynamic``'s default for int2): the
  RMS scale is close to int2's least squared error, which shrinks a message toward its base
  (``x̂·x ≈ 0.88 ||x||²`` on Gaussian entries). A ``dynamic`` member drops its reply's error,
  so every reply reached its group shrunk while the coordinator's own model counted in full;
  chain messages therefore travel at the scale with ``x̂·x = ||x||²`` (same codes, same
  bytes, a little more squared error). Echoes keep the RMS scale: their error returns, as
  a fixed schedule's chain error does (there the unbiased scale is worse, and not the
  default).

* **Copies** (fixed schedules): ``copy_of`` says what a peer will hold of a vector once it
  is sent on the chain; ``periodic`` and ``gossip`` merge these copies, their own among
  the peers' decoded ones, and keep what their own messages left out
  (``NodeCore._merge``), as Choco-SGD does.

A payload that does not fit the link (a delta on a message we do not hold, an echo of a
reply we never sent, NaN/inf after decoding) raises ``LinkError`` with the reason; the node
asks the peer for a key frame in its next message to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar

import torch

from p2pfl.learning.compression import (
    BASE_KINDS,
    CodecConfig,
    Compressed,
    compress,
    decompress,
)

_Held = TypeVar("_Held")
HISTORY = 4
"""Messages a link keeps per direction (the acknowledged base and the newest ones)."""


class LinkError(ValueError):
    """A compressed payload this link cannot decode; the text says why."""


@dataclass
class _Outgoing:
    seq: int = 0
    acked: int = 0
    floor: int = 0
    """Our last key frame: the receiver dropped everything before it."""
    sent: dict[int, torch.Tensor] = field(default_factory=dict)
    """seq -> the receiver's reconstruction of our message seq."""
    residual: torch.Tensor | None = None
    """Error feedback of echoed averages: what they left out so far."""
    echoed: dict[int, torch.Tensor] = field(default_factory=dict)
    """seq -> the average the receiver echoed on our message seq (mirror + echo)."""


@dataclass
class _Incoming:
    last: int = 0
    mirrors: dict[int, torch.Tensor] = field(default_factory=dict)
    refused: bool = False
    acked: int = 0
    """The last ``ack`` we sent the peer: its chain's base is at least this one."""
    echoed: dict[int, torch.Tensor] = field(default_factory=dict)
    """seq -> the average we echoed on the peer's message seq (its mirror + the echo)."""


class CodecLinks:
    """Per-peer codec state of one node (see the module docstring)."""

    def __init__(self, config: CodecConfig | None) -> None:
        """``config`` None: the node sends float32 and only decodes what peers compress."""
        self.config = config or CodecConfig("fp16")
        key = self.config.key_codec
        self.key_config = (
            self.config if key == self.config.name else CodecConfig(key, self.config.block)
        )
        self._out: dict[str, _Outgoing] = {}
        self._in: dict[str, _Incoming] = {}
        self.fallbacks = 0
        """Messages sent in the key codec because the codec's error exceeded the tolerance."""

    def encode(
        self, peer: str, x: torch.Tensor, echo: bool = False, tolerance: float | None = None
    ) -> Compressed:
        """Compress ``x`` for ``peer``: a delta in its chain, or with ``echo`` a delta on the
        peer's last message to us (falls back to the chain if we hold none). With a
        ``tolerance``, a chain delta the codec would leave off by more travels in the key
        codec (an echo's error returns in the next one: no limit there)."""
        out = self._out.setdefault(peer, _Outgoing())
        inn = self._in.setdefault(peer, _Incoming())
        x = x.detach().to(torch.float32)
        if echo and inn.last in inn.mirrors:
            target = x - inn.mirrors[inn.last]
            if out.residual is not None:
                target += out.residual
            c, decoded = self._lossy(target, None, False)  # its error returns: RMS scale
            out.residual = target - decoded
            c.base, c.echo = inn.last, True
            inn.echoed[inn.last] = inn.mirrors[inn.last] + decoded
            _keep_newest(inn.echoed)
        else:
            c, mirror = self._chain_message(x, out, inn, tolerance)
            if c.base == 0:  # the receiver drops the link's echoed averages on it: so do we
                out.floor = out.acked = out.seq + 1
                out.echoed.clear()
                inn.echoed.clear()
            out.seq += 1
            c.seq = out.seq
            out.sent[out.seq] = mirror
            _prune(out.sent, out.acked)
        c.ack, c.resync, inn.refused = inn.last, inn.refused, False
        inn.acked = inn.last
        return c

    def copy_of(self, peer: str, x: torch.Tensor) -> torch.Tensor:
        """What ``peer`` will hold of ``x`` once ``encode(peer, x)`` (not an echo) is sent
        next: the reconstruction its delta chain yields (``x`` itself minus what the codec
        leaves out now). Changes nothing; a merge on a lossy link mixes these copies, not
        the exact models (see the module docstring)."""
        out = self._out.get(peer, _Outgoing())
        inn = self._in.get(peer, _Incoming())
        return self._chain_message(x.detach().to(torch.float32), out, inn)[1]

    def _chain_message(
        self, x: torch.Tensor, out: _Outgoing, inn: _Incoming, tolerance: float | None = None
    ) -> tuple[Compressed, torch.Tensor]:
        """The next delta-chain message of ``x`` on this link and the receiver's
        reconstruction of it (a key frame, ``base`` 0, if the acknowledged base is gone)."""
        unbiased = self.config.scale == "unbiased"
        if out.sent.get(out.acked) is None:
            c = compress(x, self.key_config, unbiased)
            return c, decompress(c)
        kind, number, base = self._closest_base(x, out, inn)
        c, decoded = self._lossy(x - base, tolerance, unbiased)
        c.base, c.base_kind = number, kind
        return c, base + decoded

    def _lossy(
        self, delta: torch.Tensor, tolerance: float | None, unbiased: bool
    ) -> tuple[Compressed, torch.Tensor]:
        """``delta`` compressed and decoded: in the codec, or in the key codec if the codec
        would leave it off by more than ``tolerance`` (None: no limit); int2 at the
        unbiased scale if ``unbiased`` (``CodecConfig.scale``)."""
        c = compress(delta, self.config, unbiased)
        decoded = decompress(c)
        if (
            tolerance is not None
            and self.key_config is not self.config
            and float(torch.linalg.vector_norm(delta - decoded)) > tolerance
        ):
            self.fallbacks += 1
            c = compress(delta, self.key_config, unbiased)
            decoded = decompress(c)
        return c, decoded

    def decode(self, peer: str, c: Compressed) -> torch.Tensor:
        """The vector ``c`` from ``peer`` stands for; ``LinkError`` if it does not fit."""
        out = self._out.setdefault(peer, _Outgoing())
        inn = self._in.setdefault(peer, _Incoming())
        if c.ack in out.sent and c.ack > out.acked and c.ack >= out.floor:
            out.acked = c.ack
            _prune(out.sent, out.acked)
        if c.resync:  # next message: a key frame, on nothing the peer may have lost
            out.acked = 0
            out.echoed.clear()
            inn.echoed.clear()
        if c.echo:
            held = out.sent.get(c.base)
            if held is None:
                raise LinkError(f"an average on our message {c.base}, which we do not hold")
            vector = held + decompress(c)
            out.echoed[c.base] = vector
            _keep_newest(out.echoed)
        else:
            if c.seq <= 0:
                raise LinkError(f"a delta-chain message needs seq >= 1, got {c.seq}")
            if c.base == 0:  # a key frame starts the chain afresh
                inn.mirrors.clear()
                out.echoed.clear()
                inn.echoed.clear()
                mirror = decompress(c)
            else:
                mirror = self._held_base(c, out, inn) + decompress(c)
            inn.mirrors[c.seq], inn.last = mirror, c.seq
            _prune(inn.mirrors, c.base if c.base_kind == 0 else inn.acked)
            vector = mirror
        if not bool(torch.isfinite(vector).all()):
            inn.refused = inn.refused or not c.echo
            raise LinkError("decoded params contain NaN/inf")
        return vector

    def echo_base(self, peer: str, c: Compressed) -> torch.Tensor:
        """The vector the echo ``c`` from ``peer`` (just decoded) is a delta on: our message
        as ``peer`` decoded it, i.e. what its group saw of our model."""
        return self._out[peer].sent[c.base]

    def _closest_base(
        self, x: torch.Tensor, out: _Outgoing, inn: _Incoming
    ) -> tuple[int, int, torch.Tensor]:
        """``(base_kind, base, vector)`` of the base a message of ``x`` is a delta on: our
        acknowledged message, or with ``base=shared`` the closest of it and the newest
        vectors the peer holds as well (see ``BASE_KINDS``)."""
        candidates = [(0, out.acked, out.sent[out.acked])]
        if self.config.base == "shared":
            if out.echoed:
                candidates.append((1, max(out.echoed), out.echoed[max(out.echoed)]))
            if inn.last in inn.mirrors:
                candidates.append((2, inn.last, inn.mirrors[inn.last]))
            if inn.echoed:
                candidates.append((3, max(inn.echoed), inn.echoed[max(inn.echoed)]))
        return min(candidates, key=lambda c: float(torch.linalg.vector_norm(x - c[2])))

    @staticmethod
    def _held_base(c: Compressed, out: _Outgoing, inn: _Incoming) -> torch.Tensor:
        """The vector ``c`` is a delta on, as this end holds it; ``LinkError`` (and a key
        frame asked for) if it holds none."""
        held = (
            inn.mirrors.get(c.base),
            inn.echoed.get(c.base),
            out.sent.get(c.base),
            out.echoed.get(c.base),
        )[c.base_kind]
        if held is None:
            inn.refused = True
            raise LinkError(
                f"a delta on {BASE_KINDS[c.base_kind]} {c.base}, which we do not hold "
                f"(we hold {sorted(inn.mirrors) or 'none'} of its messages); "
                "asking for a key frame"
            )
        return held

    def reset(self, peer: str) -> None:
        """Forget ``peer``'s link (it went down or came back): the next message is a key
        frame, and its deltas on older messages are refused."""
        self._out.pop(peer, None)
        self._in.pop(peer, None)

    def residuals(self) -> dict[str, torch.Tensor]:
        """Per peer, what echoed averages to it have left out so far (error feedback)."""
        return {p: out.residual for p, out in self._out.items() if out.residual is not None}


def _prune(history: dict[int, _Held], keep: int) -> None:
    """Drop entries older than ``keep`` (no delta will be based on them again), and the
    oldest beyond ``HISTORY`` (``keep`` itself stays)."""
    for seq in sorted(history):
        if seq < keep or (len(history) > HISTORY and seq != keep):
            del history[seq]


def _keep_newest(history: dict[int, _Held]) -> None:
    """Drop all but the ``HISTORY`` newest entries."""
    for seq in sorted(history)[:-HISTORY]:
        del history[seq]
