"""Node addresses: how admins write them and the base URL the relay uses.

A node is stored as an address (a host name, an IP, or an http(s) URL
without port) plus a port, the shape the older management API used.
"""
from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

DEFAULT_PORT = 11434
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})"
                       r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62}))*\.?$")


class InvalidAddress(ValueError):
    pass


def _check_host(host: str) -> str:
    if not host:
        raise InvalidAddress("address has no host")
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        pass
    if not _HOSTNAME.match(host):
        raise InvalidAddress(f"{host!r} is not a valid host name or IP address")
    return host.lower()


def split_address(text: str) -> tuple[str, int | None]:
    """Split 'host', 'host:port' or 'http(s)://host[:port]' into a stored
    address and the port it names, if any. The scheme is kept only for https,
    so 'http://gpu1' and 'gpu1' are the same node."""
    text = (text or "").strip()
    if not text:
        raise InvalidAddress("address is required")
    if len(text) > 300:
        raise InvalidAddress("address is too long")
    has_scheme = "://" in text
    try:
        parts = urlsplit(text if has_scheme else "http://" + text)
    except ValueError as exc:  # e.g. an unclosed IPv6 bracket
        raise InvalidAddress(f"invalid address: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise InvalidAddress("address scheme must be http or https")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise InvalidAddress("address must be a host, an IP or an http(s) URL without a path")
    try:
        port = parts.port
    except ValueError as exc:
        raise InvalidAddress(f"invalid port in address: {exc}") from None
    host = _check_host(parts.hostname or "")
    if ":" in host:
        host = f"[{host}]"
    address = f"https://{host}" if parts.scheme == "https" else host
    return address, port


def parse_node_url(text: str) -> tuple[str, int]:
    """A --node URL as (address, port), port defaulting to Ollama's 11434."""
    address, port = split_address(text)
    return address, port if port is not None else DEFAULT_PORT


def base_url(address: str, port: int) -> str:
    """The URL requests to this node are sent to, e.g. http://gpu1:11434."""
    if address.startswith("https://"):
        return f"{address}:{port}"
    return f"http://{address}:{port}"


def default_name(address: str, port: int) -> str:
    """The name a node gets when the admin gives none: host and port."""
    return f"{address.split('://')[-1]}:{port}"
