"""--workers: several processes on one port and one database, each with its share
of every node's slots; admin changes reach all of them through the store."""
from __future__ import annotations

import json

import pytest
from tornado.httpclient import AsyncHTTPClient

from aivonx import store
from aivonx.errors import ApiError
from aivonx.store import StoreError
from aivonx.workers import inherited_lock, slot_share
from tests.helpers import run_to_end, start_aivonx, wait_for


@pytest.mark.parametrize("slots, count", [(4, 1), (4, 2), (5, 2), (7, 3), (1024, 2), (1, 2)])
def test_the_workers_shares_add_up_to_the_node_s_slots(slots, count):
    shares = [slot_share(slots, i, count) for i in range(count)]
    assert max(shares) - min(shares) <= 1
    assert sum(shares) == max(slots, count)  # never less than one slot each


def test_a_worker_takes_only_the_lock_its_supervisor_holds(tmp_path):
    db = str(tmp_path / "a.db")
    open(f"{db}.lock", "w").close()
    with open(tmp_path / "other", "w") as other:
        with pytest.raises(StoreError, match="not that file"):
            inherited_lock(db, other.fileno())


async def test_workers_serve_one_port_and_share_the_database_lock(io_loop, make_node,
                                                                  tmp_path):
    node = await make_node()
    db = str(tmp_path / "w.db")
    proc = await start_aivonx("--db", db, "--node", node.url, "--workers", "2",
                              "--health-interval", "0.5")
    try:
        await proc.wait_for(r"worker 2 of 2")
        await proc.wait_for(r"worker 1 of 2")
        client = AsyncHTTPClient()
        for _ in range(6):
            response = await client.fetch(proc.url + "/api/generate", method="POST",
                                          body=json.dumps({"model": "llama3", "prompt": "x",
                                                           "stream": False}))
            assert json.loads(response.body)["done"] is True
        # One Aivonx on this database: a second one is refused.
        code, out = await run_to_end("--port", "0", "--db", db)
        assert code == 1 and "in use by another Aivonx process" in out
    finally:
        assert await proc.stop() == 0
    assert "stopped" in proc.output


async def test_a_node_changed_elsewhere_is_applied_by_refresh(io_loop, make_node,
                                                              make_proxy):
    first, second = await make_node(), await make_node()
    proxy = await make_proxy([first], workers=2, worker_index=1)
    (state,) = proxy.registry.nodes.values()
    assert state.slots == 2  # half of the default 4
    # What another worker writes: a node's slots and strategy changed, a node added.
    store.Node.update(slots=9).where(store.Node.id == state.id).execute()
    store.Node.create(name="second", address="127.0.0.1", port=second.port)
    store.set_config("strategy", "round_robin")
    proxy.ctx.nodes.refresh()
    assert state.slots == 4  # worker 2 of 2: 9 // 2
    assert {s.name for s in proxy.registry.nodes.values()} == {state.name, "second"}
    assert proxy.ctx.router.strategy == "round_robin"
    await wait_for(lambda: all(s.healthy for s in proxy.registry.nodes.values()))
    store.Node.delete().where(store.Node.id == state.id).execute()
    proxy.ctx.nodes.refresh()
    assert [s.name for s in proxy.registry.nodes.values()] == ["second"]


async def test_a_key_revoked_elsewhere_stops_working_after_refresh(io_loop, make_node,
                                                                   make_proxy):
    node = await make_node()
    proxy = await make_proxy([node], workers=2, worker_index=0)
    _, token = proxy.ctx.keys.keyring.create({"name": "alice"}, None)
    assert proxy.ctx.keys.identify(token).name == "alice"
    # Another worker revokes it and requires keys: only the store says so.
    store.ApiKey.update(revoked_at=store.utcnow()).execute()
    store.set_config("inference_auth", "keys")
    proxy.ctx.refresh_from_store()
    assert proxy.ctx.keys.mode == "keys"
    with pytest.raises(ApiError) as refused:
        proxy.ctx.keys.identify(token)
    assert refused.value.status == 401
