"""Restarts: SIGTERM drains in-flight streams; a kill -9 loses nothing
committed and leaves the database consistent."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import sys
import textwrap

from tests.helpers import ROOT, start_aivonx
from tests.helpers import GEN, fetch_stream


async def test_sigterm_lets_in_flight_streams_finish(io_loop, make_node, tmp_path):
    node = await make_node(chunks=15, chunk_delay=0.1)
    aivonx = await start_aivonx("--db", str(tmp_path / "a.db"), "--node", node.url,
                                "--shutdown-grace", "20")
    streams = [asyncio.ensure_future(fetch_stream(aivonx.url + "/api/generate", GEN))
               for _ in range(3)]
    while sum(r.chunks_sent for r in node.requests_to("/api/generate")) < 3:
        await asyncio.sleep(0.02)
    aivonx.proc.send_signal(signal.SIGTERM)
    for response, arrivals in await asyncio.gather(*streams):
        lines = b"".join(c for _, c in arrivals).splitlines()
        assert response.code == 200 and len(lines) == 16
        assert json.loads(lines[-1])["done"] is True
    assert await aivonx.stop() == 0


WRITER = textwrap.dedent("""
    import sys
    from aivonx import store
    store.open_database(sys.argv[1])
    print("ready", flush=True)
    i = 0
    while True:
        with store.database.atomic():
            node = store.Node.create(name=f"n{i}", address=f"10.0.{i // 250}.{i % 250}",
                                     port=11434)
            store.save_models(node.id, ["llama3:latest"] * 50)
            store.set_config("strategy", "round_robin" if i % 2 else "least_active")
        i += 1
""")


async def test_kill_9_during_writes_leaves_the_database_consistent(io_loop, tmp_path):
    db = str(tmp_path / "k.db")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WRITER, db, stdout=asyncio.subprocess.PIPE, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT})
    assert (await asyncio.wait_for(proc.stdout.readline(), 20)).strip() == b"ready"
    await asyncio.sleep(0.5)
    proc.kill()
    await proc.wait()
    with sqlite3.connect(db) as conn:
        assert conn.execute("pragma integrity_check").fetchone() == ("ok",)
        count, with_models = conn.execute(
            "select count(*), sum(models_json != '[]') from node").fetchone()
        assert count > 10 and with_models == count  # no half-written transaction
        strategy = json.loads(conn.execute(
            "select value from proxy_config where key='strategy'").fetchone()[0])
        assert strategy == ("round_robin" if (count - 1) % 2 else "least_active")
