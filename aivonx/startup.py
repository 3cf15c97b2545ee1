"""Start-up decisions that need the environment or the stored nodes: the
local Ollama to serve when no node is configured, and listening on one of
our own nodes (a request loop)."""
from __future__ import annotations

import ipaddress
import socket
from typing import Iterable, Mapping

OLLAMA_PORT = "11434"
_WILDCARDS = {"", "0.0.0.0", "::"}


class StartupError(Exception):
    """Aivonx must not start; the message says why, in one line."""


def ollama_host(environ: Mapping[str, str]) -> str:
    """The URL Ollama's own clients connect to, from OLLAMA_HOST as Ollama
    reads it: scheme optional (http), host 127.0.0.1, port 11434 without a
    scheme, 80/443 with one, a path ignored. A wildcard bind address
    (0.0.0.0, ::, empty host) is reached on 127.0.0.1."""
    text = (environ.get("OLLAMA_HOST") or "").strip().strip("\"'").strip()
    scheme, sep, hostport = text.partition("://")
    default_port = OLLAMA_PORT
    if not sep:
        scheme, hostport = "http", text
        if text == "ollama.com":
            scheme, hostport = "https", "ollama.com:443"
    elif scheme == "http":
        default_port = "80"
    elif scheme == "https":
        default_port = "443"
    hostport = hostport.partition("/")[0]
    host, port = _split_host_port(hostport)
    if port is None:
        host, port = "127.0.0.1", default_port
        bare = hostport.strip("[]")
        if _is_ip(bare):
            host = str(ipaddress.ip_address(bare))
        elif hostport:
            host = hostport
    if not port.isdigit() or int(port) > 65535:
        port = default_port
    if host in _WILDCARDS:
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


def _split_host_port(text: str) -> tuple[str, str | None]:
    """Go's net.SplitHostPort: 'host:port' or '[v6]:port'; (text, None) when
    it has no port."""
    if text.startswith("["):
        close = text.find("]")
        if close > 0 and text[close + 1:close + 2] == ":" and "]" not in text[close + 1:]:
            return text[1:close], text[close + 2:]
        return text, None
    host, sep, port = text.rpartition(":")
    if not sep or ":" in host:
        return text, None
    return host, port


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _local_names() -> set[str]:
    name = socket.gethostname().lower()
    return {name, name.split(".")[0]}


def same_endpoint(listen_host: str, listen_port: int, node_host: str, node_port: int) -> bool:
    """Whether requests to the node would reach this very listener. Decided
    from the names alone (no DNS lookup at start): the same port, and the
    same host, both loopback, or a wildcard listener and a local host."""
    if listen_port == 0 or listen_port != node_port:
        return False
    listen = listen_host.strip("[]").lower()
    node = node_host.split("://")[-1].strip("[]").lower()
    if listen in _WILDCARDS:
        return node in _WILDCARDS or _is_loopback(node) or node in _local_names()
    if _is_loopback(listen) and _is_loopback(node):
        return True
    if _is_ip(listen) and _is_ip(node):
        return ipaddress.ip_address(listen) == ipaddress.ip_address(node)
    return listen == node


def check_no_loop(listen_host: str, listen_port: int,
                  nodes: Iterable[tuple[str, str, int]]) -> None:
    """Raise StartupError when a node (name, address, port) is this very
    listener: every request would come back to Aivonx until it ran out of
    connections."""
    for name, address, port in nodes:
        if same_endpoint(listen_host, listen_port, address, port):
            raise StartupError(
                f"refusing to listen on {listen_host}:{listen_port}: node {name} "
                f"({address}:{port}) is this same address, every request would loop back; "
                "use another --port or remove the node")
