"""The objects every handler shares, wired together once.

Wiring only: each job belongs to the service that owns it (nodes, listings,
model operations, the relay); the context builds them, opens the store,
starts the monitor and closes everything at shutdown.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket

import peewee
from tornado.ioloop import PeriodicCallback

from . import store
from .auth import Auth
from .cluster import Cluster, SharedSlots
from .cluster.health import SharedHealth
from .cluster.wakeups import SlotWakeups
from .cluster.keylimits import SharedKeyLimits
from .dblock import DatabaseLock
from .intake import BodyBudget
from .keepalive import KeepAlivePolicy
from .keys import MODES, KeyService
from .listings import Listings
from .memtrim import MemoryTrimmer
from .metrics import Metrics
from .modelops import FanOut, ModelOps
from .monitor import Monitor
from .nodes import NodeService
from .registry import NodeState, Registry
from .relay import Relay
from .router import Router
from .scheduler import Scheduler
from .settings import Settings
from .tasks import BackgroundTasks
from .relay.upstream import node_ssl_context
from .workers import REFRESH_INTERVAL, inherited_lock, slot_share

log = logging.getLogger("aivonx")


class Context:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.tasks = BackgroundTasks()
        self.registry = Registry()
        self.router = Router(self.registry)
        self.scheduler = Scheduler(self.registry, self.router, max_queue=settings.max_queue,
                                   max_wait=settings.max_wait)
        self.metrics = Metrics()
        node_ssl = node_ssl_context(settings.node_ca_file)
        self.relay = Relay(self.registry, self.router, self.scheduler, self.metrics,
                           connect_timeout=settings.connect_timeout,
                           idle_timeout=settings.idle_timeout,
                           max_body_size=settings.max_body_size, node_ssl=node_ssl,
                           allowed=settings.node_networks)
        self.monitor = Monitor(self.registry, interval=settings.health_interval,
                               timeout=settings.probe_timeout, node_ssl=node_ssl,
                               allowed=settings.node_networks,
                               on_status_changed=self._status_changed)
        self.nodes = NodeService(self.registry, self.router, self.scheduler, self.monitor,
                                 self.tasks, close_idle=self.relay.client.close_idle,
                                 # With --redis the slots are shared exactly instead.
                                 share=lambda slots: slots if settings.redis else slot_share(
                                     slots, settings.worker_index, settings.workers))
        self.monitor.on_models_changed = self.nodes.models_changed
        self.listings = Listings(self.registry, self.router, self.monitor.client,
                                 settings.probe_timeout,
                                 on_models_changed=self.nodes.models_changed)
        fanout = FanOut(self.relay.client, connect_timeout=settings.connect_timeout,
                        idle_timeout=settings.idle_timeout)
        self.modelops = ModelOps(self.registry, self.monitor, fanout, self.tasks)
        # A node answered 404 for a model it listed: look again right away.
        self.relay.on_missing_model = self.nodes.probe_soon
        self.trimmer = MemoryTrimmer(lambda: self.relay.in_flight,
                                     lambda: self.relay.peak_in_flight, self.relay.reset_peak)
        self.auth = Auth(settings.root_password)
        self.keys = KeyService(self.metrics)
        self.keys.host = settings.host
        self.auth.on_failed_login = lambda username, address, status: self.keys.audit.record(
            username, address, "login failed", status)
        self.body_budget = BodyBudget(settings.max_body_in_flight)
        self.keep_alive = KeepAlivePolicy()
        self.db: peewee.Database | None = None
        self.db_lock: DatabaseLock | None = None
        self._refresher: PeriodicCallback | None = None
        self.instance = settings.instance_name or f"{socket.gethostname()}-{os.getpid()}"
        self.cluster: Cluster | None = None
        self.health: SharedHealth | None = None
        self._leaving: asyncio.Future | None = None
        if settings.redis:
            self.cluster = Cluster(settings.redis, self.instance, self.nodes, self.keep_alive)
            self.scheduler.shared = SharedSlots(self.cluster)
            self.scheduler.shared.wakeups = SlotWakeups(self.cluster, self.scheduler.dispatch)
            self.nodes.on_change = self.cluster.publish
            # A node another instance saw fail takes no new requests here; those
            # in flight on it run on (this instance may still reach it).
            self.health = SharedHealth(self.cluster, self.registry, self.scheduler.dispatch)
            self.cluster.live_handlers["health"] = self.health.apply
            self.cluster.keys = self.keys
            self.keys.on_change = self.cluster.publish
            self.keys.shared = SharedKeyLimits(self.cluster, self.keys.limits,
                                               self.keys.usage_totals, self.keys.seed_limits)

    def _status_changed(self, node: NodeState) -> None:
        if not node.healthy:
            self.relay.node_down(node)
        self.scheduler.dispatch()  # a node back may wake waiting requests

    def open_store(self) -> None:
        """StoreError (one line saying why) when the database is in use by
        another process or cannot be opened."""
        if self.settings.worker_lock_fd is not None:  # a worker: its supervisor holds it
            self.db_lock = inherited_lock(self.settings.db, self.settings.worker_lock_fd)
        # Instances share a PostgreSQL database; a SQLite file is one process's.
        elif not store.is_postgres(self.settings.db):
            self.db_lock = DatabaseLock(self.settings.db)
        try:
            self.db = store.open_database(self.settings.db)
        except store.StoreError:
            if self.db_lock is not None:
                self.db_lock.release()
            raise
        generated = self.auth.ensure_root()
        if generated:
            log.warning("created user root with the generated password %s (shown only "
                        "once; change it with `python run.py passwd root`)", generated)
        self.nodes.load(self.settings.nodes, fallback=self.settings.local_node)
        self.keep_alive.load(store.get_config("keep_alive"))
        self.keys.load()
        self.keys.warn_if_exposed()
        store.release_connection()

    async def start(self) -> None:
        """Join the cluster, probe every node once before serving, then keep
        probing."""
        if self.cluster is not None:
            await self.cluster.start()
        await self.monitor.probe_all()
        self.monitor.start()
        self.keys.start()
        self.trimmer.start()
        if self.settings.workers > 1:
            # Admin changes made through the other workers reach this one.
            self._refresher = PeriodicCallback(self.refresh_from_store,
                                               REFRESH_INTERVAL * 1000)
            self._refresher.start()

    def refresh_from_store(self) -> None:
        """A worker of several (aivonx.workers): apply what the others wrote,
        the nodes and the strategy, the keys and the inference mode (a key
        revoked through one worker stops working on all of them)."""
        self.nodes.refresh()
        keyring = self.keys.keyring
        before = dict(keyring.by_id)
        keyring.load()
        for key_id, key in keyring.by_id.items():
            old = before.get(key_id)
            if old is not None:  # when it was last used is known here first
                key.last_used = max(filter(None, (key.last_used, old.last_used)), default=None)
        mode = store.get_config("inference_auth", "open")
        if mode in MODES:
            self.keys.mode = mode

    async def wait_closed(self) -> None:
        """After close(): until the cluster was told this instance left."""
        if self._leaving is not None:
            await asyncio.gather(self._leaving, return_exceptions=True)

    def close(self) -> None:
        self.tasks.cancel_all()
        self.trimmer.stop()
        if self._refresher is not None:
            self._refresher.stop()
        self.monitor.stop()
        self.relay.close()
        if self.cluster is not None:
            self._leaving = self.cluster.stop()
        if self.db is not None:
            self.keys.close()  # the last usage batch
            store.close_database(self.db)
        if self.db_lock is not None:
            self.db_lock.release()
