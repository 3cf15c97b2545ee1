"""Signing in on the status page and steering the cluster with its forms,
over plain HTTP as a browser without JavaScript sends them (and as the
page's script sends them, asking for JSON): session cookie, XSRF, results."""
from __future__ import annotations

import base64
import json
import re
from urllib.parse import urlencode

from tornado.tcpclient import TCPClient

from aivonx.store import Node
from tests.helpers import ROOT_PASSWORD, Browser, wait_for


def flash(html: str) -> str | None:
    match = re.search(r'<p class="flash (\w+)" role="alert">(.*?)</p>', html, re.S)
    return f"{match.group(1)}: {match.group(2)}" if match else None


async def test_sign_in_sets_a_strict_session_cookie_and_sign_out_revokes_it(
        io_loop, make_node, make_proxy):
    proxy = await make_proxy([await make_node()])
    browser = Browser(proxy)
    html = await browser.page()
    assert 'href="/ui/login"' in html and "/ui/nodes" not in html  # nothing to steer yet
    response = await browser.sign_in()
    assert response.code == 302 and response.headers["Location"] == "/ui"
    raw = browser.set_cookies["aivonx_session"]
    for flag in ("Secure", "HttpOnly", "SameSite=Strict", "Path=/ui"):
        assert flag in raw, raw
    token = browser.cookies["aivonx_session"]
    assert proxy.ctx.auth.user_for(token, "session").username == "root"
    assert proxy.ctx.auth.user_for(token, "access") is None  # not an API token
    html = await browser.page()
    assert flash(html) == "ok: Signed in as root."
    assert "Signed in as <strong>root</strong>" in html
    assert 'action="/ui/nodes"' in html and 'action="/ui/strategy"' in html
    assert flash(await browser.page()) is None  # a message is shown once

    response = await browser.post("/ui/logout", {})
    assert response.code == 302
    assert proxy.ctx.auth.user_for(token, "session") is None  # revoked, not just forgotten
    assert "aivonx_session" not in browser.cookies
    browser.cookies["aivonx_session"] = token  # a copied cookie is worth nothing now
    html = await browser.page()
    assert "Signed in as" not in html and 'action="/ui/nodes"' not in html


async def test_the_xsrf_cookie_has_the_same_flags(io_loop, make_proxy):
    proxy = await make_proxy([])
    browser = Browser(proxy)
    await browser.page("/ui/login")
    raw = browser.set_cookies["_xsrf"]
    for flag in ("Secure", "HttpOnly", "SameSite=Strict", "Path=/ui"):
        assert flag in raw, raw


async def test_a_wrong_password_is_refused_and_the_name_kept_escaped(io_loop, make_proxy):
    proxy = await make_proxy([])
    browser = Browser(proxy)
    token = await browser.xsrf("/ui/login")
    response = await browser.request("POST", "/ui/login", {
        "_xsrf": token, "username": '"><script>x</script>', "password": "nope"})
    assert response.code == 401
    html = response.body.decode()
    assert "Invalid username or password." in html
    assert "<script>x" not in html and "&quot;&gt;&lt;script&gt;x" in html
    assert "aivonx_session" not in browser.cookies


async def test_sign_in_over_plain_http_elsewhere_than_localhost_is_explained(io_loop,
                                                                            make_proxy):
    proxy = await make_proxy([])
    browser = Browser(proxy)
    local = (await browser.request("GET", "/ui/login")).body.decode()
    assert 'id="insecure"' not in local
    remote = (await browser.request("GET", "/ui/login", Host="gpu-box.lan:8000")).body.decode()
    assert 'id="insecure"' in remote
    behind_tls = (await browser.request("GET", "/ui/login", Host="aivonx.example.com",
                                        **{"X-Forwarded-Proto": "https"})).body.decode()
    assert 'id="insecure"' not in behind_tls


async def test_every_form_needs_the_xsrf_token(io_loop, make_node, make_proxy):
    proxy = await make_proxy([await make_node()])
    browser = Browser(proxy)
    assert (await browser.sign_in()).code == 302
    before = Node.select().count()
    # No token, a forged token, a token without its cookie: all refused.
    no_token = await browser.request("POST", "/ui/nodes", {"address": "gpu9"})
    forged = await browser.request("POST", "/ui/nodes", {"_xsrf": "2|00|00|00",
                                                         "address": "gpu9"})
    token = await browser.xsrf()
    cookie = browser.cookies.pop("_xsrf")
    no_cookie = await browser.request("POST", "/ui/nodes", {"_xsrf": token, "address": "gpu9"})
    browser.cookies["_xsrf"] = cookie
    for response in (no_token, forged, no_cookie):
        assert response.code == 403, response.code
        assert "reload the page" in response.body.decode()
    assert Node.select().count() == before
    # The script's header carries the token as well as the form field does.
    fields = {"address": "gpu9"}
    response = await browser.request("POST", "/ui/nodes", fields, "application/json",
                                     **{"X-XSRFToken": await browser.xsrf()})
    assert response.code == 200 and json.loads(response.body)["ok"] is True
    # Sign-in itself is protected (no login CSRF).
    response = await Browser(proxy).request("POST", "/ui/login", {
        "username": "root", "password": ROOT_PASSWORD})
    assert response.code == 403


async def test_forms_need_a_session(io_loop, make_node, make_proxy):
    proxy = await make_proxy([await make_node()])
    browser = Browser(proxy)
    response = await browser.post("/ui/strategy", {"strategy": "round_robin"})
    assert response.code == 302 and response.headers["Location"] == "/ui/login"
    assert "your session has ended" in flash(await browser.page("/ui/login")).lower()
    response = await browser.post("/ui/strategy", {"strategy": "round_robin"},
                                  "application/json")
    assert response.code == 401 and json.loads(response.body)["ok"] is False
    assert proxy.ctx.router.strategy == "cache_aware"


async def test_nodes_and_strategy_without_javascript(io_loop, make_node, make_proxy):
    a = await make_node()
    c = await make_node(["phi3:mini"])
    proxy = await make_proxy([a])
    browser = Browser(proxy)
    await browser.sign_in()

    # Add: redirect back with a message; the node is probed at once.
    response = await browser.post("/ui/nodes", {"address": c.url, "name": "gpu-c"})
    assert response.code == 302 and response.headers["Location"] == "/ui"
    assert flash(await browser.page()) == "ok: Added node gpu-c; it is being probed."
    added = Node.get(Node.name == "gpu-c")
    await wait_for(lambda: proxy.registry.nodes[added.id].status == "active", timeout=3)

    # A bad or duplicate address: the page again, the form keeps what was typed.
    response = await browser.post("/ui/nodes", {"address": "ftp://x", "name": "<b>n</b>"})
    assert response.code == 400
    html = response.body.decode()
    assert "scheme must be http or https" in html
    assert 'value="ftp://x"' in html and 'value="&lt;b&gt;n&lt;/b&gt;"' in html
    response = await browser.post("/ui/nodes", {"address": c.url})
    assert response.code == 409 and "already exists" in response.body.decode()

    # Edit, drain, resume, strategy, delete.
    response = await browser.post(f"/ui/nodes/{added.id}", {"name": "gpu-c2",
                                                            "address": c.url})
    assert response.code == 302 and Node.get_by_id(added.id).name == "gpu-c2"
    response = await browser.post(f"/ui/nodes/{added.id}", {"name": "", "address": c.url})
    assert response.code == 400 and "may not be blank" in response.body.decode()
    assert re.search(r'<details class="pop" open>', response.body.decode())  # form reopened
    await browser.post(f"/ui/nodes/{added.id}/drain", {"active": "0"})
    assert proxy.registry.nodes[added.id].status == "drained"
    assert "Drained node gpu-c2" in flash(await browser.page())
    await browser.post(f"/ui/nodes/{added.id}/drain", {"active": "1"})
    assert proxy.registry.nodes[added.id].enabled
    await browser.post("/ui/strategy", {"strategy": "round_robin"})
    assert proxy.ctx.router.strategy == "round_robin"
    response = await browser.post("/ui/strategy", {"strategy": "fastest"})
    assert response.code == 400 and "unknown strategy" in response.body.decode()
    await browser.post(f"/ui/nodes/{added.id}/delete", {})
    assert added.id not in proxy.registry.nodes
    assert Node.get_or_none(Node.id == added.id) is None
    response = await browser.post(f"/ui/nodes/{added.id}/delete", {})
    assert response.code == 404


async def test_forms_sent_by_the_script_answer_json(io_loop, make_node, make_proxy):
    a = await make_node()
    proxy = await make_proxy([a])
    browser = Browser(proxy)
    await browser.sign_in()
    response = await browser.post("/ui/nodes", {"address": ""}, "application/json")
    assert response.code == 400
    answer = json.loads(response.body)
    assert answer["ok"] is False and "address" in answer["errors"]
    response = await browser.post("/ui/strategy", {"strategy": "lowest_latency"},
                                  "application/json")
    assert json.loads(response.body) == {"ok": True,
                                         "message": "Strategy is now lowest_latency."}
    assert "aivonx_flash" not in browser.cookies  # no message left for the next page
    response = await browser.post("/ui/nodes/999999/drain", {"active": "0"},
                                  "application/json")
    assert response.code == 404 and json.loads(response.body)["ok"] is False


async def test_pull_streams_each_nodes_progress(io_loop, make_node, make_proxy):
    a, b = await make_node(), await make_node()
    proxy = await make_proxy([a, b])
    browser = Browser(proxy)
    await browser.sign_in()
    response = await browser.post("/ui/pull", {"model": "phi3:mini", "node": "all"},
                                  "application/x-ndjson, application/json")
    assert response.code == 200
    assert response.headers["Content-Type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in response.body.decode().splitlines()]
    ids = {proxy.node(a).id, proxy.node(b).id}
    assert {n["node_id"] for n in lines[0]["nodes"]} == ids
    progress = [line for line in lines[1:-1]]
    assert {line["node_id"] for line in progress} == ids
    assert any(line.get("completed") for line in progress)
    assert lines[-1]["done"] is True and lines[-1]["status"] == "success"
    assert "phi3:mini" in a.models and "phi3:mini" in b.models
    # Looked at again before answering: the table lists it already.
    assert "phi3:mini" in proxy.node(a).models.values()

    # One node only; a bad name is refused before anything starts.
    response = await browser.post("/ui/pull", {"model": "qwen3:8b",
                                               "node": str(proxy.node(b).id)},
                                  "application/x-ndjson, application/json")
    assert json.loads(response.body.decode().splitlines()[-1])["status"] == "success"
    assert "qwen3:8b" in b.models and "qwen3:8b" not in a.models
    response = await browser.post("/ui/pull", {"model": "bad name!", "node": "all"},
                                  "application/x-ndjson, application/json")
    assert response.code == 400 and "model" in json.loads(response.body)["errors"]


async def test_pull_without_javascript_starts_and_returns(io_loop, make_node, make_proxy):
    a = await make_node()
    proxy = await make_proxy([a])
    browser = Browser(proxy)
    await browser.sign_in()
    response = await browser.post("/ui/pull", {"model": "phi3:mini", "node": "all"})
    assert response.code == 302
    assert "Pulling phi3:mini on" in flash(await browser.page())
    await wait_for(lambda: "phi3:mini" in proxy.node(a).models.values(), timeout=5)


async def test_leaving_the_page_cancels_the_pull_on_the_nodes(io_loop, make_node, make_proxy):
    a = await make_node(chunk_delay=0.5)  # a slow download: one progress line per 0.5 s
    proxy = await make_proxy([a])
    browser = Browser(proxy)
    await browser.sign_in()
    token = await browser.xsrf()
    body = urlencode({"_xsrf": token, "model": "phi3:mini", "node": "all"}).encode()
    jar = "; ".join(f"{k}={v}" for k, v in browser.cookies.items())
    stream = await TCPClient().connect("127.0.0.1", proxy.port)
    await stream.write(
        b"POST /ui/pull HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: application/x-ndjson\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\nCookie: %s\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (jar.encode(), len(body), body))
    head = await stream.read_until(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    await stream.read_until(b'"status"')  # the node's first progress line arrived
    stream.close()  # the page is closed
    await wait_for(lambda: a.requests_to("/api/pull")[0].client_closed_at is not None, timeout=3)
    assert "phi3:mini" not in a.models  # the download stopped before it finished


async def test_slots_and_weight_from_the_forms(io_loop, make_node, make_proxy):
    a = await make_node()
    c = await make_node()
    proxy = await make_proxy([a], health_interval=3600)
    browser = Browser(proxy)
    await browser.sign_in()
    a_id = proxy.node(a).id
    html = await browser.page()
    assert re.search(r'<input type="number" name="slots"[^>]* value="4" data-f="edit-slots">',
                     html)
    assert re.search(r'<input type="number" name="weight"[^>]* value="1" data-f="edit-weight">',
                     html)

    # Add with them, or without (the defaults).
    response = await browser.post("/ui/nodes", {"address": c.url, "name": "gpu-c",
                                                "slots": "8", "weight": "2.5"})
    assert response.code == 302
    added = Node.get(Node.name == "gpu-c")
    assert (added.slots, added.weight) == (8, 2.5)
    assert (proxy.registry.nodes[added.id].slots, proxy.registry.nodes[added.id].weight) == (
        8, 2.5)
    await browser.post("/ui/nodes", {"address": "gpu9", "slots": "", "weight": ""})
    assert (Node.get(Node.address == "gpu9").slots, Node.get(Node.address == "gpu9").weight) \
        == (4, 1.0)
    html = await browser.page()
    assert re.search(r'data-f="weight"[^>]*>weight 2.5</span>', rows_html(html, added.id))

    # Edit: routing has them at once.
    response = await browser.post(f"/ui/nodes/{a_id}", {
        "name": "gpu-a", "address": a.url, "slots": "1", "weight": "3"})
    assert response.code == 302
    assert (proxy.registry.nodes[a_id].slots, proxy.registry.nodes[a_id].weight) == (1, 3.0)
    assert "Saved node gpu-a." in flash(await browser.page())

    # Bad values: the form again, open, with what was typed and the field's message.
    for fields, field, message in (
            ({"slots": "0", "weight": "1"}, "slots", "slots must be an integer between 1 and 1024"),
            ({"slots": "2.5", "weight": "1"}, "slots", "slots must be an integer"),
            ({"slots": "", "weight": "1"}, "slots", "slots must be an integer"),
            ({"slots": "2", "weight": "0"}, "weight", "weight must be a number greater than 0"),
            ({"slots": "2", "weight": "nan"}, "weight", "weight must be a number"),
            ({"slots": "2", "weight": "heavy"}, "weight", "weight must be a number"),
            ({"slots": "2", "weight": "1e9"}, "weight", "at most 100")):
        response = await browser.post(f"/ui/nodes/{a_id}", {"name": "gpu-a", "address": a.url,
                                                            **fields})
        assert response.code == 400, fields
        html = response.body.decode()
        assert message in html, fields
        row = rows_html(html, a_id)
        assert '<details class="pop" open>' in row
        assert f'value="{fields[field]}" data-f="edit-{field}"' in row
        answer = await browser.post(f"/ui/nodes/{a_id}", {"name": "gpu-a", "address": a.url,
                                                          **fields}, "application/json")
        assert answer.code == 400 and field in json.loads(answer.body)["errors"]
    assert (Node.get_by_id(a_id).slots, Node.get_by_id(a_id).weight) == (1, 3.0)
    response = await browser.post("/ui/nodes", {"address": "gpu8", "slots": "x"})
    assert response.code == 400 and 'value="x"' in response.body.decode()
    assert Node.get_or_none(Node.address == "gpu8") is None


def rows_html(html: str, node_id: int) -> str:
    """One node's row of the page's table."""
    body = html.split('<template id="row-template">')[0]
    return re.search(r'<tr class="node" data-id="%d"[^>]*>(.*?)</tr>' % node_id, body,
                     re.S).group(1)


async def test_bad_input_on_the_page_is_refused_not_a_server_error(io_loop, make_node,
                                                                   make_proxy):
    a = await make_node()
    proxy = await make_proxy([a])
    browser = Browser(proxy)
    await browser.sign_in()
    # Digits that are not ASCII ("²" passes str.isdigit()) name no node.
    for node in ("²", "١", "1²"):
        response = await browser.post("/ui/pull", {"model": "phi3:mini", "node": node},
                                      "application/x-ndjson, application/json")
        assert response.code == 404, node
        assert json.loads(response.body) == {"ok": False, "message": "No such node."}
    assert a.requests_to("/api/pull") == []
    # A flash cookie nested too deeply to decode is dropped; the page still shows.
    nested = base64.urlsafe_b64encode(b"[" * 3000 + b"]" * 3000).decode()
    for visitor, path in ((browser, "/ui"), (Browser(proxy), "/ui/login")):
        visitor.cookies["aivonx_flash"] = nested
        response = await visitor.request("GET", path)
        assert response.code == 200, path
        assert "aivonx_flash" not in visitor.cookies, path  # cleared


async def test_the_form_token_belongs_to_the_session(io_loop, make_node, make_proxy):
    proxy = await make_proxy([await make_node()])
    alice, bob = Browser(proxy), Browser(proxy)
    await alice.sign_in()
    await bob.sign_in()
    token = await alice.xsrf()
    assert token != await bob.xsrf()
    # Alice's token with Bob's session, even with Alice's XSRF cookie copied too.
    for cookies in ({"_xsrf": bob.cookies["_xsrf"]}, {"_xsrf": alice.cookies["_xsrf"]}):
        bob.cookies.update(cookies)
        response = await bob.request("POST", "/ui/strategy", {"_xsrf": token,
                                                              "strategy": "round_robin"})
        assert response.code == 403 and "reload the page" in response.body.decode()
    assert proxy.ctx.router.strategy == "cache_aware"
    # A token issued before signing in (the sign-in page's) is not the session's.
    carol = Browser(proxy)
    before = await carol.xsrf("/ui/login")
    await carol.request("POST", "/ui/login", {"_xsrf": before, "username": "root",
                                              "password": ROOT_PASSWORD})
    assert "aivonx_session" in carol.cookies
    response = await carol.request("POST", "/ui/strategy", {"_xsrf": before,
                                                            "strategy": "round_robin"})
    assert response.code == 403
    assert proxy.ctx.router.strategy == "cache_aware"
    # Its own token works, from the form or the script's header; a new session
    # (signed out and in again) gets a new one and the old one is refused.
    response = await alice.request("POST", "/ui/strategy", {"_xsrf": token,
                                                            "strategy": "round_robin"})
    assert response.code == 302 and proxy.ctx.router.strategy == "round_robin"
    response = await carol.request("POST", "/ui/strategy", {"strategy": "least_active"},
                                   "application/json", **{"X-XSRFToken": await carol.xsrf()})
    assert response.code == 200 and proxy.ctx.router.strategy == "least_active"
    assert (await alice.post("/ui/logout", {})).code == 302
    await alice.sign_in()
    assert await alice.xsrf() != token
    response = await alice.request("POST", "/ui/strategy", {"_xsrf": token,
                                                            "strategy": "round_robin"})
    assert response.code == 403 and proxy.ctx.router.strategy == "least_active"
