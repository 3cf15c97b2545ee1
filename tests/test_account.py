"""Accounts over HTTP: login, refresh, logout, throttling, the root user,
the passwd command, and what an invalid token does where."""
from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
import re
import sys
import time

import ollama
import pytest
from tornado.httpclient import AsyncHTTPClient

from aivonx import auth, store
from tests.helpers import call, login
from tests.helpers import ROOT_PASSWORD

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROTECTED = [
    ("GET", "/api/proxy/config", None),
    ("PUT", "/api/proxy/config", {"strategy": "round_robin"}),
    ("PATCH", "/api/proxy/config", {"strategy": "round_robin"}),
    ("GET", "/api/proxy/nodes", None),
    ("POST", "/api/proxy/nodes", {"address": "10.0.0.1"}),
    ("GET", "/api/proxy/nodes/1", None),
    ("PUT", "/api/proxy/nodes/1", {"address": "10.0.0.1"}),
    ("PATCH", "/api/proxy/nodes/1", {"active": False}),
    ("DELETE", "/api/proxy/nodes/1", None),
    ("POST", "/api/proxy/pull", {"model": "llama3"}),
    ("POST", "/api/pull", {"model": "llama3"}),
    ("DELETE", "/api/delete", {"model": "llama3"}),
    ("POST", "/api/copy", {"source": "llama3", "destination": "x"}),
    ("POST", "/api/create", {"model": "x", "from": "llama3"}),
    ("POST", "/api/push", {"model": "llama3"}),
]


async def test_login_gives_tokens_that_open_the_management_api(io_loop, make_node,
                                                               make_proxy):
    proxy = await make_proxy([await make_node()])
    answer = await call(proxy, "POST", "/api/account/login",
                        {"username": "root", "password": ROOT_PASSWORD})
    assert answer.code == 200
    tokens = answer.json
    assert tokens["access"] != tokens["refresh"] and len(tokens["access"]) >= 40
    assert tokens["token_type"] == "Bearer" and tokens["expires_in"] == 3600
    config = await call(proxy, "GET", "/api/proxy/config", token=tokens["access"])
    assert config.code == 200 and config.json["strategy"] == "cache_aware"
    # The refresh token is not an access token.
    assert (await call(proxy, "GET", "/api/proxy/config", token=tokens["refresh"])).code == 401
    # Only hashes are stored, the password with scrypt.
    row = store.User.get(store.User.username == "root")
    assert row.password_hash.startswith("scrypt$16384$8$1$")
    assert ROOT_PASSWORD not in row.password_hash
    stored = {t.token_hash for t in store.Token.select()}
    assert tokens["access"] not in stored and auth.token_hash(tokens["access"]) in stored


@pytest.mark.parametrize("body, status, message", [
    ({"username": "root"}, 400, "password required"),
    ({"password": "x"}, 400, "username required"),
    ({}, 400, "username and password required"),
    ({"username": 5, "password": ["x"]}, 400, "username and password required"),
    ({"username": "root", "password": "wrong-password"}, 401, "invalid username or password"),
    ({"username": "nobody", "password": ROOT_PASSWORD}, 401, "invalid username or password"),
    ({"username": "root", "password": "x" * 5000}, 401, "invalid username or password"),
])
async def test_login_refusals(io_loop, make_proxy, body, status, message):
    proxy = await make_proxy()
    answer = await call(proxy, "POST", "/api/account/login", body)
    assert (answer.code, answer.json) == (status, {"error": message})


async def test_login_with_a_body_that_is_not_json_is_a_400(io_loop, make_proxy):
    proxy = await make_proxy()
    for raw in (b"", b"username=root", b"[1]"):
        answer = await call(proxy, "POST", "/api/account/login", raw=raw)
        assert answer.code == 400 and "error" in answer.json


async def test_repeated_failed_logins_are_throttled_per_username(io_loop, make_proxy):
    proxy = await make_proxy()
    await proxy.ctx.auth.set_password("alice", "alice-password")
    for _ in range(auth.MAX_FAILURES):
        answer = await call(proxy, "POST", "/api/account/login",
                            {"username": "root", "password": "guess"})
        assert answer.code == 401
    # Even the right password waits now, and says how long.
    answer = await call(proxy, "POST", "/api/account/login",
                        {"username": "root", "password": ROOT_PASSWORD})
    assert answer.code == 429 and "too many failed logins" in answer.json["error"]
    assert 1 <= int(answer.headers["Retry-After"]) <= auth.FAILURE_WINDOW + 1
    # Another user from the same address is not locked out.
    assert await login(proxy, "alice", "alice-password")


async def burst(proxy, bodies, address: str | None = None) -> list:
    """Send every login at once, each on its own connection."""
    client = AsyncHTTPClient(force_instance=True, max_clients=len(bodies))
    headers = {"Content-Type": "application/json"}
    try:
        answers = await asyncio.gather(*(
            client.fetch(proxy.url + "/api/account/login", method="POST", headers=headers,
                         body=json.dumps(body), raise_error=False, request_timeout=60)
            for body in bodies))
    finally:
        client.close()
    return answers


async def test_a_parallel_burst_of_wrong_passwords_meets_the_limit(io_loop, make_proxy):
    proxy = await make_proxy()
    answers = await burst(proxy, [{"username": "root", "password": f"guess-{i}"}
                                  for i in range(150)])
    codes = [a.code for a in answers]
    assert set(codes) == {401, 429}, codes
    assert codes.count(401) == auth.MAX_FAILURES
    for answer in answers:
        if answer.code == 429:
            assert 1 <= int(answer.headers["Retry-After"]) <= auth.FAILURE_WINDOW + 1
    # The limit holds afterwards too, the right password included.
    answer = await call(proxy, "POST", "/api/account/login",
                        {"username": "root", "password": ROOT_PASSWORD})
    assert answer.code == 429


async def test_a_parallel_burst_does_not_find_the_password_past_the_limit(io_loop, make_proxy):
    proxy = await make_proxy()
    guesses = [{"username": "root", "password": f"guess-{i}"} for i in range(29)]
    answers = await burst(proxy, guesses + [{"username": "root", "password": ROOT_PASSWORD}])
    codes = [a.code for a in answers]
    assert codes[-1] == 429, codes
    assert 200 not in codes and codes.count(401) == auth.MAX_FAILURES, codes


async def test_failures_for_one_name_do_not_lock_other_users_out_of_the_address(
        io_loop, make_proxy):
    # Behind a reverse proxy every client has one address: someone's typos,
    # here reaching a per-address bound lowered to keep the test short, must
    # not lock root out.
    proxy = await make_proxy()
    proxy.ctx.auth.address_throttle.max_failures = auth.MAX_FAILURES
    answers = await burst(proxy, [{"username": "alice", "password": f"typo-{i}"}
                                  for i in range(auth.MAX_FAILURES)])
    assert [a.code for a in answers] == [401] * auth.MAX_FAILURES
    assert await login(proxy, "root", ROOT_PASSWORD)
    # Past the address bound a name gets one try, not five, before it waits.
    answer = await call(proxy, "POST", "/api/account/login",
                        {"username": "bob", "password": "typo"})
    assert answer.code == 401
    answer = await call(proxy, "POST", "/api/account/login",
                        {"username": "bob", "password": "typo"})
    assert answer.code == 429 and int(answer.headers["Retry-After"]) >= 1


def test_throttle_forgets_failures_after_the_window():
    now = [1000.0]
    throttle = auth.LoginThrottle(3, 60.0, clock=lambda: now[0])
    for _ in range(3):
        assert throttle.retry_after("k") is None
        throttle.reserve("k")
    assert throttle.retry_after("k") == 61
    now[0] += 30
    assert throttle.retry_after("k") == 31
    now[0] += 31
    assert throttle.retry_after("k") is None
    throttle.reserve("k")
    throttle.succeeded("k")
    assert throttle.retry_after("k") is None


async def test_password_hashing_does_not_block_the_event_loop(io_loop, make_proxy):
    proxy = await make_proxy()
    gaps = []

    async def ticker() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.002)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    task = asyncio.ensure_future(ticker())
    try:
        for _ in range(3):
            await login(proxy)
    finally:
        task.cancel()
    # One scrypt takes ~50 ms; run inline it would stall the loop that long.
    assert max(gaps) < 0.03, max(gaps)


async def test_refresh_gives_a_new_access_token(io_loop, make_proxy):
    proxy = await make_proxy()
    tokens = (await call(proxy, "POST", "/api/account/login",
                         {"username": "root", "password": ROOT_PASSWORD})).json
    answer = await call(proxy, "POST", "/api/account/refresh", {"refresh": tokens["refresh"]})
    assert answer.code == 200
    access = answer.json["access"]
    assert access != tokens["access"]
    assert (await call(proxy, "GET", "/api/proxy/config", token=access)).code == 200
    # An access token cannot refresh; a missing one is a 400.
    answer = await call(proxy, "POST", "/api/account/refresh", {"refresh": tokens["access"]})
    assert answer.code == 401 and answer.json == {"error": "invalid or expired refresh token"}
    assert (await call(proxy, "POST", "/api/account/refresh", {})).code == 400
    assert (await call(proxy, "POST", "/api/account/refresh", {"refresh": 7})).code == 400


async def test_logout_revokes_the_login_at_once(io_loop, make_proxy):
    proxy = await make_proxy()
    first = (await call(proxy, "POST", "/api/account/login",
                        {"username": "root", "password": ROOT_PASSWORD})).json
    other = await login(proxy)
    second = (await call(proxy, "POST", "/api/account/refresh",
                         {"refresh": first["refresh"]})).json["access"]
    answer = await call(proxy, "POST", "/api/account/logout", token=first["access"])
    assert answer.code == 200 and answer.json == {"status": "logged out"}
    for token in (first["access"], second):
        assert (await call(proxy, "GET", "/api/proxy/config", token=token)).code == 401
    answer = await call(proxy, "POST", "/api/account/refresh", {"refresh": first["refresh"]})
    assert answer.code == 401
    # Another login is untouched.
    assert (await call(proxy, "GET", "/api/proxy/config", token=other)).code == 200
    # Logging out needs a valid token; the refresh token alone will do.
    assert (await call(proxy, "POST", "/api/account/logout")).code == 401
    assert (await call(proxy, "POST", "/api/account/logout", token="junk")).code == 401
    third = (await call(proxy, "POST", "/api/account/login",
                        {"username": "root", "password": ROOT_PASSWORD})).json
    answer = await call(proxy, "POST", "/api/account/logout", {"refresh": third["refresh"]})
    assert answer.code == 200
    assert (await call(proxy, "GET", "/api/proxy/config", token=third["access"])).code == 401


async def test_tokens_survive_a_restart_and_expire(io_loop, make_proxy, tmp_path):
    db = str(tmp_path / "tokens.db")
    proxy = await make_proxy(db=db)
    token = await login(proxy)
    await proxy.stop()
    proxy = await make_proxy(db=db)
    assert (await call(proxy, "GET", "/api/proxy/config", token=token)).code == 200
    store.Token.update(expires_at=store.utcnow() - datetime.timedelta(seconds=1)).execute()
    answer = await call(proxy, "GET", "/api/proxy/config", token=token)
    assert (answer.code, answer.json) == (401, {"error": "authentication required"})


async def test_protected_endpoints_answer_401_json_without_a_valid_token(
        io_loop, make_node, make_proxy):
    node = await make_node()
    proxy = await make_proxy([node])
    for method, path, body in PROTECTED:
        for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": "Bearer junk"},
                        {"Authorization": "Basic cm9vdDp4"},
                        {"Authorization": "Bearer " + "x" * 5000},
                        {"Authorization": "Bearer \u00e9t\u00e9".encode().decode("latin-1")}):
            answer = await call(proxy, method, path, body, headers=headers)
            assert answer.code == 401, (method, path, headers, answer)
            assert answer.json == {"error": "authentication required"}
            assert answer.headers["WWW-Authenticate"] == "Bearer"
    # Nothing was changed, nothing reached the node.
    assert store.Node.select().count() == 1 and proxy.ctx.router.strategy == "cache_aware"
    assert not [r for r in node.requests if r.method in ("POST", "DELETE")]


async def test_an_invalid_token_is_ignored_on_public_endpoints(io_loop, make_node, make_proxy):
    proxy = await make_proxy([await make_node()])
    client = ollama.AsyncClient(host=proxy.url, headers={"Authorization": "Bearer junk"})
    assert (await client.generate(model="llama3", prompt="hi", stream=False)).done
    for path in ("/api/tags", "/api/health", "/api/proxy/state", "/api/proxy",
                 "/api/proxy/active-requests", "/v1/models"):
        answer = await call(proxy, "GET", path, token="junk")
        assert answer.code == 200, (path, answer)


async def test_root_gets_a_generated_password_logged_once(io_loop, make_proxy, tmp_path,
                                                          caplog):
    db = str(tmp_path / "generated.db")
    with caplog.at_level(logging.WARNING, logger="aivonx"):
        proxy = await make_proxy(db=db, root_password=None)
    match = re.search(r"generated password (\S+)", caplog.text)
    assert match, caplog.text
    password = match.group(1)
    assert len(password) >= 20 and password != "changeme"
    assert await login(proxy, "root", password)
    await proxy.stop()
    # A restart neither logs nor changes it, whatever the environment says.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="aivonx"):
        proxy = await make_proxy(db=db, root_password="another-password")
    assert "generated password" not in caplog.text
    assert await login(proxy, "root", password)


def test_root_password_comes_from_the_environment_only():
    from aivonx.settings import parse_settings
    assert parse_settings([], {"AIVONX_ROOT_PASSWORD": "from-env-1"}).root_password == "from-env-1"
    assert parse_settings([], {"ROOT_PASSWORD": "from-env-2"}).root_password == "from-env-2"
    assert parse_settings([], {}).root_password is None
    with pytest.raises(SystemExit):
        parse_settings(["--root-password", "x"], {})


async def run_passwd(*args: str, stdin: bytes) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, os.path.join(ROOT, "run.py"), "passwd", *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, cwd=ROOT)
    out, _ = await asyncio.wait_for(proc.communicate(stdin), 30)
    return proc.returncode, out.decode()


async def test_passwd_command_sets_a_password_and_revokes_tokens(io_loop, make_proxy, tmp_path):
    db = str(tmp_path / "passwd.db")
    proxy = await make_proxy(db=db)
    old = await login(proxy)
    code, out = await run_passwd("root", "--db", db, stdin=b"a-new-password\n")
    assert code == 0 and "password changed for root" in out
    assert (await call(proxy, "GET", "/api/proxy/config", token=old)).code == 401
    answer = await call(proxy, "POST", "/api/account/login",
                        {"username": "root", "password": ROOT_PASSWORD})
    assert answer.code == 401
    assert await login(proxy, "root", "a-new-password")
    code, out = await run_passwd("ops", "--db", db, stdin=b"ops-password\n")
    assert code == 0 and "created user ops" in out
    assert await login(proxy, "ops", "ops-password")
    code, out = await run_passwd("root", "--db", db, stdin=b"short\n")
    assert code == 1 and "at least 8 characters" in out


async def test_usernames_are_checked_whole(io_loop, make_proxy):
    proxy = await make_proxy()
    for name in ("root\n", "a b", "", "x" * 151):
        with pytest.raises(ValueError):
            await proxy.ctx.auth.set_password(name, "long-enough-password")
    answer = await call(proxy, "POST", "/api/account/login",
                        {"username": "root\n", "password": ROOT_PASSWORD})
    assert answer.code == 401
