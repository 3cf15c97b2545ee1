"""A node's life: validated, stored, live in the registry, probed.

The node service is the one place admin changes to nodes and routing go
through, from the REST API, the pages and the --node flags alike. Each
change validates what the client sent, writes the store and brings the
registry in line in the same call, so routing sees it at once; a node that
is new, moved or re-enabled is probed right away rather than at the next
health cycle. No HTTP here: handlers turn ValidationError and LookupError
into answers.
"""
from __future__ import annotations

import datetime
import logging
import math
from typing import Any, Callable

import peewee

from . import store
from .nodeaddr import (DEFAULT_PORT, InvalidAddress, base_url, default_name, parse_node_url,
                       split_address)
from .registry import NodeState, Registry
from .router import DEFAULT_LOAD_FACTOR, DEFAULT_STRATEGY, STRATEGIES, Router
from .tasks import BackgroundTasks

log = logging.getLogger("aivonx.nodes")

MAX_NAME = 100
MAX_SLOTS = 1024     # parallel requests a node takes before requests queue
MAX_WEIGHT = 100.0   # relative capacity; weights above this say nothing more


class ValidationError(Exception):
    """What was wrong, field by field; status 400, or 409 for a duplicate."""

    def __init__(self, errors: dict[str, str], status: int = 400,
                 message: str | None = None) -> None:
        super().__init__("; ".join(f"{k}: {v}" for k, v in errors.items()))
        self.errors = errors
        self.status = status
        self.message = message  # the answer's `error`; None: the usual words


def node_dict(node: store.Node) -> dict[str, Any]:
    created = node.created_at
    if isinstance(created, datetime.datetime):
        created = created.replace(tzinfo=datetime.timezone.utc).isoformat()
    return {"id": node.id, "name": node.name, "address": node.address, "port": node.port,
            "active": node.active, "slots": node.slots, "weight": node.weight,
            "created_at": created}


def _port(value: Any) -> int:
    """An integer 1-65535; numeric strings are accepted as the old API did."""
    if isinstance(value, str) and value.strip().isdigit() and len(value.strip()) <= 5:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError("port must be an integer between 1 and 65535")
    return value


def _slots(value: Any) -> int:
    """A JSON integer 1-MAX_SLOTS: no strings, booleans or fractions."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SLOTS:
        raise ValueError(f"slots must be an integer between 1 and {MAX_SLOTS}")
    return value


def _weight(value: Any) -> float:
    """A JSON number above 0 and at most MAX_WEIGHT (NaN and infinities are
    not numbers here)."""
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or (isinstance(value, float) and not math.isfinite(value))
            or not 0 < value <= MAX_WEIGHT):
        raise ValueError(f"weight must be a number greater than 0 and at most {MAX_WEIGHT:g}")
    return float(value)


def _name(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("name must be a string")
    value = value.strip()
    if not value:
        raise ValueError("name may not be blank")
    if len(value) > MAX_NAME:
        raise ValueError(f"name must have at most {MAX_NAME} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("name may not contain control characters")
    return value


def _clean(data: Any, current: store.Node | None, partial: bool) -> dict[str, Any]:
    """Validated field values for a create (current None) or an update."""
    if not isinstance(data, dict):
        raise ValidationError({"non_field_errors": "expected a JSON object"})
    errors: dict[str, str] = {}
    out: dict[str, Any] = {}
    for field in ("name", "address", "port", "active", "slots", "weight"):
        if field in data and data[field] is None:
            errors[field] = "may not be null"
    if "address" not in data and not partial:
        errors["address"] = "this field is required"
    address_port = None
    if "address" in data and "address" not in errors:
        try:
            if not isinstance(data["address"], str):
                raise InvalidAddress("address must be a string")
            out["address"], address_port = split_address(data["address"])
        except InvalidAddress as exc:
            errors["address"] = str(exc)
    if data.get("port") is not None:
        try:
            out["port"] = _port(data["port"])
        except ValueError as exc:
            errors["port"] = str(exc)
    if address_port is not None:
        if "port" in out and out["port"] != address_port:
            errors["port"] = f"conflicts with the port in address ({address_port})"
        out["port"] = address_port
    if data.get("name") is not None:
        try:
            out["name"] = _name(data["name"])
        except ValueError as exc:
            errors["name"] = str(exc)
    if data.get("active") is not None:
        if isinstance(data["active"], bool):
            out["active"] = data["active"]
        else:
            errors["active"] = "must be true or false"
    for field, check in (("slots", _slots), ("weight", _weight)):
        if data.get(field) is not None:
            try:
                out[field] = check(data[field])
            except ValueError as exc:
                errors[field] = str(exc)
    if errors:
        raise ValidationError(errors)
    address = out.get("address", current.address if current else None)
    port = out.setdefault("port", current.port if current else DEFAULT_PORT)
    if current is None and "name" not in out:
        out["name"] = default_name(address, port)
    duplicate = store.Node.select().where((store.Node.address == address)
                                          & (store.Node.port == port))
    if current is not None:
        duplicate = duplicate.where(store.Node.id != current.id)
    if duplicate.exists():
        raise ValidationError({"address": f"a node with address {address} and port {port} "
                                          "already exists"}, status=409)
    return out


def _saved(fn: Any) -> Any:
    """Run a write; a race on the unique (address, port) index is a 409."""
    try:
        return fn()
    except peewee.IntegrityError:
        raise ValidationError({"address": "a node with this address and port already exists"},
                              status=409) from None


class NodeService:
    """Owns the nodes: the store's rows and the registry's live state agree
    after every call."""

    def __init__(self, registry: Registry, router: Router, scheduler: Any, monitor: Any,
                 tasks: BackgroundTasks, close_idle: Callable[[str], None],
                 share: Callable[[int], int] = lambda slots: slots) -> None:
        self.registry = registry
        self.router = router
        self.scheduler = scheduler
        self.monitor = monitor
        self.tasks = tasks
        # Closes the kept-alive upstream connections to a node's URL.
        self.close_idle = close_idle
        # This process's part of a node's slots (aivonx.workers); all of them
        # with one worker.
        self.share = share
        self.persist = False  # set once the store is open
        # Told of every admin change ("node", id) or ("strategy", None), to
        # tell the other instances (aivonx.cluster); nothing by default.
        self.on_change: Callable[[str, int | None], None] = lambda kind, key: None

    # -- start-up --------------------------------------------------------------
    def load(self, urls: list[str], fallback: str | None = None) -> None:
        """Add each --node URL (idempotent across restarts), then bring every
        stored node and the stored strategy into the registry. With no node
        given and none stored, `fallback` (the local Ollama) is served."""
        self.persist = True
        if not urls and fallback and not store.Node.select().exists():
            urls = [fallback]
            log.info("no node configured: serving the local Ollama at %s (OLLAMA_HOST or "
                     "its default); add nodes with --node or the API", fallback)
        for url in urls:
            address, port = parse_node_url(url)
            if not store.Node.select().where((store.Node.address == address)
                                             & (store.Node.port == port)).exists():
                try:
                    with store.database.atomic():
                        store.Node.create(name=default_name(address, port), address=address,
                                          port=port)
                except peewee.IntegrityError:
                    continue  # another instance sharing the database added it just now
                log.info("added node %s:%s", address, port)
        strategy = store.get_config("strategy", DEFAULT_STRATEGY)
        self.router.strategy = strategy if strategy in STRATEGIES else DEFAULT_STRATEGY
        factor = store.get_config("cache_load_factor", DEFAULT_LOAD_FACTOR)
        self.router.load_factor = factor if _valid_factor(factor) else DEFAULT_LOAD_FACTOR
        for node in store.Node.select():
            self.sync(node)

    # -- store -> registry ---------------------------------------------------
    def sync(self, node: store.Node) -> NodeState:
        """Bring the registry in line with a stored node (after any change)."""
        state = self.registry.upsert(node.id, node.name, node.address, node.port,
                                     node.active, node.models,
                                     slots=self.share(node.slots), weight=node.weight)
        self.scheduler.dispatch()  # more capacity may wake waiting requests
        return state

    def refresh(self) -> None:
        """Apply what other processes on the same store changed (the workers
        of one Aivonx): nodes added, changed or deleted, and the strategy. A
        read of two small tables; the registry changes only where they differ."""
        rows = {node.id: node for node in store.Node.select()}
        for node_id, state in list(self.registry.nodes.items()):
            if node_id not in rows:
                self.registry.remove(node_id)
                self.close_idle(state.url)
                log.info("node %s was deleted by another worker", state.name)
        for node in rows.values():
            state = self.registry.nodes.get(node.id)
            if state is None:
                self.probe_soon(self.sync(node))
                continue
            moved = (state.address, state.port) != (node.address, node.port)
            enabled = node.active and not state.enabled
            drained = state.enabled and not node.active
            if not (moved or enabled or drained or state.name != node.name
                    or state.slots != self.share(node.slots) or state.weight != node.weight):
                continue
            old_url = state.url
            self.sync(node)
            if moved or enabled:
                self.probe_soon(state)
            if moved or drained:
                self.close_idle(old_url)
        strategy = store.get_config("strategy", DEFAULT_STRATEGY)
        if strategy in STRATEGIES and strategy != self.router.strategy:
            self.router.strategy = strategy

    def models_changed(self, state: NodeState) -> None:
        """A node's model list changed (probe or listing): keep it, so routing
        works from the first request after a restart."""
        if not self.persist:
            return
        models = sorted(state.models.values())
        if store.offloaded():
            self.tasks.spawn(store.run(store.save_models, state.id, models),
                             f"saving the models of node {state.name}")
        else:
            store.save_models(state.id, models)

    def probe_soon(self, state: NodeState) -> None:
        self.tasks.spawn(self.monitor.probe(state), f"probe of node {state.name}")

    # -- admin changes ---------------------------------------------------------
    # Each change is its store part (validation reads and the write, in one
    # transaction, safe in the store's threads) and its registry part (on the
    # event loop). The sync methods run the store part inline (start-up,
    # SQLite); the `*_async` ones through store.run, which on PostgreSQL keeps
    # the round trips off the event loop.
    def create(self, data: Any) -> store.Node:
        return self._created(self._insert(data))

    async def create_async(self, data: Any) -> store.Node:
        return self._created(await store.run(self._insert, data))

    def update(self, node_id: int, data: Any, partial: bool) -> store.Node:
        """Change a node (PUT: address required; PATCH: any subset). Moving it
        voids what was known about the old machine; re-enabling it or moving
        it probes it at once; disabling it drains it (requests in flight
        finish). New slots or weight apply to the next routing decision: more
        slots hand waiting requests to the node at once, fewer let the ones
        in flight finish."""
        return self._updated(*self._save(node_id, data, partial))

    async def update_async(self, node_id: int, data: Any, partial: bool) -> store.Node:
        return self._updated(*await store.run(self._save, node_id, data, partial))

    def delete(self, node_id: int) -> None:
        """Forget a node; requests it is serving finish, no new ones go there."""
        self._deleted(self._remove(node_id))

    async def delete_async(self, node_id: int) -> None:
        self._deleted(await store.run(self._remove, node_id))

    def set_strategy(self, name: Any) -> None:
        """Switch the routing strategy for the next request, and keep it."""
        store.set_config("strategy", check_strategy(name))
        self.strategy_saved(name)

    async def set_strategy_async(self, name: Any) -> None:
        await store.run(store.set_config, "strategy", check_strategy(name))
        self.strategy_saved(name)

    # store parts: no registry, no event loop
    @staticmethod
    def _insert(data: Any) -> store.Node:
        with store.database.atomic():
            values = _clean(data, None, partial=False)
            return _saved(lambda: store.Node.create(**values))

    @staticmethod
    def _save(node_id: int, data: Any, partial: bool) -> tuple[store.Node, dict, bool, bool,
                                                                bool, str]:
        with store.database.atomic():
            node = store.Node.get_or_none(store.Node.id == node_id)
            if node is None:
                raise LookupError(node_id)
            values = _clean(data, node, partial)
            moved = ((values.get("address", node.address), values["port"])
                     != (node.address, node.port))
            enabled = values.get("active", node.active) and not node.active
            drained = node.active and not values.get("active", node.active)
            old_url = base_url(node.address, node.port)
            for field, value in values.items():
                setattr(node, field, value)
            if moved:
                node.models_json = "[]"
            _saved(node.save)
        return node, values, moved, enabled, drained, old_url

    @staticmethod
    def _remove(node_id: int) -> store.Node:
        with store.database.atomic():
            node = store.Node.get_or_none(store.Node.id == node_id)
            if node is None:
                raise LookupError(node_id)
            node.delete_instance()
        return node

    # registry parts
    def _created(self, node: store.Node) -> store.Node:
        self.probe_soon(self.sync(node))
        log.info("added node %s (%s:%s)", node.name, node.address, node.port)
        self.on_change("node", node.id)
        return node

    def _updated(self, node: store.Node, values: dict, moved: bool, enabled: bool,
                 drained: bool, old_url: str) -> store.Node:
        state = self.sync(node)
        if moved or enabled:
            self.probe_soon(state)
        if moved or drained:
            self.close_idle(old_url)  # requests in flight keep theirs
        log.info("updated node %s: %s", node.id, ", ".join(sorted(values)))
        self.on_change("node", node.id)
        return node

    def _deleted(self, node: store.Node) -> None:
        self.registry.remove(node.id)
        self.close_idle(base_url(node.address, node.port))
        log.info("deleted node %s (%s:%s)", node.id, node.address, node.port)
        self.on_change("node", node.id)

    def strategy_saved(self, name: str) -> None:
        """The stored strategy changed: route by it from the next request."""
        self.router.strategy = name
        log.info("routing strategy is now %s", name)
        self.on_change("strategy", None)

    def set_load_factor(self, value: Any) -> None:
        """How far above the mean in-flight load cache_aware lets affinity
        take a node (see aivonx.router.within_bound), kept across restarts."""
        store.set_config("cache_load_factor", check_load_factor(value))
        self.load_factor_saved(value)

    def load_factor_saved(self, value: float) -> None:
        """The stored load factor changed: use it from the next request."""
        self.router.load_factor = float(value)
        log.info("cache_aware load factor is now %g", value)
        self.on_change("cache_load_factor", None)

    # -- changes made by another instance (aivonx.cluster) -----------------------
    def apply_stored(self, node_id: int, node: store.Node | None) -> None:
        """Another instance changed node `node_id`; `node` is its row as
        stored now (None: deleted). Probed at once when new or moved."""
        state = self.registry.nodes.get(node_id)
        if node is None:
            if state is not None:
                self.registry.remove(node_id)
                self.close_idle(state.url)
                log.info("node %s was deleted by another instance", node_id)
            return
        old_url = state.url if state is not None else None
        was_enabled = state.enabled if state is not None else False
        state = self.sync(node)
        if old_url != state.url or (state.enabled and not was_enabled):
            self.probe_soon(state)
        if old_url is not None and (old_url != state.url or not state.enabled):
            self.close_idle(old_url)

    def apply_strategy(self, strategy: Any) -> None:
        """Another instance stored a new strategy."""
        if strategy in STRATEGIES:
            self.router.strategy = strategy

    def apply_load_factor(self, factor: Any) -> None:
        """Another instance stored a new cache_aware load factor."""
        if _valid_factor(factor):
            self.router.load_factor = float(factor)

    def apply_all(self, nodes: list[store.Node], strategy: Any) -> None:
        """Bring the registry in line with every stored node (after missed
        changes, e.g. while Redis was unreachable)."""
        stored = {n.id: n for n in nodes}
        for node_id in list(self.registry.nodes):
            if node_id not in stored:
                self.apply_stored(node_id, None)
        for node_id, node in stored.items():
            self.apply_stored(node_id, node)
        self.apply_strategy(strategy)


def check_strategy(name: Any) -> str:
    valid = ", ".join(STRATEGIES)
    if not isinstance(name, str):
        raise ValidationError({"strategy": f"must be a string, one of: {valid}"})
    if name not in STRATEGIES:
        raise ValidationError({"strategy": f"unknown strategy {name[:100]!r}; valid: {valid}"})
    return name


def check_load_factor(value: Any) -> float:
    if not _valid_factor(value):
        raise ValidationError({"cache_load_factor": f"must be a number from 1 to "
                                                    f"{MAX_LOAD_FACTOR:g}"})
    return float(value)


MAX_LOAD_FACTOR = 100.0


def _valid_factor(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and 1.0 <= value <= MAX_LOAD_FACTOR)
