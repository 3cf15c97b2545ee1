"""The status page in a real browser: headless Chromium driven by Playwright.

Chromium comes from Debian (`apt-get install chromium`, done by .ci/run);
Playwright's own browser downloads are never used. The proxy and the fake
nodes run in the test's IOLoop, and Playwright's async API shares it.
Screenshots go to artifacts/ (ignored by git).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
from typing import Any, AsyncIterator

import ollama
import pytest
from tornado.httpclient import AsyncHTTPClient

from tests import helpers as api
from tests.helpers import ROOT_PASSWORD

CHROMIUM = os.environ.get("AIVONX_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-quic"]
LIVE_TIMEOUT = 4000  # ms: a probe interval (0.5 s) + a probe timeout (1 s) + a poll (1 s)


def require_browser() -> Any:
    """Playwright's async API, or skip; on CI (CI=true) a missing browser fails."""
    problem = None
    try:
        from playwright import async_api
    except ImportError:
        problem = "playwright is not installed (pip install -r requirements-dev.txt)"
    if problem is None and not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
        problem = f"{CHROMIUM} is missing (apt-get install chromium)"
    if problem is not None:
        if os.environ.get("CI"):
            pytest.fail(problem)
        pytest.skip(problem)
    return async_api


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Any]:
    async_api = require_browser()
    async with async_api.async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


async def new_page(browser: Any, problems: list[str], **options: Any) -> Any:
    """A page in a fresh context; console errors (CSP violations among them)
    and uncaught exceptions are collected in `problems`."""
    context = await browser.new_context(**{"viewport": {"width": 1280, "height": 800},
                                           **options})
    page = await context.new_page()
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    return page


async def api_state(proxy: Any) -> dict[str, Any]:
    client = AsyncHTTPClient(force_instance=True)
    try:
        response = await client.fetch(proxy.url + "/api/proxy/state")
    finally:
        client.close()
    return json.loads(response.body)


async def test_page_follows_a_node_down_and_back_without_reloading(
        io_loop, make_node, make_proxy, artifacts_dir):
    a = await make_node(["llama3:latest", "qwen3:8b"], name="a")
    b = await make_node(["llama3:latest", "mistral:7b"], name="b")
    a.loaded = ["qwen3:8b"]
    proxy = await make_proxy([a, b])
    expect = require_browser().expect
    problems: list[str] = []
    async with chromium() as browser:
        page = await new_page(browser, problems)
        await page.goto(proxy.url + "/")  # a browser asking for / lands on the page
        assert page.url == proxy.url + "/ui"
        row_a = page.locator(f'tr.node[data-id="{proxy.node(a).id}"]')
        row_b = page.locator(f'tr.node[data-id="{proxy.node(b).id}"]')
        await expect(row_a.locator('[data-f="url"]')).to_have_text(a.url)
        await expect(row_b.locator('[data-f="health"]')).to_have_text("healthy")
        await expect(row_a.locator('[data-f="loaded"]')).to_contain_text("qwen3:8b")
        await expect(row_a.locator('[data-f="slots"]')).to_have_text("4")
        await expect(page.locator("#live")).to_be_visible()
        await page.evaluate("window.notReloaded = true")

        port = b.port
        await b.stop()
        await expect(row_b.locator('[data-f="health"]')).to_have_text(
            "unhealthy", timeout=LIVE_TIMEOUT)
        await expect(row_b.locator('[data-f="reason"]')).to_contain_text("refused")
        await expect(page.locator("#overall")).to_have_text("1 of 2 nodes down")
        await expect(page.locator('[data-f="active-count"]')).to_have_text("1")
        await b.start(port=port)
        await expect(row_b.locator('[data-f="health"]')).to_have_text(
            "healthy", timeout=LIVE_TIMEOUT)
        await expect(page.locator("#overall")).to_have_text("All nodes serving")
        assert (await api_state(proxy))["nodes"][1]["status"] == "active"

        # The node says it is busy: it rests, degraded, and the page says why.
        b.fail_status, b.fail_message = 503, "server busy, please try again."
        client = ollama.AsyncClient(host=proxy.url)
        while not b.requests_to("/api/generate"):  # ties rotate: b gets one soon
            assert (await client.generate(model="llama3", prompt="x", stream=False)).done
        await expect(row_b.locator('[data-f="health"]')).to_have_text(
            "degraded", timeout=LIVE_TIMEOUT)
        await expect(row_b.locator('[data-f="reason"]')).to_have_text("busy: resting 5 s")
        await expect(row_b.locator('[data-f="pool"]')).to_have_text("last resort only")
        await expect(page.locator("#overall")).to_have_text("1 of 2 nodes down")
        assert await page.evaluate("window.notReloaded") is True

        # Without JavaScript the server-rendered page says the same.
        static = await new_page(browser, problems, java_script_enabled=False)
        await static.goto(proxy.url + "/ui")
        assert await static.locator("tr.node").count() == 2
        await expect(static.locator(f'tr.node[data-id="{proxy.node(a).id}"] [data-f="models"]')
                     ).to_contain_text("llama3:latest")
        await expect(static.locator(f'tr.node[data-id="{proxy.node(b).id}"] [data-f="health"]')
                     ).to_have_text("degraded")
        await expect(static.locator("#live")).to_be_hidden()
    assert problems == []


SHOWN = """() => {
  const shown = {title: document.title};
  for (const el of document.querySelectorAll("#overall [data-f], main [data-f]")) {
    const row = el.closest("tr.node");
    const key = (row ? `${row.dataset.id}:` : "") + el.dataset.f;
    shown[key] = el.tagName === "polyline" ? el.getAttribute("points") : el.textContent.trim();
  }
  return shown;
}"""


async def test_formats_match_the_script(io_loop, make_node, make_proxy):
    """What the script writes after a poll is what the server renders, to the
    character, with figures where rounding could differ (12.5 ms, 4.25 s)."""
    a = await make_node(["llama3:latest"])
    b = await make_node(["mistral:7b"])
    proxy = await make_proxy([a, b], health_interval=3600, max_wait=4.25)
    expect = require_browser().expect
    problems: list[str] = []
    async with chromium() as browser:
        page = await new_page(browser, problems)
        await page.goto(proxy.url + "/ui")
        await expect(page.locator("#live")).to_be_visible()
        before = await page.evaluate(SHOWN)

        # The state changes after the page was rendered: only a poll shows it.
        node_a, node_b = proxy.node(a), proxy.node(b)
        for sample in (0.0125, 0.02, 0.0125):
            proxy.registry.record_latency(node_a, sample)
        node_a.latency = 0.0125
        node_a.since = node_b.since = node_a.since - 3 * 86400 - 1800  # "3d 0h" for a while
        proxy.ctx.nodes.update(node_b.id, {"weight": 2.5}, partial=True)
        proxy.registry.busy(node_b, 30)
        scheduler = proxy.ctx.scheduler
        scheduler.queued_total, scheduler.wait_seconds_total = 1, 4.25
        await expect(page.locator(f'tr.node[data-id="{node_b.id}"] [data-f="weight"]')
                     ).to_have_text("weight 2.5")
        await expect(page.locator('[data-f="queue-average"]')).not_to_have_text("—")
        live = await page.evaluate(SHOWN)

        static = await new_page(browser, problems, java_script_enabled=False)
        await static.goto(proxy.url + "/ui")
        rendered = await static.evaluate(SHOWN)
    assert problems == []
    assert live == rendered
    assert live != before
    assert live[f"{node_a.id}:latency"] == "12 ms"
    assert live["queue-average"] == "4.2 s" and live["queue-max-wait"] == "4.2 s"
    assert live[f"{node_b.id}:since"] == "3d 0h"
    assert live[f"{node_b.id}:pool"] == "last resort only"
    assert live["summary"] == "1 of 2 nodes down" and live["title"] == "1 of 2 nodes down · Aivonx"
    assert len(live[f"{node_a.id}:spark"].split()) >= 3  # and the probe's own sample


async def sign_in(page: Any, proxy: Any) -> None:
    await page.goto(proxy.url + "/ui/login")
    await page.get_by_label("Username").fill("root")
    await page.get_by_label("Password").fill(ROOT_PASSWORD)
    await page.get_by_role("button", name="Sign in").click()
    await page.wait_for_url(proxy.url + "/ui")


# Every value a pull's progress bar and byte count are set to, in order.
RECORD_PULL = """() => {
  window.bars = [];
  window.amounts = [];
  const hook = (proto, name, record) => {
    const { get, set } = Object.getOwnPropertyDescriptor(proto, name);
    Object.defineProperty(proto, name, {
      get, configurable: true,
      set(value) { record(this, value); set.call(this, value); },
    });
  };
  hook(HTMLProgressElement.prototype, "value", (el, value) => window.bars.push(Number(value)));
  hook(Node.prototype, "textContent", (el, value) => {
    if (value && el.classList && el.classList.contains("pull-amount")) window.amounts.push(value);
  });
}"""


async def test_pull_progress_only_moves_forward(io_loop, make_node, make_proxy):
    a = await make_node(["llama3:latest"])
    digest = "sha256:" + "ab" * 32
    a.layer_lines = [{"status": "pulling ab", "digest": digest, "total": 1000, "completed": c}
                     for c in (800, 300, 2500, 1000)]  # back, then past the total
    proxy = await make_proxy([a])
    expect = require_browser().expect
    problems: list[str] = []
    async with chromium() as browser:
        page = await new_page(browser, problems)
        await sign_in(page, proxy)
        await page.evaluate(RECORD_PULL)
        pull = page.locator("#pull")
        await pull.get_by_label("Model").fill("gemma3:1b")
        await pull.get_by_role("button", name="Pull").click()
        await expect(page.locator("#pull-progress .pull-node.succeeded")).to_have_count(1)
        bars = await page.evaluate("window.bars")
        amounts = await page.evaluate("window.amounts")
    assert problems == []
    assert a.requests_to("/api/pull")  # the node's lines reached the page
    assert bars and bars == sorted(bars) and max(bars) <= 1
    assert amounts and set(amounts) <= {"800 B / 1.0 KB", "1.0 KB / 1.0 KB"}
    assert amounts[-1] == "1.0 KB / 1.0 KB"


async def test_sign_in_and_steer_the_cluster_from_the_page(io_loop, make_node, make_proxy,
                                                           artifacts_dir):
    a = await make_node(["llama3:latest", "qwen3:8b"])
    b = await make_node(["llama3:latest", "mistral:7b"])
    d = await make_node(["llama3:latest"])
    c = await make_node(["phi3:mini"])  # added from the page
    proxy = await make_proxy([a, b, d])
    for fake, name in ((a, "gpu-a"), (b, "gpu-b"), (d, "gpu-d")):
        proxy.ctx.nodes.update(proxy.node(fake).id, {"name": name}, partial=True)
    client = ollama.AsyncClient(host=proxy.url)
    for _ in range(3):
        await client.generate(model="qwen3:8b", prompt="hi", stream=False)
    expect = require_browser().expect
    problems: list[str] = []
    async with chromium() as browser:
        page = await new_page(browser, problems, viewport={"width": 1280, "height": 900})
        await page.goto(proxy.url + "/ui")
        await page.get_by_role("link", name="Sign in").click()
        await page.get_by_label("Username").fill("root")
        await page.get_by_label("Password").fill(ROOT_PASSWORD)
        await page.get_by_role("button", name="Sign in").click()
        await expect(page.locator(".account")).to_contain_text("Signed in as root")
        await expect(page.locator("#flash")).to_have_text("Signed in as root.")
        # The session cookie is Secure and HttpOnly, and Chromium keeps it on
        # http://127.0.0.1 (a secure context).
        cookies = {c["name"]: c for c in await page.context.cookies()}
        session = cookies["aivonx_session"]
        assert session["secure"] and session["httpOnly"] and session["sameSite"] == "Strict"
        assert await page.evaluate("document.cookie") == ""
        token = await api.login(proxy)

        # Add a node: it appears, is probed and serves; the API lists it.
        add = page.locator("#add-node")
        await add.get_by_label("Address").fill(c.url)
        await add.get_by_label("Name").fill("gpu-c")
        await add.get_by_role("button", name="Add node").click()
        await expect(page.locator("#flash")).to_have_text("Added node gpu-c; it is being probed.")
        row_c = page.locator("tr.node", has=page.locator('[data-f="name"]', has_text="gpu-c"))
        await expect(row_c.locator('[data-f="health"]')).to_have_text(
            "healthy", timeout=LIVE_TIMEOUT)
        await expect(row_c.locator('[data-f="models"]')).to_contain_text("phi3:mini")
        listed = (await api.call(proxy, "GET", "/api/proxy/nodes", token=token)).json
        assert {"gpu-c": (c.port, True)}.items() <= {
            n["name"]: (n["port"], n["active"]) for n in listed["results"]}.items()

        # Change the strategy: the API says so.
        await page.get_by_label("Routing strategy").select_option("round_robin")
        await page.get_by_role("button", name="Apply").click()
        await expect(page.locator("#flash")).to_have_text("Strategy is now round_robin.")
        config = (await api.call(proxy, "GET", "/api/proxy/config", token=token)).json
        assert config["strategy"] == "round_robin"

        # Pull a model onto every serving node, with each node's progress.
        pull = page.locator("#pull")
        await pull.get_by_label("Model").fill("gemma3:1b")
        await pull.get_by_role("button", name="Pull").click()
        progress = page.locator("#pull-progress .pull-node")
        await expect(progress).to_have_count(4)
        await expect(page.locator("#pull-progress .pull-node.succeeded")).to_have_count(4)
        await expect(page.locator("#flash")).to_have_text("Pulled gemma3:1b on 4 nodes.")
        await expect(row_c.locator('[data-f="models"]')).to_contain_text("gemma3:1b")
        assert all("gemma3:1b" in fake.models for fake in (a, b, c, d))

        # Drain one node, rename another; a third goes down.
        row_b = page.locator(f'tr.node[data-id="{proxy.node(b).id}"]')
        await row_b.get_by_role("button", name="Drain").click()
        await expect(row_b.locator('[data-f="health"]')).to_have_text("drained")
        await expect(row_b.get_by_role("button", name="Resume")).to_be_visible()
        assert not proxy.node(b).routable
        await row_c.get_by_text("Edit", exact=True).click()
        await row_c.get_by_label("Name").fill("gpu-c-renamed")
        await row_c.get_by_label("Weight").fill("2")
        await row_c.get_by_role("button", name="Save").click()
        await expect(page.locator("#flash")).to_have_text("Saved node gpu-c-renamed.")
        await expect(row_c.locator('[data-f="name"]').first).to_have_text("gpu-c-renamed")
        await expect(row_c.locator('[data-f="weight"]')).to_have_text("weight 2")
        await d.stop()
        d_id = proxy.node(d).id
        row_d = page.locator(f'tr.node[data-id="{d_id}"]')
        await expect(row_d.locator('[data-f="health"]')).to_have_text(
            "unhealthy", timeout=LIVE_TIMEOUT)

        # One slot on gpu-a, which alone has qwen3: a second request waits in the
        # queue. gpu-c answers "busy" to what it is sent meanwhile and rests.
        row_a = page.locator(f'tr.node[data-id="{proxy.node(a).id}"]')
        await row_a.get_by_text("Edit", exact=True).click()
        await row_a.get_by_label("Slots").fill("1")
        await row_a.get_by_role("button", name="Save").click()
        await expect(page.locator("#flash")).to_have_text("Saved node gpu-a.")
        one = (await api.call(proxy, "GET", f"/api/proxy/nodes/{proxy.node(a).id}",
                              token=token)).json
        assert (one["slots"], one["weight"]) == (1, 1.0)
        a.chunks, a.chunk_delay = 60, 0.25  # fifteen seconds, unless told to hurry
        generations = [asyncio.ensure_future(client.generate(model="qwen3:8b", prompt="x",
                                                             stream=False))]
        await expect(row_a.locator('[data-f="active_requests"]')).to_have_text("1")
        generations.append(asyncio.ensure_future(
            client.generate(model="qwen3:8b", prompt="x", stream=False)))
        c.fail_status, c.fail_message = 503, "server busy, please try again."
        generations.append(asyncio.ensure_future(  # gpu-a is full: to gpu-c, then waits
            client.generate(model="gemma3:1b", prompt="x", stream=False)))
        queue = page.locator("#queue")
        await expect(queue.locator('[data-f="queue-depth"]')).to_have_text("2")
        await expect(queue).to_have_class(re.compile(r"\bqueued\b"))
        await expect(queue.locator('[data-f="queue-oldest"]')).not_to_have_text("—")
        await expect(row_a.locator('[data-f="load"]')).to_have_class("load full")
        await expect(row_a.locator('[data-f="slots"]')).to_have_text("1")
        await expect(row_c.locator('[data-f="health"]')).to_have_text("degraded")
        await expect(row_c.locator('[data-f="reason"]')).to_have_text(
            re.compile(r"busy: resting 5 s|a request failed \d+ s ago"))

        await page.wait_for_timeout(1200)  # a few more latency samples for the sparklines
        await page.screenshot(path=os.path.join(artifacts_dir, "status-page.png"),
                              full_page=True)
        for options, suffix in (({"color_scheme": "dark"}, "dark"),
                                ({"viewport": {"width": 390, "height": 844},
                                  "device_scale_factor": 2, "is_mobile": True,
                                  "has_touch": True}, "phone")):
            shot = await new_page(browser, problems,
                                  storage_state=await page.context.storage_state(), **options)
            await shot.goto(proxy.url + "/ui")
            await expect(shot.locator("#live")).to_have_text("live")
            await shot.screenshot(path=os.path.join(artifacts_dir, f"status-page-{suffix}.png"),
                                  full_page=True)

        # The queue empties as gpu-a finishes; every request was served.
        a.chunk_delay = 0.0
        assert all(r.done for r in await asyncio.gather(*generations))
        await expect(queue.locator('[data-f="queue-depth"]')).to_have_text("0")
        await expect(queue.locator('[data-f="queue-average"]')).not_to_have_text("—")

        # Delete the node that went down; sign out.
        await row_d.get_by_text("Delete", exact=True).click()
        await row_d.get_by_role("button", name="Delete node").click()
        await expect(row_d).to_have_count(0)
        assert d_id not in {
            n["id"] for n in (await api.call(proxy, "GET", "/api/proxy/nodes",
                                             token=token)).json["results"]}
        await page.get_by_role("button", name="Sign out").click()
        await expect(page.get_by_role("link", name="Sign in")).to_be_visible()
        await expect(page.locator("#add-node")).to_have_count(0)
    assert problems == []


async def test_page_follows_the_cluster_instances_and_redis(
        io_loop, make_node, make_proxy, postgres_url, redis_url, redis_server):
    fake = await make_node()
    a = await make_proxy([fake], db=postgres_url, redis=redis_url, instance_name="a")
    b = await make_proxy(db=postgres_url, redis=redis_url, instance_name="b<i>")
    await api.wait_for(lambda: all(len(p.ctx.cluster.instances) == 2 for p in (a, b)), 5)
    expect = require_browser().expect
    problems: list[str] = []
    async with chromium() as browser:
        page = await new_page(browser, problems)
        await page.goto(a.url + "/ui")
        await expect(page.locator('[data-f="instances"]')).to_have_text("a, b<i>")
        await expect(page.locator('[data-f="instance-count"]')).to_have_text("2")
        await expect(page.locator('[data-f="redis"]')).to_contain_text("Redis connected")
        await expect(page.locator("#live")).to_be_visible()
        redis_server.stop()
        try:
            await expect(page.locator('[data-f="redis"]')).to_contain_text(
                "Redis unreachable", timeout=LIVE_TIMEOUT + 3000)
        finally:
            redis_server.start()
        await expect(page.locator('[data-f="redis"]')).to_contain_text(
            "Redis connected", timeout=LIVE_TIMEOUT + 3000)
    assert problems == []
