"""The store under trouble, over HTTP: a database locked by another process,
a full disk, an unusable database path, a second process on one database,
and node ids that are never handed out twice."""
from __future__ import annotations

import asyncio
import contextlib
import sqlite3

import ollama
import pytest

from aivonx import store
from tests.helpers import call, login
from tests.helpers import ROOT_PASSWORD
from tests.helpers import run_to_end, start_aivonx
from tests.helpers import wait_for


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


async def test_a_second_process_on_one_database_refuses_to_start(io_loop, tmp_path):
    db = str(tmp_path / "shared.db")
    first = await start_aivonx("--db", db)
    try:
        code, out = await run_to_end("--port", "0", "--db", db)
        assert code != 0, out
        assert "is in use by another Aivonx process" in out and "--db" in out, out
        assert "Traceback" not in out and len(out.strip().splitlines()) == 1, out
    finally:
        assert await first.stop() == 0
    # Once the first has stopped, the database is free again.
    second = await start_aivonx("--db", db)
    assert await second.stop() == 0


@pytest.mark.parametrize("where", ["under a file", "in /proc"])
async def test_an_unusable_database_path_ends_in_one_line(io_loop, tmp_path, where):
    if where == "under a file":
        (tmp_path / "plain").write_text("not a directory")
        db = str(tmp_path / "plain" / "aivonx.db")
    else:
        db = "/proc/aivonx-test.db"   # read-only, even for root
    code, out = await run_to_end("--port", "0", "--db", db)
    assert code != 0, out
    assert "Traceback" not in out and len(out.strip().splitlines()) == 1, out
    assert out.startswith(f"aivonx: cannot open the database {db}"), out


async def test_a_deleted_nodes_id_is_never_given_to_the_next(io_loop, make_proxy):
    proxy = await make_proxy(health_interval=3600)
    token = await login(proxy)
    ids = []
    for address in ("10.7.0.1", "10.7.0.2"):
        answer = await call(proxy, "POST", "/api/proxy/nodes", {"address": address}, token=token)
        ids.append(answer.json["id"])
    assert (await call(proxy, "DELETE", f"/api/proxy/nodes/{ids[1]}", token=token)).code == 204
    answer = await call(proxy, "POST", "/api/proxy/nodes", {"address": "10.7.0.3"}, token=token)
    assert answer.code == 201 and answer.json["id"] > ids[1]
    assert (await call(proxy, "GET", f"/api/proxy/nodes/{ids[1]}", token=token)).code == 404


OLD_NODE_TABLE = (
    'CREATE TABLE "node" ("id" INTEGER NOT NULL PRIMARY KEY, "name" VARCHAR(100) NOT NULL, '
    '"address" VARCHAR(300) NOT NULL, "port" INTEGER NOT NULL, "active" INTEGER NOT NULL, '
    '"created_at" DATETIME NOT NULL, "models_json" TEXT NOT NULL)')


async def test_an_older_database_keeps_its_nodes_and_ids_and_stops_reusing_them(
        io_loop, make_proxy, tmp_path):
    # A node table as earlier versions made it: ids reusable, fewer columns.
    db = str(tmp_path / "old.db")
    with sqlite3.connect(db) as conn:
        conn.execute(OLD_NODE_TABLE)
        conn.execute('CREATE UNIQUE INDEX "node_address_port" ON "node" ("address", "port")')
        conn.executemany(
            "INSERT INTO node VALUES (?, ?, ?, 11434, ?, '2025-01-02 03:04:05', '[]')",
            [(1, "one", "10.8.0.1", 1), (2, "two", "10.8.0.2", 0), (5, "five", "10.8.0.5", 1)])
    conn.close()
    proxy = await make_proxy(db=db, health_interval=3600)
    token = await login(proxy)
    listed = (await call(proxy, "GET", "/api/proxy/nodes", token=token)).json["results"]
    assert [(n["id"], n["name"], n["address"], n["active"], n["slots"]) for n in listed] == [
        (1, "one", "10.8.0.1", True, 4), (2, "two", "10.8.0.2", False, 4),
        (5, "five", "10.8.0.5", True, 4)]
    assert (await call(proxy, "DELETE", "/api/proxy/nodes/5", token=token)).code == 204
    answer = await call(proxy, "POST", "/api/proxy/nodes", {"address": "10.8.0.5"}, token=token)
    assert answer.code == 201 and answer.json["id"] == 6
    # The unique (address, port) index came through the rebuild.
    with contextlib.closing(sqlite3.connect(db)) as conn:
        indexes = conn.execute("SELECT name FROM sqlite_master WHERE type = 'index' "
                               "AND tbl_name = 'node'").fetchall()
    assert indexes == [("node_address_port",)]
