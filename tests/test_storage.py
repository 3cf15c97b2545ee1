"""The store under trouble, over HTTP: a database locked by another process,
a full disk, an unusable database path, a second process on one database,
and node ids that are never handed out twice."""
from __future__ import annotations

import asyncio
import contextlib
import sqlite3

import ollama

from aivonx import store
from tests.api_client import call, login
from tests.conftest import ROOT_PASSWORD
from tests.test_relay import wait_for


@contextlib.contextmanager
def write_lock(db: str):
    """Hold SQLite's write lock on `db` from another connection, as another
    process (a backup, a shell) would."""
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        holder.execute("ROLLBACK")
        holder.close()


async def test_a_locked_database_answers_503_while_streams_keep_flowing(
        io_loop, make_node, make_proxy, tmp_path):
    node = await make_node(chunks=30, chunk_delay=0.01)
    db = str(tmp_path / "locked.db")
    proxy = await make_proxy([node], db=db)
    token = await login(proxy)
    events: list[str] = []

    async def stream() -> None:
        client = ollama.AsyncClient(host=proxy.url)
        async for part in await client.generate(model="llama3", prompt="hi", stream=True):
            events.append("done" if part.done else "chunk")

    task = asyncio.ensure_future(stream())
    await wait_for(lambda: "chunk" in events)
    answers = []
    with write_lock(db):
        while not task.done():
            events.append("write sent")
            answers.append(await call(proxy, "POST", "/api/proxy/nodes",
                                      {"address": f"10.9.0.{len(answers) % 250}"},
                                      token=token))
            events.append("write answered")
        login_answer = await call(proxy, "POST", "/api/account/login",
                                  {"username": "root", "password": ROOT_PASSWORD})
    await task
    for answer in answers + [login_answer]:
        assert answer.code == 503, answer
        assert answer.json == {"error": "database busy, try again"}
        assert answer.headers["Retry-After"] == "1"
    # The stream went on while the writes waited for their answers.
    pending, during = False, 0
    for event in events:
        if event.startswith("write"):
            pending = event == "write sent"
        elif pending:
            during += 1
    assert during >= 3, events
    assert events.count("chunk") == 30 and events[-1] in ("done", "write answered")
    # Nothing was half written, and writes work again once the lock is gone.
    assert store.Node.select().count() == 1
    created = await call(proxy, "POST", "/api/proxy/nodes", {"address": "10.9.1.1"},
                         token=token)
    assert created.code == 201, created


async def test_a_full_disk_answers_503_saying_so(io_loop, make_proxy):
    proxy = await make_proxy()
    token = await login(proxy)
    # The database may not grow by a page: what a full disk looks like to SQLite.
    pages = proxy.ctx.db.execute_sql("PRAGMA page_count").fetchone()[0]
    proxy.ctx.db.execute_sql(f"PRAGMA max_page_count = {pages}")
    for i in range(500):
        answer = await call(proxy, "POST", "/api/proxy/nodes",
                            {"address": f"node-{i}.{'x' * 60}.{'y' * 60}.example",
                             "name": f"{i}-{'n' * 90}"}, token=token)
        if answer.code != 201:
            break
    assert answer.code == 503, answer
    assert answer.json == {"error": "database or disk is full; the change was not saved"}
    assert int(answer.headers["Retry-After"]) >= 1
    assert (await call(proxy, "GET", "/api/proxy/nodes", token=token)).code == 200
