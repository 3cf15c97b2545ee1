"""Which node served a prompt's prefix recently: the memory behind `cache_aware`.

Ollama keeps the KV cache of recent prompts per slot while a model stays
loaded and reuses the longest common prefix, so the node that served a
conversation's last turn prefills only the new message. A request is keyed
by its leading text, cut into fixed blocks whose hashes are chained (each
block's hash covers everything before it): two prompts sharing their first
k blocks share their first k hashes, and the memory maps each block hash to
the nodes that served it. Only the leading MAX_PREFIX_CHARS are hashed, with
Python's own string hash (no copy to bytes), so a request costs
microseconds whatever its size.

The memory is bounded in entries and in (estimated) bytes, evicting the
least recently used block first, and forgets a node's blocks when its model
is unloaded there or the node restarts: its cache is gone with them.
"""
from __future__ import annotations

import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping

from .bodyscan import Large

BLOCK_CHARS = 1024          # ~256 tokens a block
MAX_PREFIX_CHARS = 32 * 1024    # ~8,000 tokens: tens of microseconds to hash
MAX_SESSION_CHARS = 256
MAX_ENTRIES = 100_000
MAX_BYTES = 32 * 1024 * 1024
MAX_HOMES = 4096            # first blocks whose last node is remembered
MAX_NODES_PER_ENTRY = 8     # a block shared by every node (a tenant's prompt) stays small
# What one entry costs, roughly (CPython 3.11+, 64-bit): its slot in the
# ordered dict and the index, the Entry object, and per node its stamp.
ENTRY_BYTES = 240
NODE_BYTES = 120

SESSION_HEADER = "X-Aivonx-Session"
# Body fields that carry an explicit cache or session key (OpenAI's).
SESSION_FIELDS = ("prompt_cache_key", "user")


@dataclass(frozen=True)
class RoutingHint:
    """What the router needs to know about a request's prompt: its chained
    block hashes, and the client's explicit session key (hashed) if any."""

    blocks: tuple[int, ...] = ()
    session: int | None = None


def _text_parts(value: Any) -> Iterator[str]:
    """The text of a content value: a string, or a list of parts/blocks."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for part in value:
            if isinstance(part, str):
                yield part
            elif isinstance(part, dict):
                text = part.get("text", part.get("content"))
                if isinstance(text, (str, list)):
                    yield from _text_parts(text)


def _prompt_parts(body: Mapping[str, Any], raw: bytes) -> Iterator[str]:
    """The prompt as a model would read it, in order: instructions and system
    prompt, then the messages (role and text) or the prompt itself. A value
    too large to have been decoded (aivonx.bodyscan) is read as raw JSON."""
    for name in ("system", "instructions", "messages", "input", "prompt"):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, Large):
            yield raw[value.start:value.start + MAX_PREFIX_CHARS].decode("utf-8", "replace")
        elif name in ("messages", "input") and isinstance(value, list):
            for message in value:
                if isinstance(message, dict):
                    role = message.get("role")
                    yield f"\x1e{role if isinstance(role, str) else ''}\x1f"
                    yield from _text_parts(message.get("content"))
                else:
                    yield from _text_parts([message])
        else:
            yield from _text_parts(value)


def _leading(parts: Iterable[str], limit: int) -> str:
    """The first `limit` characters of the parts joined, without joining
    (or even looking at) what lies beyond."""
    taken: list[str] = []
    room = limit
    for part in parts:
        if len(part) >= room:
            taken.append(part[:room])
            break
        taken.append(part)
        room -= len(part)
    return "".join(taken)


def block_hashes(model: str, text: str, block: int = BLOCK_CHARS) -> tuple[int, ...]:
    """Chained hashes of the text's full blocks: hash i covers blocks 0..i.
    A partial last block is left out: the next turn extends it, so it would
    never match again."""
    chain = hash(("prefix", model))
    out = []
    for start in range(0, len(text) - block + 1, block):
        chain = hash((chain, text[start:start + block]))
        out.append(chain)
    return tuple(out)


def routing_hint(model: str, body: Mapping[str, Any], headers: Mapping[str, str],
                 raw: bytes = b"") -> RoutingHint:
    """A request's hint from its already parsed body (model = canonical key).
    An explicit key (the X-Aivonx-Session header, OpenAI's
    `prompt_cache_key` or `user`) makes the request's node a session's."""
    session = headers.get(SESSION_HEADER)
    if not session:
        for name in SESSION_FIELDS:
            value = body.get(name)
            if isinstance(value, str) and value:
                session = value
                break
    text = _leading(_prompt_parts(body, raw), MAX_PREFIX_CHARS)
    return RoutingHint(
        blocks=block_hashes(model, text),
        session=hash(("session", model, session[:MAX_SESSION_CHARS])) if session else None)


class Entry:
    __slots__ = ("model", "nodes")

    def __init__(self, model: str) -> None:
        self.model = model
        self.nodes: dict[int, float] = {}  # node id -> when it last served the block


class CachedPrompt:
    """One KV-cache slot of a node as the router pictures it: the prompt it
    holds and whether a request is using it (a slot in use is not the one
    the next prompt overwrites)."""

    __slots__ = ("blocks", "busy", "used")

    def __init__(self) -> None:
        self.blocks: tuple[int, ...] = ()
        self.busy = False
        self.used = 0


def _common(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """How many leading block hashes two chains share."""
    depth = 0
    for x, y in zip(a, b):
        if x != y:
            break
        depth += 1
    return depth


def _taken_slot(slots: list[CachedPrompt], blocks: tuple[int, ...],
                capacity: int) -> tuple[CachedPrompt | None, bool]:
    """The slot a node puts the prompt in, as Ollama's multi-user cache
    chooses it, and whether the prompt continues the one it holds: the free
    slot whose prompt it continues, else a new one while there are fewer
    than `capacity` (None), else the least recently used free slot. With no
    free slot (someone else uses the node too) the oldest picture goes."""
    free = [s for s in slots if not s.busy]
    size = len(blocks)
    for slot in free:
        held = slot.blocks
        if held and len(held) <= size and _common(held, blocks) == len(held):
            return slot, True
    if len(slots) < capacity:
        return None, False
    return min(free or slots, key=lambda s: s.used), False


class PrefixMemory:
    """Block hash -> the nodes that served it lately, least recently used
    first, and per node and model a picture of its cache slots. Not
    thread-safe: it lives on the event loop with the router."""

    def __init__(self, max_entries: int = MAX_ENTRIES, max_bytes: int = MAX_BYTES) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.entries: OrderedDict[int, Entry] = OrderedDict()
        self.owned: dict[int, set[int]] = {}  # node id -> the block hashes it holds
        # Per node and model, its slots (Ollama keeps one cached prompt a
        # slot), and how many of them hold each block.
        self.slots: dict[tuple[int, str], list[CachedPrompt]] = {}
        self.held: dict[tuple[int, str], Counter[int]] = {}
        # A prompt's first block -> the node that served it last, kept after
        # the node's cache lost it: where that tenant goes back to.
        self.homes: OrderedDict[int, int] = OrderedDict()
        self.bytes = 0
        self.evicted = 0
        self._clock = 0

    def __len__(self) -> int:
        return len(self.entries)

    def matches(self, hint: RoutingHint) -> dict[int, tuple[int, float]]:
        """Per node that holds part of the hinted prompt: how deep its match
        goes (in blocks; a session match counts deepest) and how recent."""
        found: dict[int, tuple[int, float]] = {}
        entries = self.entries
        for depth, key in enumerate(hint.blocks, start=1):
            entry = entries.get(key)
            if entry is None:
                break  # chained: nothing deeper can match
            for node_id, stamp in entry.nodes.items():
                found[node_id] = (depth, stamp)
        if hint.session is not None:
            entry = entries.get(hint.session)
            if entry is not None:
                deepest = len(hint.blocks) + 1
                for node_id, stamp in entry.nodes.items():
                    found[node_id] = (deepest, stamp)
        return found

    def session_node(self, hint: RoutingHint) -> int | None:
        """The node that served the hinted session last, if remembered."""
        entry = self.entries.get(hint.session) if hint.session is not None else None
        if not entry or not entry.nodes:
            return None
        return max(entry.nodes.items(), key=lambda item: item[1])[0]

    def record(self, node_id: int, model: str, hint: RoutingHint,
               capacity: int = 4) -> CachedPrompt:
        """The node serves this prompt now, in one of its `capacity` slots,
        chosen as Ollama's multi-user cache chooses: the free slot whose
        prompt this one continues, else the least recently used free slot
        (whose prompt is gone from then on). Hand the slot back to
        `release` when the request ends."""
        now = time.monotonic()
        place = (node_id, model)
        slots = self.slots.get(place)
        if slots is None:
            slots = self.slots[place] = []
        held = self.held.setdefault(place, Counter())
        slot = self._slot_for(slots, hint.blocks, max(1, capacity))
        self._clock += 1
        old, slot.blocks, slot.busy, slot.used = slot.blocks, hint.blocks, True, self._clock
        held.update(hint.blocks)
        for key in old:
            held[key] -= 1
            if held[key] <= 0:
                del held[key]
                entry = self.entries.get(key)
                if entry is not None and node_id in entry.nodes:
                    self._drop(key, entry, node_id)
        if hint.blocks:
            homes = self.homes
            homes[hint.blocks[0]] = node_id
            homes.move_to_end(hint.blocks[0])
            if len(homes) > MAX_HOMES:
                homes.popitem(last=False)
        keys = hint.blocks if hint.session is None else (*hint.blocks, hint.session)
        owned = self.owned.setdefault(node_id, set())
        entries = self.entries
        for key in keys:
            entry = entries.get(key)
            if entry is None:
                entry = entries[key] = Entry(model)
                self.bytes += ENTRY_BYTES
            else:
                entries.move_to_end(key)
            if node_id not in entry.nodes:
                if len(entry.nodes) >= MAX_NODES_PER_ENTRY:
                    self._drop(key, entry, min(entry.nodes, key=entry.nodes.__getitem__))
                self.bytes += NODE_BYTES
                owned.add(key)
            entry.nodes[node_id] = now
        self._trim()
        return slot

    @staticmethod
    def _slot_for(slots: list[CachedPrompt], blocks: tuple[int, ...],
                  capacity: int) -> CachedPrompt:
        slot, _ = _taken_slot(slots, blocks, capacity)
        if slot is None:
            slot = CachedPrompt()
            slots.append(slot)
        return slot

    def evicts(self, node_id: int, model: str, hint: RoutingHint, capacity: int) -> bool:
        """Whether serving the prompt on the node would overwrite the node's
        only copy of another prompt's first block (a tenant's system prompt,
        say): a miss placed there makes the next one."""
        slots = self.slots.get((node_id, model))
        if not slots or len(slots) < capacity:
            return False  # the prompt gets a slot of its own
        victim, continues = _taken_slot(slots, hint.blocks, capacity)
        if victim is None or victim.busy or continues:
            return False  # no free slot (the node queues), or its own prompt
        if not victim.blocks or (hint.blocks and victim.blocks[0] == hint.blocks[0]):
            return False
        return not any(s is not victim and s.blocks[:1] == victim.blocks[:1] for s in slots)

    def home(self, hint: RoutingHint) -> int | None:
        """The node that served the hinted prompt's first block last."""
        return self.homes.get(hint.blocks[0]) if hint.blocks else None

    def families(self, node_id: int, model: str) -> int:
        """How many different prompts (by their first block: one tenant's
        system prompt, say) the node's slots hold. A prompt cached nowhere
        goes where there are fewest, so that each family keeps a home
        instead of every node holding a little of everyone."""
        return len({s.blocks[0] for s in self.slots.get((node_id, model), ()) if s.blocks})

    @staticmethod
    def release(slot: CachedPrompt | None) -> None:
        """The request using the slot ended: its prompt may be reused."""
        if slot is not None:
            slot.busy = False

    def forget(self, node_id: int, models: Iterable[str] | None = None) -> int:
        """The node lost its caches: of these models (unloaded), or all of
        them (restarted, moved, removed). Returns the blocks forgotten."""
        wanted = None if models is None else set(models)
        for place in [p for p in self.slots if p[0] == node_id
                      and (wanted is None or p[1] in wanted)]:
            for slot in self.slots.pop(place):
                slot.blocks = ()
            del self.held[place]
        keys = self.owned.get(node_id)
        if not keys:
            return 0
        dropped = 0
        for key in list(keys):
            entry = self.entries.get(key)
            if entry is None:
                keys.discard(key)
            elif wanted is None or entry.model in wanted:
                self._drop(key, entry, node_id)
                dropped += 1
        if not keys:
            self.owned.pop(node_id, None)
        return dropped

    def _drop(self, key: int, entry: Entry, node_id: int) -> None:
        """One node no longer holds the block; the block goes with its last node."""
        del entry.nodes[node_id]
        self.bytes -= NODE_BYTES
        owned = self.owned.get(node_id)
        if owned is not None:
            owned.discard(key)
        if not entry.nodes:
            del self.entries[key]
            self.bytes -= ENTRY_BYTES

    def _trim(self) -> None:
        entries = self.entries
        while entries and (len(entries) > self.max_entries or self.bytes > self.max_bytes):
            key, entry = next(iter(entries.items()))
            for node_id in list(entry.nodes):
                self._drop(key, entry, node_id)
            self.evicted += 1
