"""A node that hangs (SIGSTOP: its sockets stay open, nothing answers) must
not hold its requests until the idle timeout: once the monitor finds it
down, requests that sent nothing yet fail over, and started streams end with
an explicit error line."""
from __future__ import annotations

import asyncio
import json

from tests.helpers import GEN, fetch_stream, wait_for


def lines_of(arrivals) -> list[dict]:
    return [json.loads(line) for line in b"".join(c for _, c in arrivals).splitlines()]


async def test_a_started_stream_on_a_hung_node_ends_with_an_error_line(
        io_loop, make_proxy, node_process):
    node = node_process("--chunks", "400", "--chunk-delay", "0.05")
    proxy = await make_proxy([node], health_interval=0.2, probe_timeout=0.5,
                             idle_timeout=600)
    task = asyncio.ensure_future(fetch_stream(proxy.url + "/api/generate", GEN))
    await wait_for(lambda: proxy.registry.total_active() == 1)
    await asyncio.sleep(0.3)  # tokens are flowing
    node.stop()
    response, arrivals = await asyncio.wait_for(task, 20)
    lines = lines_of(arrivals)
    assert response.code == 200
    assert len(lines) > 1 and "response" in lines[0]
    assert "error" in lines[-1] and "stopped answering" in lines[-1]["error"]
    assert not any(line.get("done") for line in lines)


async def test_a_request_waiting_on_a_hung_node_fails_over(io_loop, make_node, make_proxy,
                                                           node_process):
    hung = node_process("--first-byte-delay", "120")
    spare = await make_node()
    proxy = await make_proxy([hung, spare], health_interval=0.2, probe_timeout=0.5,
                             idle_timeout=600)
    spare_state = proxy.node(spare)
    proxy.ctx.nodes.update(spare_state.id, {"active": False}, partial=True)
    task = asyncio.ensure_future(fetch_stream(proxy.url + "/api/generate", GEN))
    await wait_for(lambda: proxy.node(hung).active_requests == 1)
    proxy.ctx.nodes.update(spare_state.id, {"active": True}, partial=True)
    hung.stop()
    response, arrivals = await asyncio.wait_for(task, 20)
    assert response.code == 200
    assert response.headers["X-Aivonx-Node"] == spare_state.name
    assert lines_of(arrivals)[-1]["done"] is True
    assert len(spare.requests_to("/api/generate")) == 1
