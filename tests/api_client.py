"""A small JSON client for the management API tests."""
from __future__ import annotations

import json
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPResponse

from tests.conftest import ROOT_PASSWORD


class Answer:
    def __init__(self, response: HTTPResponse) -> None:
        self.response = response
        self.code = response.code
        self.headers = response.headers
        self.text = response.body.decode() if response.body else ""

    @property
    def json(self) -> Any:
        def no_constants(name: str) -> Any:
            raise ValueError(f"not strict JSON: {name}")
        return json.loads(self.text, parse_constant=no_constants)

    @property
    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.text.splitlines()]

    def __repr__(self) -> str:
        return f"<Answer {self.code} {self.text[:300]}>"


async def call(proxy: Any, method: str, path: str, body: Any = None, token: str | None = None,
               raw: bytes | None = None, headers: dict[str, str] | None = None) -> Answer:
    all_headers = dict(headers or {})
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    if data is not None:
        all_headers.setdefault("Content-Type", "application/json")
    if data is None and method in ("POST", "PUT", "PATCH"):
        data = b""
    response = await AsyncHTTPClient().fetch(
        proxy.url + path, method=method, body=data, headers=all_headers, raise_error=False,
        allow_nonstandard_methods=True, request_timeout=30, follow_redirects=False)
    return Answer(response)


async def login(proxy: Any, username: str = "root", password: str = ROOT_PASSWORD) -> str:
    answer = await call(proxy, "POST", "/api/account/login",
                        {"username": username, "password": password})
    assert answer.code == 200, answer
    return answer.json["access"]
