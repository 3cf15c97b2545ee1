"""The status page in a real browser: headless Chromium driven by Playwright.

Chromium comes from Debian (`apt-get install chromium`, done by .ci/run);
Playwright's own browser downloads are never used. The proxy and the fake
nodes run in the test's IOLoop, and Playwright's async API shares it.
Screenshots go to artifacts/ (ignored by git).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Any, AsyncIterator

import pytest
from tornado.httpclient import AsyncHTTPClient

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
        response = await client.fetch(proxy.url + "/ui/state")
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
        await expect(row_b.locator('[data-f="status"]')).to_have_text("active")
        await expect(row_a.locator('[data-f="loaded"]')).to_contain_text("qwen3:8b")
        await expect(page.locator("#live")).to_be_visible()
        await page.evaluate("window.notReloaded = true")

        port = b.port
        await b.stop()
        await expect(row_b.locator('[data-f="status"]')).to_have_text(
            "standby", timeout=LIVE_TIMEOUT)
        await expect(row_b.locator('[data-f="reason"]')).not_to_be_empty()
        await expect(page.locator("#overall")).to_have_text("1 of 2 nodes down")
        await expect(page.locator('[data-f="active-count"]')).to_have_text("1")
        await b.start(port=port)
        await expect(row_b.locator('[data-f="status"]')).to_have_text(
            "active", timeout=LIVE_TIMEOUT)
        await expect(page.locator("#overall")).to_have_text("All nodes serving")
        assert await page.evaluate("window.notReloaded") is True
        assert (await api_state(proxy))["nodes"][1]["status"] == "active"

        # Without JavaScript the server-rendered page says the same.
        static = await new_page(browser, problems, java_script_enabled=False)
        await static.goto(proxy.url + "/ui")
        assert await static.locator("tr.node").count() == 2
        await expect(static.locator(f'tr.node[data-id="{proxy.node(a).id}"] [data-f="models"]')
                     ).to_contain_text("llama3:latest")
        await expect(static.locator("#live")).to_be_hidden()

        for scheme, suffix in (("light", ""), ("dark", "-dark")):
            shot = await new_page(browser, problems, color_scheme=scheme)
            await shot.goto(proxy.url + "/ui")
            await expect(shot.locator("#live")).to_be_visible()
            await shot.screenshot(path=os.path.join(artifacts_dir, f"status-page{suffix}.png"),
                                  full_page=True)
        phone = await new_page(browser, problems, viewport={"width": 390, "height": 844},
                               device_scale_factor=2, is_mobile=True, has_touch=True)
        await phone.goto(proxy.url + "/ui")
        await expect(phone.locator("#live")).to_be_visible()
        await phone.screenshot(path=os.path.join(artifacts_dir, "status-page-phone.png"),
                               full_page=True)
    assert problems == []
