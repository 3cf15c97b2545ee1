"""HTTPS nodes: verified against --node-ca-file, their connections reused."""
from __future__ import annotations

import shutil
import ssl
import subprocess

import ollama
import pytest

from aivonx.settings import parse_settings
from aivonx.relay.upstream import ConnectionHandle, UpstreamRequest
from tests.helpers import GEN, fetch_stream

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 and its key, as PEM files."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = str(folder / "node.pem"), str(folder / "node.key")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1", "-keyout", key, "-out", cert,
         "-addext", "subjectAltName=IP:127.0.0.1",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,digitalSignature,keyCertSign"],
        check=True, capture_output=True)
    return cert, key


@pytest.fixture
def make_tls_node(make_node, certificate):
    async def make(**kwargs):
        node = await make_node(**kwargs)
        await node.stop()
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*certificate)
        return await node.start(ssl_options=context)
    return make


async def test_requests_through_an_https_node_reuse_its_connection(
        io_loop, make_tls_node, make_proxy, certificate):
    node = await make_tls_node()
    assert node.url.startswith("https://")
    proxy = await make_proxy([node], health_interval=3600, node_ca_file=certificate[0])
    assert proxy.node(node).status == "active"
    client = ollama.AsyncClient(host=proxy.url)
    accepted = node.connections_accepted  # the start-up probes'
    for _ in range(5):
        assert (await client.generate(model="llama3", prompt="x", stream=False)).done
        parts = [p async for p in await client.generate(model="llama3", prompt="x",
                                                        stream=True)]
        assert parts[-1].done
    assert node.connections_accepted == accepted + 1  # ten requests, one connection
    assert len(proxy.ctx.relay.client.pool.idle[("https", "127.0.0.1", node.port)]) == 1


async def test_an_https_node_is_not_trusted_without_its_ca(io_loop, make_tls_node, make_proxy):
    node = await make_tls_node()
    proxy = await make_proxy([node], health_interval=3600)
    assert proxy.node(node).status != "active"
    response, _ = await fetch_stream(proxy.url + "/api/generate", GEN)
    assert response.code in (404, 503)  # no trusted node knows the model
    assert node.requests_to("/api/generate") == []


async def test_an_http_request_never_rides_a_kept_tls_connection(
        io_loop, make_tls_node, make_proxy, certificate):
    node = await make_tls_node()
    proxy = await make_proxy([node], health_interval=3600, node_ca_file=certificate[0])
    client = proxy.ctx.relay.client

    async def fetch(url: str) -> tuple[int, ConnectionHandle]:
        handle = ConnectionHandle()
        request = UpstreamRequest(url + "/api/version", handle, connect_timeout=5,
                                  request_timeout=5, headers={"Connection": "keep-alive"})
        try:
            return (await client.fetch(request, raise_error=False)).code, handle
        except OSError:  # reset: no HTTP answer at all
            return 599, handle

    code, _ = await fetch(node.url)
    assert code == 200
    code, handle = await fetch(node.url.replace("https://", "http://"))
    assert not handle.reused and code != 200  # plain HTTP to a TLS port: refused
    code, handle = await fetch(node.url)
    assert code == 200 and handle.reused


def test_the_ca_file_is_a_flag_and_an_environment_variable(certificate, tmp_path):
    assert parse_settings([], {}).node_ca_file is None
    assert parse_settings(["--node-ca-file", certificate[0]], {}).node_ca_file == certificate[0]
    env = {"AIVONX_NODE_CA_FILE": certificate[0]}
    assert parse_settings([], env).node_ca_file == certificate[0]
    not_pem = tmp_path / "x.pem"
    not_pem.write_text("not a certificate")
    with pytest.raises(SystemExit):
        parse_settings(["--node-ca-file", str(not_pem)], {})
