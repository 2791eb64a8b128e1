"""Per-peer outboxes: a bounded queue per peer, drained in order by one sender task per peer.

A full outbox drops the new item (counted in ``send_failures`` and logged) instead of blocking
the handler or timer that queued it; a send that fails is counted and handed to the owner,
which decides what the failure means (a peer down, a member dropped).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sized
from typing import Generic, TypeVar

import trio

from p2pfl.daemon.transport import TransportError

Item = TypeVar("Item", bound=Sized)
"""What an outbox holds; its ``len`` (in bytes) is logged when it is dropped."""


class Outboxes(Generic[Item]):
    """One outbox per peer, created on the first ``put`` to that peer and closed by ``close``.

    ``send(peer, item)`` delivers one item (raising TransportError on failure);
    ``on_failure(peer, item, exc)`` runs after a failed send. Both full outboxes and failed
    sends count in ``counters["send_failures"]``. Call ``start`` before the first ``put``.
    """

    def __init__(
        self,
        size: int,
        send: Callable[[str, Item], Awaitable[None]],
        on_failure: Callable[[str, Item, TransportError], None],
        counters: dict[str, int],
        log: logging.Logger,
        name: str = "outbox",
    ) -> None:
        self.size = size
        self._send, self._on_failure = send, on_failure
        self._counters, self._log, self._name = counters, log, name
        self._nursery: trio.Nursery | None = None
        self._channels: dict[str, trio.MemorySendChannel[Item]] = {}

    def start(self, nursery: trio.Nursery) -> None:
        """Run the sender tasks in ``nursery`` (they end with it)."""
        self._nursery = nursery

    def put(self, peer: str, item: Item) -> None:
        """Queue ``item`` for ``peer`` behind the items queued before it; drop it if full."""
        channel = self._channels.get(peer)
        if channel is None:
            assert self._nursery is not None, "Outboxes.start was not called"
            channel, inbox = trio.open_memory_channel[Item](self.size)
            self._channels[peer] = channel
            self._nursery.start_soon(self._sender, peer, inbox)
        try:
            channel.send_nowait(item)
        except trio.BrokenResourceError:
            self._channels.pop(peer, None)  # its sender ended (the node is stopping)
            self._counters["send_failures"] += 1
        except trio.WouldBlock:
            self._counters["send_failures"] += 1
            self._log.warning(
                "%s to peer %s is full: dropped a %d-byte message", self._name, peer, len(item)
            )

    def close(self, peer: str) -> None:
        """No new items for ``peer`` on this outbox; its sender sends what is queued, then
        ends (a later ``put`` opens a new outbox)."""
        channel = self._channels.pop(peer, None)
        if channel is not None:
            channel.close()

    async def _sender(self, peer: str, inbox: trio.MemoryReceiveChannel[Item]) -> None:
        async with inbox:
            async for item in inbox:
                try:
                    await self._send(peer, item)
                except TransportError as exc:
                    self._counters["send_failures"] += 1
                    self._on_failure(peer, item, exc)
