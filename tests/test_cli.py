"""`python run.py` as a user starts it: flags, environment, restarts."""
from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import sys

from tornado.httpclient import AsyncHTTPClient

from tests.helpers import ROOT, start_aivonx



async def get_json(url: str):
    response = await AsyncHTTPClient().fetch(url, raise_error=False)
    return response.code, json.loads(response.body)


async def test_serves_persists_nodes_and_restarts(io_loop, make_node, tmp_path):
    node = await make_node(["llama3:latest"])
    db = str(tmp_path / "cli.db")
    proc = await start_aivonx("--db", db, "--node", node.url, "--node", node.url,
                                   "--health-interval", "1")
    url = proc.url
    try:
        assert url.startswith("http://127.0.0.1:")  # loopback unless told otherwise
        assert await get_json(url + "/api/health") == (200, {"status": "healthy"})
        code, tags = await get_json(url + "/api/tags")
        assert [m["model"] for m in tags["models"]] == ["llama3:latest"]
    finally:
        assert await proc.stop() == 0
    # Restart without --node: the node comes from the store; given again, it
    # is not duplicated.
    proc = await start_aivonx("--db", db, env={"AIVONX_NODES": node.url})
    url = proc.url
    try:
        code, tags = await get_json(url + "/api/tags")
        assert [m["model"] for m in tags["models"]] == ["llama3:latest"]
    finally:
        assert await proc.stop() == 0
    with sqlite3.connect(db) as conn:
        assert conn.execute("select count(*) from node").fetchone() == (1,)
        assert conn.execute("pragma journal_mode").fetchone() == ("wal",)


async def test_bad_flags_are_refused(io_loop):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, os.path.join(ROOT, "run.py"), "--port", "99999",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT)
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 2 and b"port must be" in err


def test_flags_win_over_the_environment_which_wins_over_defaults():
    from aivonx.settings import parse_settings
    env = {"AIVONX_PORT": "9000", "AIVONX_MAX_WAIT": "7", "AIVONX_NODES": "http://a, http://b",
           "ROOT_PASSWORD": "pw"}
    settings = parse_settings(["--port", "9001", "--max-queue", "3"], env)
    assert (settings.port, settings.max_queue, settings.max_wait) == (9001, 3, 7.0)
    assert settings.nodes == ["http://a", "http://b"] and settings.root_password == "pw"
    assert parse_settings(["--node", "http://c"], env).nodes == ["http://c"]
    defaults = parse_settings([], {})
    assert (defaults.host, defaults.port, defaults.health_interval) == ("127.0.0.1", 8000, 10.0)
