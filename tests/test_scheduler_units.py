"""Slots and the wait queue, and the circuit breaker, without HTTP."""
from __future__ import annotations

import asyncio

import pytest

from aivonx.breaker import COOLDOWN, COOLDOWN_MAX, FAILURES, INCIDENT, WINDOW, Breaker
from aivonx.modelnames import canonical
from aivonx.registry import Registry
from aivonx.router import NoSuchModel, Router
from aivonx.scheduler import QueueFull, QueueTimeout, Scheduler

KEY = canonical("llama3")


def cluster(slots: int = 1, nodes: int = 1, **limits) -> tuple[Registry, Scheduler]:
    registry = Registry()
    for i in range(1, nodes + 1):
        state = registry.upsert(i, f"n{i}", "127.0.0.1", 11000 + i, True, ["llama3:latest"],
                                slots=slots)
        state.healthy = True
    options = {"max_queue": 8, "max_wait": 5.0, **limits}
    return registry, Scheduler(registry, Router(registry), **options)


async def test_a_slot_is_held_for_the_block_and_freed_after(io_loop):
    registry, scheduler = cluster(slots=2)
    node = registry.nodes[1]
    async with scheduler.slot(KEY, set()) as slot:
        assert slot.node is node and node.active_requests == 1
        slot.ok = False
    assert node.active_requests == 0
    assert node.requests_served == 1 and node.errors == 1


async def test_waiters_get_freed_slots_first_come_first_served(io_loop):
    registry, scheduler = cluster(slots=1)
    order: list[int] = []
    release = asyncio.Event()

    async def request(n: int) -> None:
        async with scheduler.slot(KEY, set()) as slot:
            order.append(n)
            assert slot is not None
            if n == 0:
                await release.wait()

    first = asyncio.ensure_future(request(0))
    await asyncio.sleep(0)
    rest = [asyncio.ensure_future(request(n)) for n in (1, 2, 3)]
    await asyncio.sleep(0.01)
    assert scheduler.depth == 3 and order == [0]
    release.set()
    await asyncio.gather(first, *rest)
    assert order == [0, 1, 2, 3]
    assert scheduler.depth == 0 and registry.nodes[1].active_requests == 0


async def test_the_queue_bounds_answer_for_themselves(io_loop):
    registry, scheduler = cluster(slots=1, max_queue=1, max_wait=0.05)
    async with scheduler.slot(KEY, set()):
        waiting = asyncio.ensure_future(scheduler.acquire(KEY))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await scheduler.acquire(KEY)
        with pytest.raises(QueueTimeout):
            await waiting
    assert scheduler.rejected_total == 2 and scheduler.depth == 0


async def test_a_waiter_that_leaves_hands_its_slot_on(io_loop):
    registry, scheduler = cluster(slots=1)
    gone = asyncio.get_running_loop().create_future()
    async with scheduler.slot(KEY, set()):
        leaving = asyncio.ensure_future(scheduler.acquire(KEY, set(), gone))
        staying = asyncio.ensure_future(scheduler.acquire(KEY))
        await asyncio.sleep(0)
        gone.set_result(None)
        assert await leaving is None
    assert await staying is registry.nodes[1]
    assert registry.nodes[1].active_requests == 1


async def test_every_node_tried_yields_no_slot(io_loop):
    registry, scheduler = cluster(nodes=2)
    async with scheduler.slot(KEY, {1, 2}) as slot:
        assert slot is None
    with pytest.raises(NoSuchModel):
        await scheduler.acquire(canonical("mistral"))


def test_the_breaker_opens_after_enough_incidents_in_the_window():
    breaker = Breaker()
    now = 1000.0
    for i in range(FAILURES - 1):
        assert not breaker.record_failure(now + i * 2 * INCIDENT)
    assert not breaker.is_open(now + 10)
    assert breaker.record_failure(now + FAILURES * 2 * INCIDENT)
    assert breaker.is_open(now + FAILURES * 2 * INCIDENT + 1)
    assert not breaker.is_open(now + FAILURES * 2 * INCIDENT + COOLDOWN + 0.1)


def test_failures_at_one_instant_are_one_incident():
    breaker = Breaker()
    assert not any(breaker.record_failure(1000.0 + i * INCIDENT / 10) for i in range(9))
    assert len(breaker.failures) == 1


def test_old_failures_leave_the_window():
    breaker = Breaker()
    breaker.record_failure(1000.0)
    breaker.record_failure(1000.0 + WINDOW + 2)
    breaker.record_failure(1000.0 + WINDOW + 4)
    assert not breaker.is_open(1000.0 + WINDOW + 5)


def test_a_flapping_node_stays_out_longer_each_time_up_to_the_cap():
    breaker = Breaker()
    now = 1000.0
    cooldowns = []
    for _ in range(8):
        for i in range(FAILURES):
            opened = breaker.record_failure(now + i * 2 * INCIDENT)
        assert opened
        cooldowns.append(breaker.cooldown)
        now = breaker.until + 1  # fails again right after the circuit closed
    assert cooldowns[:3] == [COOLDOWN, 2 * COOLDOWN, 4 * COOLDOWN]
    assert cooldowns[-1] == COOLDOWN_MAX
