"""The status page's keys section: create a key (shown once), see usage
charts, revoke it; the warning when inference is open beyond loopback."""
from __future__ import annotations

import re

from tests.helpers import Browser, call, login


async def test_create_use_and_revoke_a_key_on_the_page(io_loop, make_node, make_proxy):
    node = await make_node(["llama3:latest"], chunks=2)
    proxy = await make_proxy([node])
    browser = Browser(proxy)
    await browser.sign_in()
    answer = await browser.post("/ui/keys", {"name": "webui", "kind": "admin",
                                             "models": "llama3*", "rpm": "30"})
    page = answer.body.decode()
    assert answer.code == 200 and "shown only once" in page
    key = re.search(r'class="new-key">(avx_[A-Za-z0-9_-]+)<', page).group(1)
    chat = {"model": "llama3", "stream": False,
            "messages": [{"role": "user", "content": "a b"}]}
    assert (await call(proxy, "POST", "/api/chat", chat, key)).code == 200
    assert (await call(proxy, "GET", "/api/proxy/audit", token=key)).code == 200
    page = await browser.page()
    assert "webui" in page and key[:12] in page and key not in page
    assert "rpm 30" in page and "llama3*" in page
    # Usage bars per key and model: 2 prompt + 2 completion tokens, one request.
    assert page.count("<svg role=\"img\"") == 4 and "4 tokens · 1 requests" in page
    key_id = proxy.ctx.keys.keyring.check(key).id
    answer = await browser.post(f"/ui/keys/{key_id}/revoke", {})
    assert answer.code == 302
    assert 'class="revoked"' in await browser.page()
    audit = await call(proxy, "GET", "/api/proxy/audit", token=key)
    assert audit.code == 401  # the admin key no longer passes
    audit = await call(proxy, "GET", "/api/proxy/audit", token=await login(proxy))
    assert ("root", f"POST /ui/keys/{key_id}/revoke") in {
        (e["actor"], e["action"]) for e in audit.json["results"]}


async def test_page_says_plainly_when_inference_is_open_beyond_loopback(io_loop, make_proxy):
    proxy = await make_proxy([])
    assert "Inference is open" not in (await call(proxy, "GET", "/ui")).text
    proxy.ctx.keys.host = "0.0.0.0"  # as if started with --host 0.0.0.0
    assert proxy.ctx.keys.warn_if_exposed()
    page = (await call(proxy, "GET", "/ui")).text
    assert "Inference is open" in page and "0.0.0.0" in page
    await call(proxy, "PATCH", "/api/proxy/config", {"inference_auth": "keys"},
               await login(proxy))
    assert "Inference is open" not in (await call(proxy, "GET", "/ui")).text
