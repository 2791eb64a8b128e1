"""The node's sync channels on the network: one handler, one outbox path and one set of
counters for the whole model and for every community.

A channel is a group of peers syncing one part of their models under one protocol. Each has a
16-byte id (the whole model: ``WHOLE_MODEL``, all zeros; a community: its id) and a
``CoreRuntime`` (``p2pfl.runtime``) that runs its core on its part of the node's model. Every
sync frame, on the one ``SYNC_PROTOCOL``, is the channel id followed by a wire message encoded
with the channel's schema (``sync_frame``).

* inbound: the frame's channel is looked up, the channel's owner checks the sender
  (``Channel.check``: a community checks admission; the whole model takes every connected
  peer), the message is decoded with the channel's schema and handed to its runtime. A frame
  refused for any reason is logged with the reason and counted (channel and node ``rejected``).
* outbound: a core's ``Send`` to a peer the channel cannot reach (``Channel.reaches``: e.g. not
  admitted to the community) fails at once; others are encoded and queued on the peer's
  outbox (``outbox.py``). A send that fails later is counted and reported to the runtime
  (``send_failed``: its core decides what it means) and to the channel's owner.
* timers run in the daemon's nursery and fire only while the channel is open.

Closing a channel (a community left) stops it at once: its runtime is closed (drift correction
cleared), its queued frames are not sent and its frames in flight are cancelled.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Hashable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import trio

from p2pfl.daemon.outbox import Outboxes
from p2pfl.daemon.peers import PeerLedger
from p2pfl.daemon.transport import Transport, TransportError
from p2pfl.learning.params import ParamSchema
from p2pfl.ratelog import RateLimitedLog
from p2pfl.runtime import CoreRuntime, Driver
from p2pfl.wire.codec import WireError, decode, encode, max_message_bytes
from p2pfl.wire.community import ID_BYTES
from p2pfl.wire.messages import Message

log = logging.getLogger("p2pfl.sync")

SYNC_PROTOCOL = "/p2pfl/sync/2.0.0"
WHOLE_MODEL = "00" * ID_BYTES
"""Channel id of the whole-model sync."""
OUTBOX_SIZE = 64


# Sync frames start with the channel id as ID_BYTES raw bytes (a community's id, or zeros).


def sync_frame(channel: str, message: bytes) -> bytes:
    """A sync frame: ``channel``'s id as ``ID_BYTES`` raw bytes, then the encoded message."""
    return bytes.fromhex(channel) + message


def split_sync_frame(payload: bytes) -> tuple[str, bytes]:
    """A sync frame's channel id (hex; shorter than 32 digits if the frame is) and message."""
    return payload[:ID_BYTES].hex(), payload[ID_BYTES:]


def _everyone(peer: str) -> bool:
    return True


def _no_check(peer: str) -> str | None:
    return None


RECENT_REFUSALS = 20
"""Refusals a channel keeps for the dashboard."""


@dataclass
class Channel:
    """One open channel: its runtime and what its owner decides about peers."""

    id: str
    label: str
    runtime: CoreRuntime
    reaches: Callable[[str], bool] = _everyone
    """Whether a message may be sent to a peer in this channel."""
    check: Callable[[str], str | None] = _no_check
    """Why a frame from a peer is refused in this channel (None: taken)."""
    on_send_failed: Callable[[str], None] | None = None
    """Called after a frame of this channel to a peer failed (after the runtime was told)."""
    counters: dict[str, int] = field(
        default_factory=lambda: {
            "bytes_sent": 0,
            "bytes_received": 0,
            "rejected": 0,
            "send_failures": 0,
        }
    )
    sending: set[trio.CancelScope] = field(default_factory=set)
    refusals: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=RECENT_REFUSALS))
    """The last frames refused in this channel: peer, reason, unix time (for the dashboard)."""

    @property
    def schema(self) -> ParamSchema:
        return self.runtime.part.schema

    def __post_init__(self) -> None:
        self.max_frame = max_message_bytes(self.schema)


@dataclass(frozen=True)
class Frame:
    """What an outbox holds: a payload for ``protocol`` on behalf of ``channel``."""

    protocol: str
    channel: str
    data: bytes
    after_close: bool = False
    """Send even if the channel is closed meanwhile (e.g. a refusal notice)."""

    def __len__(self) -> int:
        return len(self.data)


class _Port:
    """The ``Driver`` of one channel's runtime."""

    def __init__(self, channels: SyncChannels, channel: str) -> None:
        self.channels, self.channel = channels, channel

    def send(self, now: float, to: str, message: Message) -> None:
        self.channels._send_message(self.channel, now, to, message)

    def set_timer(self, at: float, key: Hashable) -> None:
        self.channels._set_timer(self.channel, at, key)


class SyncChannels:
    """Every sync channel of one node. ``counters`` are the node's: refused frames and failed
    sends count there too. Open channels with ``port`` then ``open``; ``register`` the handler
    before the transport runs peers and ``start`` once it does."""

    def __init__(
        self,
        schema: ParamSchema,
        counters: dict[str, int],
        ledger: PeerLedger | None = None,
        guard: AbstractContextManager[Any] | None = None,
    ) -> None:
        self.node_counters = counters
        self.guard: AbstractContextManager[Any] = guard if guard is not None else nullcontext()
        """Held around every runtime call: the node's model lock, since training runs in a
        worker thread (reentrant: a runtime may report a failed send from inside a call)."""
        self.ledger = ledger if ledger is not None else PeerLedger()
        """Per-peer records of the node: every refused frame is noted with its reason."""
        self.active: dict[str, Channel] = {}
        self.max_frame = ID_BYTES + max_message_bytes(schema)
        self.on_unknown: Callable[[str, str], None] | None = None
        """Called with (channel id, peer) for a frame of a channel that is not open."""
        self._transport: Transport | None = None
        self._nursery: trio.Nursery | None = None
        self._outboxes = Outboxes[Frame](OUTBOX_SIZE, self._deliver, self._failed, counters, log)
        self._refusals = RateLimitedLog(log)

    # -------------------------------------------------------------------- lifecycle

    def port(self, channel: str) -> Driver:
        """The driver to build channel ``channel``'s runtime with."""
        return _Port(self, channel)

    def open(self, channel: Channel) -> Channel:
        """Start syncing ``channel`` (its runtime built with ``port(channel.id)``)."""
        self.active[channel.id] = channel
        return channel

    def close(self, channel_id: str) -> Channel | None:
        """Stop a channel at once: runtime closed, queued frames dropped, frames in flight
        cancelled. Returns it (None if it was not open)."""
        channel = self.active.pop(channel_id, None)
        if channel is not None:
            channel.runtime.close()
            for scope in channel.sending:
                scope.cancel()
        return channel

    def register(self, transport: Transport) -> None:
        """Install the sync handler on ``transport`` (before it runs peers)."""
        transport.set_handler(SYNC_PROTOCOL, self.on_frame, max_frame_bytes=self.max_frame)

    def start(self, nursery: trio.Nursery, transport: Transport) -> None:
        """Send and run timers from now on, in ``nursery`` over ``transport``."""
        self._nursery, self._transport = nursery, transport
        self._outboxes.start(nursery)

    # ------------------------------------------------------------------------ events

    def local_step(self, now: float) -> None:
        """The learner took a step: every channel's core takes it."""
        with self.guard:
            for channel in list(self.active.values()):
                channel.runtime.local_step(now)

    def peer_gone(self, peer: str) -> None:
        """The last connection to ``peer`` closed: its outbox ends."""
        self._outboxes.close(peer)

    async def on_frame(self, peer: str, payload: bytes) -> None:
        """The sync handler: check, decode and hand one frame to its channel's runtime."""
        cid, body = split_sync_frame(payload)
        channel = self.active.get(cid) if body else None
        if channel is None:
            self.node_counters["rejected"] += 1
            self.ledger.refused(peer, f"sync frame for channel {cid or '(none)'}: not on this node")
            self._refusals.warning(
                ("no channel", peer),
                "refused sync frame from peer %s: no channel %s on this node",
                peer,
                cid or "(none)",
            )
            if self.on_unknown is not None and len(cid) == 2 * ID_BYTES:
                self.on_unknown(cid, peer)
            return
        reason = channel.check(peer)
        if reason is None:
            try:
                message = decode(body, channel.schema, channel.max_frame)
            except WireError as exc:
                reason = str(exc)
        if reason is not None:
            channel.counters["rejected"] += 1
            self.node_counters["rejected"] += 1
            channel.refusals.append({"peer": peer, "reason": reason, "at": time.time()})
            self.ledger.refused(peer, f"{channel.label}: {reason}")
            self._refusals.warning(
                ("refused", peer, cid),
                "refused sync frame from peer %s in %s: %s",
                peer,
                channel.label,
                reason,
            )
            return
        channel.counters["bytes_received"] += 4 + len(payload)
        with self.guard:
            channel.runtime.message(trio.current_time(), peer, message)

    # ----------------------------------------------------------------------- outbound

    def post(self, peer: str, frame: Frame) -> None:
        """Queue any frame (e.g. a community hello) on ``peer``'s outbox."""
        self._outboxes.put(peer, frame)

    def _send_message(self, cid: str, now: float, to: str, message: Message) -> None:
        channel = self.active.get(cid)
        if channel is None:
            return
        if not channel.reaches(to):
            log.debug("%s: peer %s is not reachable in this channel", channel.label, to)
            with self.guard:
                channel.runtime.send_failed(now, to)
            return
        data = sync_frame(cid, encode(message, channel.schema))
        self._outboxes.put(to, Frame(SYNC_PROTOCOL, cid, data))

    def _set_timer(self, cid: str, at: float, key: Hashable) -> None:
        assert self._nursery is not None, "SyncChannels.start was not called"
        self._nursery.start_soon(self._timer, self.active[cid], at, key)

    async def _timer(self, channel: Channel, at: float, key: Hashable) -> None:
        await trio.sleep_until(at)
        if self.active.get(channel.id) is channel:
            with self.guard:
                channel.runtime.timer(trio.current_time(), key)

    async def _deliver(self, peer: str, frame: Frame) -> None:
        """Send one queued frame unless its channel was closed meanwhile; closing cancels it
        in flight."""
        assert self._transport is not None
        channel = self.active.get(frame.channel)
        if channel is None and not frame.after_close:
            return
        with trio.CancelScope() as scope:
            if channel is not None:
                channel.sending.add(scope)
            try:
                await self._transport.send(peer, frame.protocol, frame.data)
            finally:
                if channel is not None:
                    channel.sending.discard(scope)
            if channel is not None and frame.protocol == SYNC_PROTOCOL:
                channel.counters["bytes_sent"] += 4 + len(frame.data)

    def _failed(self, peer: str, frame: Frame, exc: TransportError) -> None:
        channel = self.active.get(frame.channel)
        if channel is None:
            return
        channel.counters["send_failures"] += 1
        log.warning("%s: %s", channel.label, exc)
        if frame.protocol == SYNC_PROTOCOL:
            with self.guard:
                channel.runtime.send_failed(trio.current_time(), peer)
        if channel.on_send_failed is not None:
            channel.on_send_failed(peer)
