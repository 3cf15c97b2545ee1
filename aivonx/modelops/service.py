"""Model operations across the cluster: which nodes, and what the outcome is.

Pull, create, copy, delete, push and unload each go to the nodes their
policy picks (every serving node, those having the source, the newest
copy, those holding the model in memory), run on all of them at once
through the fan-out, and end in one OpResult the handlers turn into a
status code. Afterwards the nodes are looked at again, so routing and the
listings show the change before the client hears it is done.
"""
from __future__ import annotations

import asyncio
import datetime
import logging
import re
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from .. import catalog, modelnames
from ..monitor import Monitor
from ..registry import NodeState, Registry
from ..tasks import BackgroundTasks
from .fanout import Cancel, FanOut, NodeResult, OnLine
from .progress import ProgressMerger

log = logging.getLogger("aivonx.modelops")

Emit = Callable[[dict[str, Any]], Awaitable[None]]


class NoNodeAvailable(Exception):
    """No node is serving: the operation has nowhere to go."""


class UnknownModel(Exception):
    """No serving node has the model the operation starts from."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def failure_message(verb: str, nodes: list[NodeState],
                    errors: dict[int, str | None]) -> str | None:
    """None when no node has an error, else one message naming each failed
    node and its reason."""
    failed = [f"{n.name}: {errors[n.id]}" for n in nodes if errors.get(n.id)]
    if not failed:
        return None
    return f"{verb} failed on {len(failed)} of {len(nodes)} node(s): " + "; ".join(failed)


def common_refusal(results: dict[int, NodeResult]) -> tuple[int, str] | None:
    """When every node refused the request with the same client error (4xx),
    that status and the first node's message: the request itself is wrong,
    which is the client's to hear, not a failure of the cluster."""
    codes = {r.code for r in results.values()}
    if not results or any(r.ok for r in results.values()) or len(codes) != 1:
        return None
    code = codes.pop()
    if code is None or not 400 <= code < 500:
        return None
    return code, next(iter(results.values())).error or f"node answered {code}"


@dataclass
class OpResult:
    """How an operation went on its nodes. `any_node` operations (delete)
    succeed when one node did; the others only when every node did."""
    verb: str
    nodes: list[NodeState]
    results: dict[int, NodeResult]
    cancelled: bool = False
    any_node: bool = False
    answer: dict[str, Any] | None = None  # the body to answer, where the service makes it

    @property
    def ok(self) -> bool:
        oks = [r.ok for r in self.results.values()]
        return bool(oks) and (any(oks) if self.any_node else all(oks))

    @property
    def refusal(self) -> tuple[int, str] | None:
        return common_refusal(self.results)

    @property
    def error(self) -> str | None:
        """The failed nodes and why, or None when the operation succeeded."""
        if self.ok:
            return None
        return failure_message(self.verb, self.nodes,
                               {i: r.error for i, r in self.results.items()})

    @property
    def status(self) -> int:
        """200; the nodes' own 4xx when all refused alike; else 500."""
        if self.ok:
            return 200
        refusal = self.refusal
        return refusal[0] if refusal else 500

    @property
    def message(self) -> str:
        refusal = self.refusal
        return refusal[1] if refusal else self.error or ""

    def summary(self, model: str) -> dict[str, Any]:
        """The per-node summary the management pull and the status page end with."""
        error = self.error
        out: dict[str, Any] = {
            "done": True, "model": model, "status": "error" if error else "success",
            "results": [{"node_id": n.id, "node": n.name, **self.results[n.id].as_dict()}
                        for n in self.nodes]}
        if error:
            out["error"] = error
        return out


def having(registry: Registry, name: str) -> list[NodeState]:
    """Routable nodes that list the model, by id."""
    key = modelnames.canonical(name)
    return sorted((n for n in registry.routable() if n.has_model(key)), key=lambda n: n.id)


def newest_copy(nodes: list[NodeState], name: str) -> NodeState:
    """The node holding the most recently modified copy of a model (a push
    sends one copy: pushing several would race on the registry's manifest)."""
    key = modelnames.canonical(name)

    def modified(node: NodeState) -> Any:
        for entry in node.tags:
            entry_name = entry.get("model") or entry.get("name") or ""
            try:
                if modelnames.canonical(entry_name) == key:
                    return catalog.parse_time(entry.get("modified_at"))
            except modelnames.InvalidModelName:
                continue
        return catalog.parse_time(None)

    return max(nodes, key=modified)  # max keeps the first of equals


# Go's time.ParseDuration, which Ollama reads a string keep_alive with.
_DURATION = re.compile(r"(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:ns|us|µs|μs|ms|s|m|h))+")
_DURATION_PART = re.compile(r"([0-9]+\.?[0-9]*|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h)")
_NANOSECONDS = {"ns": 1, "us": 1e3, "µs": 1e3, "μs": 1e3, "ms": 1e6, "s": 1e9, "m": 6e10,
                "h": 3.6e12}


def keep_alive_is_zero(value: Any) -> bool:
    """Whether Ollama reads `keep_alive` as zero ("unload now"): a number of
    seconds under a nanosecond and not negative (negative is forever), or a
    duration string of zero such as "0", "0s" or "0m0s"."""
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return 0 <= value < 1e-9
    if not isinstance(value, str) or len(value) > 100:
        return False
    text = value[1:] if value[:1] in ("+", "-") else value
    if text == "0":
        return True
    if not _DURATION.fullmatch(text):
        return False  # the node answers its own 400
    return sum(float(n) * _NANOSECONDS[u] for n, u in _DURATION_PART.findall(text)) < 1


def is_unload(body: dict[str, Any], content_field: str) -> bool:
    """An unload as Ollama defines it: nothing to generate (`prompt` for
    /api/generate, `messages` for /api/chat) and keep_alive zero."""
    return not body.get(content_field) and keep_alive_is_zero(body.get("keep_alive"))


def unload_answer(model: str, chat: bool) -> dict[str, Any]:
    """What Ollama answers an unload: one JSON object, streamed or not."""
    created = datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")
    out: dict[str, Any] = {"model": model, "created_at": created}
    if chat:
        out["message"] = {"role": "assistant", "content": ""}
    else:
        out["response"] = ""
    out.update(done=True, done_reason="unload")
    return out


class ModelOps:
    """The cluster's model operations; handlers pick targets from the
    request, stream lines and map the OpResult to a status code."""

    def __init__(self, registry: Registry, monitor: Monitor, fanout: FanOut,
                 tasks: BackgroundTasks) -> None:
        self.registry = registry
        self.monitor = monitor
        self.fanout = fanout
        self.tasks = tasks

    # -- targets ---------------------------------------------------------------
    def serving(self) -> list[NodeState]:
        """Every routable node, by id."""
        nodes = sorted(self.registry.routable(), key=lambda n: n.id)
        if not nodes:
            raise NoNodeAvailable()
        return nodes

    def having(self, name: str) -> list[NodeState]:
        return having(self.registry, name)

    async def reprobe(self, nodes: list[NodeState]) -> None:
        """Look at the nodes again now, so routing and listings show what the
        operation changed before the client hears it is done."""
        await asyncio.gather(*(self.monitor.probe(n) for n in nodes), return_exceptions=True)

    # -- a pull reported node by node (management API, status page) -----------
    async def pull(self, model: str, targets: list[NodeState], on_line: OnLine | None, *,
                   insecure: bool = False, cancel: Cancel | None = None) -> OpResult:
        """Pull `model` on each target concurrently, every progress line of
        every node going to on_line(node, line) as it arrives."""
        body = {"model": model, "insecure": insecure, "stream": True}
        cancel = cancel or Cancel()
        results = await self.fanout.call_nodes(targets, "POST", "/api/pull", body, on_line,
                                               cancel, expect_success=True)
        return await self._finish("pull", targets, results, cancel)

    def start_pull(self, model: str, targets: list[NodeState]) -> None:
        """Pull in the background; the model shows in the listings when done."""
        self.tasks.spawn(self.pull(model, targets, None), f"pull of {model}")

    # -- Ollama's operations, one merged progress stream ------------------------
    async def ollama_pull(self, body: dict[str, Any], emit: Emit | None,
                          cancel: Cancel) -> OpResult:
        """Ollama's pull, on every serving node."""
        return await self._progress("pull", "/api/pull", body, self.serving(), emit, cancel)

    async def create(self, body: dict[str, Any], emit: Emit | None, cancel: Cancel) -> OpResult:
        """Ollama's create, on the nodes having `from`, else on every serving
        node (`from` a file or blob, or no `from`)."""
        source = body.get("from")
        targets: list[NodeState] = []
        if source:
            try:
                targets = self.having(source)
            except modelnames.InvalidModelName:
                pass
        return await self._progress("create", "/api/create", body, targets or self.serving(),
                                    emit, cancel)

    async def push(self, body: dict[str, Any], model: str, emit: Emit | None,
                   cancel: Cancel) -> OpResult:
        """Ollama's push, from the one node with the newest copy."""
        nodes = self.having(model)
        if not nodes:
            raise UnknownModel(model)
        return await self._progress("push", "/api/push", body, [newest_copy(nodes, model)],
                                    emit, cancel, reprobe=False)

    async def copy(self, body: dict[str, Any], source: str, cancel: Cancel) -> OpResult:
        """Ollama's copy, on every node having the source."""
        targets = self.having(source)
        if not targets:
            raise UnknownModel(source)
        results = await self.fanout.call_nodes(targets, "POST", "/api/copy", body, None, cancel,
                                               expect_success=False)
        return await self._finish("copy", targets, results, cancel)

    async def delete(self, body: dict[str, Any], cancel: Cancel) -> OpResult:
        """Ollama's delete, on every serving node; done when one had it."""
        targets = self.serving()
        results = await self.fanout.call_nodes(targets, "DELETE", "/api/delete", body, None,
                                               cancel, expect_success=False)
        result = await self._finish("delete", targets, results, cancel)
        result.any_node = True
        return result

    async def unload(self, model: str, key: str, path: str, body: dict[str, Any],
                     cancel: Cancel) -> OpResult | None:
        """An unload (keep_alive 0, nothing to generate; `path` is
        /api/generate or /api/chat) on every node that holds the model in
        memory, answered once in Ollama's shape. None when no node holds it:
        then one node answers, as routing picks it."""
        reachable = [n for n in self.registry.nodes.values() if n.enabled and n.healthy]
        await self.reprobe(reachable)  # what each holds now, not at the last probe
        targets = sorted((n for n in reachable if n.healthy and key in n.loaded_keys()),
                         key=lambda n: n.id)
        if not targets:
            return None
        results = await self.fanout.call_nodes(targets, "POST", path, body, None, cancel,
                                               expect_success=False)
        result = OpResult("unload", targets, results, cancelled=cancel.cancelled,
                          answer=unload_answer(model, chat=path == "/api/chat"))
        for node in targets:
            if results[node.id].ok:  # gone from memory now, whatever a probe still shows
                self.registry.set_loaded(node, [e for e in node.loaded
                                                if not _names(e, key)])
        self._log_failures(result)
        return result

    # -- shared steps ------------------------------------------------------------
    async def _progress(self, verb: str, path: str, body: dict[str, Any],
                        targets: list[NodeState], emit: Emit | None, cancel: Cancel,
                        reprobe: bool = True) -> OpResult:
        merger = ProgressMerger(len(targets))

        async def on_line(node: NodeState, line: dict[str, Any]) -> None:
            out = merger.feed(node, line)
            if out is not None and emit is not None:
                await emit(out)

        results = await self.fanout.call_nodes(targets, "POST", path, {**body, "stream": True},
                                               on_line if emit else None, cancel,
                                               expect_success=True)
        return await self._finish(verb, targets, results, cancel, reprobe)

    async def _finish(self, verb: str, targets: list[NodeState],
                      results: dict[int, NodeResult], cancel: Cancel,
                      reprobe: bool = True) -> OpResult:
        result = OpResult(verb, targets, results, cancelled=cancel.cancelled)
        if result.cancelled:
            return result
        if reprobe:
            await self.reprobe(targets)
        self._log_failures(result)
        return result

    def _log_failures(self, result: OpResult) -> None:
        for node in result.nodes:
            outcome = result.results[node.id]
            if not outcome.ok and (outcome.code is None or outcome.code >= 500):
                log.warning("%s on %s failed: %s", result.verb, node.name, outcome.error)


def _names(entry: dict[str, Any], key: str) -> bool:
    """Whether an /api/ps entry is the model with canonical `key`."""
    name = entry.get("model") or entry.get("name")
    try:
        return isinstance(name, str) and modelnames.canonical(name) == key
    except modelnames.InvalidModelName:
        return False
