"""The node daemon: one learner and its sync channels driven by trio, talking over libp2p.

The whole-model sync is one channel among the node's channels (``sync.py``), beside one per
community it joined (``communities.py``): each runs its protocol core in a ``CoreRuntime``
(``p2pfl.runtime``), which applies the core's model actions; the daemon feeds local steps and
connection events and moves frames. Training runs inline on the event loop (a step of a small
model takes well under a millisecond), so the model never changes under a handler's feet.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
import trio
from libp2p.crypto.keys import KeyPair

from p2pfl.community import CommunityError
from p2pfl.community.sharing import shared_part
from p2pfl.daemon.checkpoint import (
    checkpoint_files,
    encode_checkpoint,
    restore_newest,
    write_atomically,
)
from p2pfl.daemon.communities import Communities
from p2pfl.daemon.config import ConfigError, NodeConfig
from p2pfl.daemon.control import bind_socket, serve, socket_path
from p2pfl.daemon.dashboard import open_dashboard
from p2pfl.daemon.lan import LanDiscovery, is_lan_listen_addr
from p2pfl.daemon.limits import Limits
from p2pfl.daemon.metrics import serve_metrics
from p2pfl.daemon.peer_exchange import PeerBook, PeerExchange
from p2pfl.daemon.peers import PeerLedger
from p2pfl.daemon.relay import Relaying
from p2pfl.daemon.state import community_states, node_state, restore_node_state
from p2pfl.daemon.sync import WHOLE_MODEL, Channel, SyncChannels
from p2pfl.daemon.transport import Transport, check_can_listen
from p2pfl.data import DataError
from p2pfl.data.datasets import Dataset
from p2pfl.data.partition import NodeData, load_node_slice
from p2pfl.learning.learner import PerNodeLearner, SGDConfig
from p2pfl.learning.sampler import NodeDataBank
from p2pfl.models import build_model
from p2pfl.peers import peer_id_of, peer_of_address
from p2pfl.protocol.byzantine import ByzantineCore
from p2pfl.protocol.core import NodeCore
from p2pfl.ratelog import RateLimitedLog
from p2pfl.runtime import WHOLE_MODEL_CHANNEL, NodeModel, derive_seed, open_core
from p2pfl.spec import SpecError

log = logging.getLogger("p2pfl.daemon")

CHECKPOINT_EVERY_STEPS = 100
CHECKPOINT_EVERY_S = 30.0
LIMITS = {"messages_per_s": 50.0, "burst": 100, "max_inbound_streams_per_peer": 8}
"""Per-peer inbound limits: a sync protocol sends a few messages per step at most."""


@dataclass
class Learning:
    """The node's data, learner and the dataset's shared test split."""

    data: NodeData
    dataset: Dataset
    learner: PerNodeLearner


def build_learning(config: NodeConfig, peer_id: str) -> Learning:
    """Load the node's data and build its model and learner; bad specs raise ConfigError."""
    try:
        dataset, data = load_node_slice(config.data)
    except (SpecError, DataError) as exc:
        raise ConfigError(f"bad value for 'data': {exc}") from None
    try:
        model = build_model(config.model, dataset.input_shape, dataset.num_classes, config.seed)
    except SpecError as exc:
        raise ConfigError(f"bad value for 'model': {exc}") from None
    bank = NodeDataBank(
        [data.x_train], [data.y_train], config.batch_size, derive_seed(config.seed, peer_id)
    )
    return Learning(
        data,
        dataset,
        PerNodeLearner(model, bank, SGDConfig(lr=config.lr, schedule=config.schedule)),
    )


class NodeDaemon:
    """One participant: learner + sync channels + transport + control socket + checkpoints."""

    def __init__(self, config: NodeConfig, key_pair: KeyPair) -> None:
        self.config = config
        self.key_pair = key_pair
        self.peer_id = peer_id_of(key_pair.public_key)
        self.learning = build_learning(config, self.peer_id)
        self.learner = self.learning.learner
        self.schema = self.learner.schema
        self.model = NodeModel(self.learner, 0, len(self.learning.data.y_train))
        self.counters = {"bytes_sent": 0, "bytes_received": 0, "rejected": 0, "send_failures": 0}
        self.ledger = PeerLedger()
        self.model_lock = threading.RLock()
        """Held by the training thread during a step and by the event loop whenever it
        touches the model (cores, checkpoints, evaluation)."""
        self.sync = SyncChannels(self.schema, self.counters, self.ledger, guard=self.model_lock)
        self.whole = open_core(
            self.model,
            self.peer_id,
            config.protocol_config,
            shared_part(self.schema, ["*"]),
            self.sync.port(WHOLE_MODEL),
            seed=config.seed,
            channel=WHOLE_MODEL_CHANNEL,
            neighbors=[p for p in map(peer_of_address, config.bootstrap) if p is not None],
            max_neighbors=config.target_degree,
        )
        if config.byzantine:
            log.warning(
                "this node lies to its peers (byzantine = %r): for tests only", config.byzantine
            )
            attack = ByzantineCore(self.whole.core, config.byzantine, seed=config.seed)
            self.whole.core = cast(NodeCore, attack)
        self.sync.open(Channel(WHOLE_MODEL, "the whole model", self.whole))
        saved_communities = self._restore()
        self._base = dict(self.counters)
        self.communities = Communities(
            config, self.peer_id, self.model, self.sync, self.counters, self.ledger
        )
        self.communities.load_state_dict(saved_communities)
        self.checkpoint_step = self.core.step
        self.transport: Transport | None = None
        self._nursery: trio.Nursery | None = None
        self._stop = trio.Event()
        self._refusals = RateLimitedLog(log)
        self._ckpt_lock = trio.Lock()
        self.loss = math.nan
        self.started = 0.0
        self.dashboard_url: str | None = None
        self.peer_exchange: PeerExchange | None = None

    @property
    def core(self) -> NodeCore:
        """The whole-model channel's protocol core."""
        return self.whole.core

    # ------------------------------------------------------------------ lifecycle

    def _restore(self) -> dict[str, Any]:
        """Restore learner, core and counters; return the communities' saved state."""
        restored = restore_newest(self.config.home, self._apply_checkpoint)
        if restored is None:
            log.info("no checkpoint in %s: starting at step 0", self.config.home)
            return {}
        log.info("resumed from checkpoint at step %d", self.core.step)
        return restored

    def _apply_checkpoint(self, state: dict[str, Any]) -> dict[str, Any]:
        self.counters.update(restore_node_state(self.learner, self.whole, self.peer_id, state))
        return community_states(state)

    def stop(self) -> None:
        """Ask the daemon to stop (it writes a final checkpoint first)."""
        self._stop.set()

    async def run(self, on_listening: Callable[[list[str]], None] | None = None) -> None:
        """Serve until ``stop()``, SIGINT/SIGTERM or a control ``stop``; checkpoint at exit."""
        limits = Limits(max_frame_bytes=self.sync.max_frame, **LIMITS)
        transport = Transport(
            self.key_pair,
            listen=[self.config.listen],
            limits=limits,
            on_peer_connected=self._peer_up,
            on_peer_disconnected=self._peer_down,
            pubsub=True,
            ledger=self.ledger,
        )
        self.transport = transport
        try:
            check_can_listen(self.config.listen)
        except OSError as exc:
            raise ConfigError(
                f"bad value for 'listen': cannot listen on {self.config.listen} ({exc.strerror}); "
                "another program (or node) uses that port: stop it, pick a free port, or use "
                "port 0 for any free port"
            ) from None
        book = PeerBook(self.peer_id, self.config.home)
        book.load()  # the peers heard of before a restart: found again if they moved
        self.peer_exchange = PeerExchange(
            book,
            transport,
            self.ledger,
            self.config.bootstrap,
            self.config.target_degree,
        )
        control = await bind_socket(self.config.home)
        try:
            self._serve_metrics()
            dashboard = open_dashboard(self)
        except ConfigError:
            control.close()
            socket_path(self.config.home).unlink(missing_ok=True)
            raise
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if dashboard is not None:
                    self.dashboard_url = await nursery.start(dashboard.run)
                async with transport:
                    self.sync.register(transport)
                    self.communities.register(transport)
                    self.sync.start(nursery, transport)
                    self.communities.start(nursery, transport)
                    self.started = trio.current_time()
                    nursery.start_soon(serve, control, self._respond)
                    nursery.start_soon(self._watch_signals)
                    nursery.start_soon(self._train)
                    self.peer_exchange.start(nursery)
                    relaying = Relaying(transport, self.config.relay_service, self.config.relay)
                    await nursery.start(relaying.run)
                    if self.config.mdns and is_lan_listen_addr(self.config.listen):
                        lan = LanDiscovery(transport, self._found_on_lan)
                        await nursery.start(lan.run)
                    nursery.start_soon(self._checkpoint_periodically)
                    log.info("node %s listening on %s", self.peer_id, transport.listen_addrs)
                    if on_listening is not None:
                        on_listening(transport.listen_addrs)
                    await self._stop.wait()
                    log.info("stopping at step %d", self.core.step)
                    with trio.CancelScope(shield=True):
                        await self.save_checkpoint()
                        self.peer_exchange.save_book()
                    nursery.cancel_scope.cancel()
        finally:
            control.close()
            socket_path(self.config.home).unlink(missing_ok=True)
        log.info("stopped")

    def _serve_metrics(self) -> None:
        if not self.config.metrics_port:
            return
        try:
            serve_metrics(self.config.metrics_port, self.metrics)
        except OSError as exc:
            raise ConfigError(
                f"bad value for 'metrics_port': cannot listen on 127.0.0.1:"
                f"{self.config.metrics_port} ({exc}); pick a free port or 0 to turn it off"
            ) from None

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                log.info("received %s", signal.Signals(signum).name)
                self.stop()
                return

    # ------------------------------------------------------------------- training

    async def _train(self) -> None:
        interval = self.config.step_interval
        target = self.config.steps
        step = torch.tensor([0])
        next_at = trio.current_time()
        while not target or self.core.step < target:
            # The step runs in a worker thread, so peers' frames, acknowledgements and timers
            # are served while the model trains (on the loop, a step of a few ms between
            # every turn made one frame take 0.2-2 s and sessions time out).
            self.loss = await trio.to_thread.run_sync(self._train_step, step)
            # a step in a thread cannot be cancelled: if the node stopped meanwhile, stop
            # here instead of telling the cores (their outboxes may be closed already)
            await trio.lowlevel.checkpoint_if_cancelled()
            self.sync.local_step(trio.current_time())
            if self.core.step % CHECKPOINT_EVERY_STEPS == 0:
                self._checkpoint_soon()
            next_at = max(next_at + interval, trio.current_time() - interval)
            await trio.sleep_until(next_at)
        log.info("finished %d steps; serving peers until stopped", self.core.step)
        self._checkpoint_soon()

    def _train_step(self, node: torch.Tensor) -> float:
        with self.model_lock:
            return float(self.learner.step(node)[0])

    # ---------------------------------------------------------------- checkpoints

    async def save_checkpoint(self) -> None:
        """Write a checkpoint of the current state (atomically, in a worker thread). A write
        that fails (disk full, read-only home) is logged; the node keeps training, the last
        good checkpoint stays, and the next periodic checkpoint tries again."""
        async with self._ckpt_lock:
            step = self.core.step
            with self.model_lock:
                communities = self.communities.state_dict()
                state = node_state(
                    self.learner, self.core, self.peer_id, self._counters(), communities
                )
            data = encode_checkpoint(state)
            try:
                await trio.to_thread.run_sync(write_atomically, self.config.home, data)
            except OSError as exc:
                self.counters["checkpoint_failures"] = (
                    self.counters.get("checkpoint_failures", 0) + 1
                )
                self._refusals.warning(
                    "checkpoint",
                    "checkpoint at step %d not written (%s); the checkpoint of step %d stays, "
                    "retrying within %.0f s: free space or fix the permissions of %s",
                    step,
                    exc,
                    self.checkpoint_step,
                    CHECKPOINT_EVERY_S,
                    self.config.home,
                )
                return
            self.checkpoint_step = step
            log.debug("checkpoint written at step %d", step)

    def _checkpoint_soon(self) -> None:
        if self._nursery is not None and not self._ckpt_lock.locked():
            self._nursery.start_soon(self.save_checkpoint)

    async def _checkpoint_periodically(self) -> None:
        while True:
            await trio.sleep(CHECKPOINT_EVERY_S)
            await self.save_checkpoint()

    # ---------------------------------------------------------------------- peers

    def _peer_up(self, peer: str) -> None:
        log.info("peer %s connected", peer)
        with self.model_lock:
            self.whole.peer_up(trio.current_time(), peer)
        self.communities.peer_up(peer)
        if self.peer_exchange is not None:
            self.peer_exchange.peer_up(peer)

    def _found_on_lan(self, peer: str, addrs: tuple[str, ...]) -> None:
        assert self.peer_exchange is not None
        self.peer_exchange.heard(peer, addrs, "mdns")

    def _peer_down(self, peer: str) -> None:
        log.info("peer %s disconnected", peer)
        self.sync.peer_gone(peer)
        with self.model_lock:
            self.whole.peer_down(trio.current_time(), peer)
        self.communities.peer_down(peer)

    # -------------------------------------------------------------------- status

    def _counters(self) -> dict[str, int]:
        counters = dict(self.counters)
        if self.transport is not None:
            counters["bytes_sent"] = self._base["bytes_sent"] + self.transport.bytes_sent
            counters["bytes_received"] = (
                self._base["bytes_received"] + self.transport.bytes_received
            )
        return counters

    def metrics(self) -> dict[str, Any]:
        """Plain numbers for the metrics endpoint (safe to read from another thread)."""
        transport = self.transport
        return {
            "step": self.core.step,
            "syncs": self.core.stats.syncs,
            **self._counters(),
            "peers": len(transport.peers()) if transport is not None else 0,
            "loss": self.loss,
            "communities": self.communities.status(),
        }

    def status(self) -> dict[str, Any]:
        """Everything ``p2pfl node status`` shows."""
        assert self.transport is not None
        data, dataset = self.learning.data, self.learning.dataset
        return {
            "peer_id": self.peer_id,
            "listen_addrs": self.transport.listen_addrs,
            "peers": sorted(self.transport.peers()),
            "neighbors": self.core.live_neighbors,
            "protocol": self.config.protocol,
            "step": self.core.step,
            "steps": self.config.steps,
            "done": bool(self.config.steps) and self.core.step >= self.config.steps,
            "syncs": self.core.stats.syncs,
            "core_stats": self.core.stats.as_dict(),
            **self._counters(),
            "loss": None if math.isnan(self.loss) else self.loss,
            "local_accuracy": self._accuracy(data.x_test, data.y_test),
            "test_accuracy": self._accuracy(dataset.x_test, dataset.y_test),
            "train_samples": len(data.y_train),
            "checkpoint_step": self.checkpoint_step,
            "communities": self.communities.status(),
            "uptime_s": round(trio.current_time() - self.started, 3),
            "dashboard_url": self.dashboard_url,
        }

    def details(self) -> dict[str, Any]:
        """What the dashboard shows beside the status: every peer this node dealt with,
        holds as a neighbour or heard of (traffic, connected/down, refusals and why, how it
        was found) and the checkpoint files."""
        records = self.ledger.snapshot()
        neighbours = self.core.neighbors
        book = self.peer_exchange.book.known if self.peer_exchange is not None else {}
        peers = []
        for peer in sorted(set(records) | neighbours | set(book)):
            record = records.get(peer, {})
            if record.get("connected"):
                state = "connected"
            elif peer in self.core.down:
                state = "down"
            else:
                state = "not connected" if peer in records else "known"
            known = book.get(peer)
            communities = [c["name"] for c in self.communities.status() if peer in c["members"]]
            peers.append(
                {
                    "peer": peer,
                    "state": state,
                    "neighbour": peer in neighbours,
                    "communities": communities,
                    "found_via": known.source if known is not None else None,
                    "addrs": list(known.addrs) if known is not None else [],
                    **record,
                }
            )
        return {"peer_table": peers, "checkpoints": checkpoint_files(self.config.home)}

    def _accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float | None:
        if not len(y):
            return None
        with self.model_lock:
            accuracy, _ = self.learner.evaluate(x, y)
        return float(accuracy[0])

    async def _respond(self, request: dict[str, Any]) -> dict[str, Any]:
        cmd = request["cmd"]
        if cmd == "status":
            return self.status()
        if cmd == "stop":
            self.stop()
            return {"ok": True}
        if cmd == "ping":
            return {"ok": True}
        if cmd == "communities":
            try:
                return {"ok": True, "communities": await self.communities.reload()}
            except (CommunityError, ConfigError) as exc:
                return {"error": str(exc)}
            except Exception as exc:  # a reload must never take the daemon down
                log.exception("re-reading the communities failed")
                return {"error": f"re-reading the communities failed: {exc} (see node.log)"}
        return {"error": f"unknown command {cmd!r}; use status, stop, ping or communities"}
