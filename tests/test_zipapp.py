"""The one-file build: scripts/build_zipapp.py makes a zipapp that starts
with nothing but Python and serves its pages and API from the one file."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tornado.httpclient import AsyncHTTPClient

from tests.helpers import ROOT, run_to_end, start_aivonx


async def test_zipapp_builds_starts_and_serves(io_loop, make_node, tmp_path):
    target = tmp_path / "dist" / "aivonx.pyz"
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "build_zipapp.py"),
                    "--output", str(target)], check=True, capture_output=True, timeout=300)
    assert target.stat().st_size > 0
    # Started from elsewhere, unpacking into its own directory: nothing may
    # come from the checkout.
    command = (sys.executable, str(target))
    env = {"SHIV_ROOT": str(tmp_path / "shiv"), "PYTHONPATH": ""}
    code, out = await run_to_end("--help", command=command, env=env, cwd=str(tmp_path))
    assert code == 0 and "--node" in out, out

    node = await make_node(["llama3:latest"])
    proc = await start_aivonx("--db", str(tmp_path / "z.db"), "--node", node.url,
                              command=command, env=env, cwd=str(tmp_path))
    try:
        client = AsyncHTTPClient()
        health = await client.fetch(proc.url + "/api/health")
        assert json.loads(health.body) == {"status": "healthy"}
        tags = json.loads((await client.fetch(proc.url + "/api/tags")).body)
        assert [m["model"] for m in tags["models"]] == ["llama3:latest"]
        # templates, static files and the vendored docs UI travel along
        page = await client.fetch(proc.url + "/ui")
        assert b"llama3" in page.body
        swagger = (await client.fetch(proc.url + "/swagger")).body.decode()
        assert "swagger-ui-bundle.js" in swagger
        bundle = await client.fetch(proc.url + "/static/vendor/swagger-ui/swagger-ui-bundle.js")
        assert len(bundle.body) > 100_000
        assert os.listdir(tmp_path / "shiv")  # unpacked where SHIV_ROOT says
    finally:
        assert await proc.stop() == 0
