"""The status page over plain HTTP: what it shows, what it escapes, its
headers, and the browser redirect from `/`. The browser-driven test is in
test_status_page_e2e.py."""
from __future__ import annotations

import asyncio
import json
import re

from tornado.httpclient import AsyncHTTPClient, HTTPRequest, HTTPResponse

from aivonx.display import ago, latency_text, overall, spark_points, wait_text
from aivonx.store import Node
from tests.helpers import configure
from tests.helpers import fetch_stream, wait_for

BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


async def get(url: str, **kwargs) -> HTTPResponse:
    client = AsyncHTTPClient(force_instance=True)
    try:
        return await client.fetch(HTTPRequest(url, follow_redirects=False, **kwargs),
                                  raise_error=False)
    finally:
        client.close()


def rows(html: str) -> dict[str, str]:
    """The table rows of the page (not the blank template), by node id."""
    body = html.split('<template id="row-template">')[0]
    return dict(re.findall(r'<tr class="node" data-id="(\d+)"[^>]*>(.*?)</tr>', body, re.S))


async def test_page_shows_every_node_and_the_cluster(io_loop, make_node, make_proxy):
    a = await make_node(["llama3:latest", "qwen3:8b"])
    b = await make_node(["mistral:7b"])
    c = await make_node(["llama3:latest"])
    a.loaded = ["qwen3:8b"]
    proxy = await make_proxy([a, b, c], max_queue=1)
    proxy.ctx.router.strategy = "round_robin"
    await b.stop()
    await proxy.probe()
    configure(proxy, a, slots=2, weight=3.0)
    proxy.registry.busy(proxy.node(c), 30)  # it answered 429 with Retry-After: 30
    proxy.registry.requests_served, proxy.registry.errors = 12, 3
    proxy.node(a).active_requests = 2  # every slot taken: a request for qwen3 waits
    waiting = asyncio.ensure_future(fetch_stream(proxy.url + "/api/generate",
                                                 {"model": "qwen3:8b", "prompt": "x"}))
    await wait_for(lambda: proxy.ctx.scheduler.depth == 1)
    rejected, _ = await fetch_stream(proxy.url + "/api/generate",
                                     {"model": "qwen3:8b", "prompt": "y"})
    assert rejected.code == 503  # the queue holds one

    response = await get(proxy.url + "/ui")
    assert response.code == 200
    assert response.headers["Content-Type"].startswith("text/html")
    html = response.body.decode()
    by_id = rows(html)
    row_a, row_b, row_c = (by_id[str(proxy.node(n).id)] for n in (a, b, c))
    assert proxy.node(a).name in row_a and a.url in row_a
    # Health state, why, and since when.
    assert re.search(r'<span class="badge h-healthy" data-f="health" title="Pool: active">'
                     r'healthy</span>', row_a)
    assert 'data-f="reason"></div>' in row_a and 'data-f="pool"></div>' in row_a
    assert '<span class="badge h-unhealthy" data-f="health" title="Pool: standby">' \
           'unhealthy</span>' in row_b
    assert "refused" in row_b.lower()  # why it is down
    assert re.search(r'data-f="since" data-since="[\d.]+">\d+s</time>', row_b)
    assert '<span class="badge h-degraded" data-f="health" title="Pool: standby">' \
           'degraded</span>' in row_c
    assert 'data-f="pool">last resort only</div>' in row_c
    assert 'data-f="reason">busy: resting 30 s</div>' in row_c
    assert re.search(r'data-f="latency">(\d+ ms|&lt;1 ms)</span>', row_a)
    # In flight out of the slots (all taken), and the weight when it is not 1.
    assert re.search(r'<span class="load full" data-f="load"[^>]*><span class="big num" '
                     r'data-f="active_requests">2</span><span class="of"> / <span class="num" '
                     r'data-f="slots">2</span>', row_a)
    assert re.search(r'data-f="weight"[^>]*>weight 3</span>', row_a)
    assert re.search(r'data-f="weight"[^>]*></span>', row_c)  # weight 1: nothing to say
    assert re.search(r'<span class="load" data-f="load"[^>]*><span class="big num" '
                     r'data-f="active_requests">0</span><span class="of"> / <span class="num" '
                     r'data-f="slots">4</span>', row_c)
    # Models available, the loaded one marked, and the loaded column.
    assert '<li class="chip" title="llama3:latest">llama3:latest</li>' in row_a
    assert '<li class="chip hot" title="qwen3:8b">qwen3:8b</li>' in row_a
    models, loaded = re.findall(r'data-f="(?:models|loaded)">(.*?)</ul>', row_a, re.S)
    assert "qwen3:8b" in loaded and "llama3" not in loaded
    assert "mistral:7b" in row_b  # still listed while down: requests get 503, not 404
    # The cluster, and its queue.
    assert 'data-f="strategy">round_robin<' in html
    assert 'data-f="total_active_requests">2<' in html
    assert 'data-f="capacity">2<' in html  # the serving nodes' slots
    assert 'data-f="requests_served">12<' in html
    assert 'data-f="errors">3<' in html
    assert '<div class="card c-queue queued" id="queue">' in html
    assert 'data-f="queue-depth">1<' in html and 'data-f="queue-limit">1<' in html
    assert re.search(r'data-f="queue-oldest"[^>]*>\d+ ms<', html)
    assert re.search(r'class="num has-errors" data-f="queue-rejected"[^>]*>1<', html)
    assert 'data-f="queue-max-wait">2m 00s<' in html
    assert "2 of 3 nodes down" in html
    # A slot frees: the waiting request is served.
    proxy.node(a).active_requests = 0
    proxy.ctx.scheduler.dispatch()
    assert (await waiting)[0].code == 200
    html = (await get(proxy.url + "/ui")).body.decode()
    assert '<div class="card c-queue" id="queue">' in html
    assert re.search(r'data-f="queue-average"[^>]*>\d+ ms<', html)


async def test_security_headers_and_no_inline_code(io_loop, make_node, make_proxy):
    proxy = await make_proxy([await make_node()])
    response = await get(proxy.url + "/ui")
    headers = response.headers
    assert headers["Content-Security-Policy"] == (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "frame-ancestors 'none'")
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Referrer-Policy"] == "same-origin"
    assert headers["Cache-Control"] == "no-store"
    html = response.body.decode()
    # The CSP forbids inline code: every script is a file, no style attributes.
    assert re.findall(r"<script(?![^>]*\bsrc=)[^>]*>", html) == []
    assert " style=" not in html and "<style" not in html
    assert re.search(r" on[a-z]+=", html) is None
    for asset, kind in (("ui.js", "javascript"), ("ui.css", "text/css"),
                        ("favicon.svg", "image/svg+xml")):
        url = re.search(r'="(/static/%s\?v=\w+)"' % re.escape(asset), html).group(1)
        static = await get(proxy.url + url)
        assert static.code == 200 and kind in static.headers["Content-Type"]


async def test_a_nul_in_a_static_path_is_not_found(io_loop, make_proxy):
    proxy = await make_proxy([])
    for path in ("/static/ui.js%00.png", "/static/%00", "/static/vendor/%00/x.js"):
        response = await get(proxy.url + path)
        assert response.code == 404, path
    assert (await get(proxy.url + "/static/ui.js")).code == 200


async def test_names_models_and_errors_are_escaped(io_loop, make_node, make_proxy):
    evil = '<img src=x onerror="alert(1)">&'
    a = await make_node()
    proxy = await make_proxy([a], health_interval=3600)  # no probe undoes mark_down
    proxy.ctx.nodes.update(Node.get().id, {"name": evil}, partial=True)
    proxy.registry.mark_down(proxy.node(a), "<script>alert('reason')</script>")
    proxy.node(a).models["x"] = "<b>model</b>"
    html = (await get(proxy.url + "/ui")).body.decode()
    assert "<img" not in html and "<script>alert" not in html and "<b>model" not in html
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;&amp;" in html
    assert "&lt;script&gt;alert(&#x27;reason&#x27;)&lt;/script&gt;" in html
    assert "&lt;b&gt;model&lt;/b&gt;" in html


async def test_page_without_nodes_says_how_to_add_one(io_loop, make_proxy):
    proxy = await make_proxy([])
    html = (await get(proxy.url + "/ui")).body.decode()
    assert "No nodes configured" in html
    assert re.search(r'<p class="empty" id="no-nodes">', html)


async def test_browsers_asking_for_slash_go_to_the_page(io_loop, make_node, make_proxy):
    proxy = await make_proxy([await make_node()])
    browser = await get(proxy.url + "/", headers={"Accept": BROWSER_ACCEPT})
    assert browser.code == 302 and browser.headers["Location"] == "/ui"
    assert browser.headers["Vary"] == "Accept"
    for accept in (None, "*/*", "application/json", "text/plain"):
        headers = {"Accept": accept} if accept else {}
        client = await get(proxy.url + "/", headers=headers)
        assert client.code == 200 and client.body == b"Ollama is running", accept
        assert client.headers["Vary"] == "Accept"
    head = await get(proxy.url + "/", method="HEAD", headers={"Accept": BROWSER_ACCEPT})
    assert head.code == 200


async def test_state_json_is_what_the_page_polls(io_loop, make_node, make_proxy):
    a = await make_node()
    proxy = await make_proxy([a])
    html = (await get(proxy.url + "/ui")).body.decode()
    state_url = re.search(r'data-state-url="([^"]+)"', html).group(1)
    response = await get(proxy.url + state_url)
    assert response.code == 200
    state = json.loads(response.body)
    assert [n["url"] for n in state["nodes"]] == [a.url]
    node = state["nodes"][0]
    assert (node["status"], node["health"], node["health_reason"]) == ("active", "healthy", "")
    assert (node["slots"], node["weight"]) == (4, 1.0)
    assert set(state["queue"]) == {"depth", "limit", "max_wait", "oldest_wait", "queued_total",
                                   "rejected_total", "average_wait"}
    # The strings the page shows, ready made: its script formats nothing.
    assert state["display"] == {"summary": "All nodes serving", "tone": "ok", "serving": "1",
                                "capacity": "4", "queue_oldest": "—", "queue_average": "—",
                                "queue_max_wait": "2m 00s", "cache_hit_rate": "",
                                "instances": state["instance"], "instance_count": "1",
                                "redis": "one instance (no --redis)"}
    assert set(node["display"]) == {"since", "pool", "latency", "spark", "weight",
                                    "weight_label"}
    assert (node["display"]["weight"], node["display"]["weight_label"]) == ("1", "")
    assert re.fullmatch(r"\d+s", node["display"]["since"])
    assert re.fullmatch(r"\d+ ms|<1 ms", node["display"]["latency"])
    await a.stop()
    await wait_for(lambda: proxy.node(a).status == "standby", timeout=3)
    state = json.loads((await get(proxy.url + state_url)).body)
    node = state["nodes"][0]
    assert (node["status"], node["health"]) == ("standby", "unhealthy")
    assert "refused" in node["health_reason"].lower()
    assert state["display"]["summary"] == "No node is serving"
    assert state["display"]["tone"] == "bad" and state["display"]["capacity"] == "0"


def test_display_formats():
    assert ago(100.0, now=142.9) == "42s"
    assert ago(0, now=187) == "3m 07s"
    assert ago(0, now=5 * 3600 + 120) == "5h 02m"
    assert ago(0, now=2 * 86400 + 4 * 3600) == "2d 4h"
    assert ago(10, now=5) == "0s"  # clocks never make it negative
    assert ago(None) == "—"
    assert latency_text(None) == "—"
    assert latency_text(0.0004) == "<1 ms"
    assert latency_text(0.0123) == "12 ms"
    assert latency_text(0.0125) == "12 ms"  # half to even, on the page as in the JSON
    assert latency_text(1.5) == "1.50 s"
    assert [wait_text(v) for v in (None, 0.35, 4.25, 17.4, 120, 61.9)] == [
        "—", "350 ms", "4.2 s", "17 s", "2m 00s", "1m 01s"]
    assert spark_points([0.01]) == ""
    points = spark_points([0.01, None, 0.02]).split()
    assert len(points) == 2 and points[-1].startswith("120.0,")
    # The highest sample is near the top, within the 28-px box.
    assert 2 <= float(points[-1].split(",")[1]) < 6


def test_summary_names_degraded_nodes():
    def node(status: str, health: str) -> dict:
        return {"status": status, "health": health}

    assert overall({"nodes": [node("active", "healthy")] * 2}) == ("All nodes serving", "ok")
    assert overall({"nodes": [node("active", "healthy"), node("active", "degraded")]}) == (
        "All nodes serving, 1 degraded", "warn")
    assert overall({"nodes": [node("active", "healthy"), node("standby", "degraded")]}) == (
        "1 of 2 nodes down", "warn")
    assert overall({"nodes": [node("drained", "drained"), node("active", "healthy")]}) == (
        "All nodes serving", "ok")
