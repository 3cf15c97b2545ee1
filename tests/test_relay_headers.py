"""Which headers cross the proxy, each way."""
from __future__ import annotations

import json

import tornado.web
from tornado.httpclient import AsyncHTTPClient
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from tests.helpers import GEN


class _Tags(tornado.web.RequestHandler):
    def get(self) -> None:
        self.write({"models": [{"name": "llama3:latest", "model": "llama3:latest"}]})


class _Root(tornado.web.RequestHandler):
    def get(self) -> None:
        self.write("Ollama is running")


class _Generate(tornado.web.RequestHandler):
    """Answers like a node that sets headers it has no business setting."""

    def post(self) -> None:
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.set_header("Set-Cookie", "aivonx_flash=planted; Path=/")
        self.add_header("Set-Cookie", "aivonx_session=planted; Path=/")
        self.set_header("Strict-Transport-Security", "max-age=31536000")
        self.set_header("X-Trace", "a")
        self.add_header("X-Trace", "b")
        self.set_header("Connection", "X-Node-Hop")
        self.set_header("X-Node-Hop", "hop")
        self.finish(json.dumps({"model": "llama3", "response": "", "done": True}))


async def start_node() -> tuple[HTTPServer, int]:
    app = tornado.web.Application([(r"/", _Root), (r"/api/tags", _Tags),
                                   (r"/api/ps", _Tags), (r"/api/generate", _Generate)])
    sockets = bind_sockets(0, "127.0.0.1")
    server = HTTPServer(app)
    server.add_sockets(sockets)
    return server, sockets[0].getsockname()[1]


class _Node:
    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"


async def test_a_node_cannot_set_cookies_or_pin_the_proxys_origin(io_loop, make_proxy):
    server, port = await start_node()
    try:
        proxy = await make_proxy([_Node(port)])
        response = await AsyncHTTPClient().fetch(proxy.url + "/api/generate", method="POST",
                                                 body=json.dumps(GEN), raise_error=False)
        assert response.code == 200
        assert "Set-Cookie" not in response.headers
        assert "Strict-Transport-Security" not in response.headers
        # Headers the node named in its Connection header are hop-by-hop.
        assert "X-Node-Hop" not in response.headers
        # Every value of a repeated header reaches the client.
        assert response.headers.get_list("X-Trace") == ["a", "b"]
    finally:
        server.stop()


async def test_headers_named_in_connection_are_not_forwarded(io_loop, make_node, make_proxy):
    node = await make_node()
    proxy = await make_proxy([node])
    response = await AsyncHTTPClient().fetch(
        proxy.url + "/api/generate", method="POST", body=json.dumps({**GEN, "stream": False}),
        headers={"Connection": "keep-alive, X-Client-Secret", "X-Client-Secret": "s3cret",
                 "X-Kept": "yes"})
    assert response.code == 200
    seen = node.requests_to("/api/generate")[-1].headers
    assert "x-client-secret" not in seen
    assert seen.get("x-kept") == "yes"
