"""Name resolution for upstream connections without a thread hop per request.

Tornado's default resolver sends every lookup, even of an IP literal, to
a thread pool through getaddrinfo: a few hundred microseconds and a GIL
hand-off on each relayed request. Nodes are usually given as IPs or a few
stable names, so literals are answered inline and names are cached briefly.
"""
from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from typing import Any

from tornado.netutil import DefaultLoopResolver, Resolver

CACHE_SECONDS = 30.0

Networks = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


class AddressNotAllowed(OSError):
    """A node's address lies outside --node-networks."""


def parse_networks(text: str) -> Networks:
    """'127.0.0.0/8, 10.1.0.0/16' as networks; ValueError names a bad one."""
    return tuple(ipaddress.ip_network(part.strip(), strict=False)
                 for part in text.split(",") if part.strip())


class CachingResolver(Resolver):
    """`allowed`, when not empty, fences nodes in: an address outside those
    networks is never connected to (what a name resolves to is checked)."""

    def initialize(self, allowed: Networks = ()) -> None:
        self.allowed = allowed
        self._inner = DefaultLoopResolver()
        self._cache: dict[tuple[str, int, int], tuple[float, list[tuple[int, Any]]]] = {}
        self._pending: dict[tuple[str, int, int], asyncio.Future] = {}

    async def resolve(self, host: str, port: int,
                      family: socket.AddressFamily = socket.AF_UNSPEC) -> list[tuple[int, Any]]:
        addresses = await self._resolve(host, port, family)
        if not self.allowed:
            return addresses
        inside = [a for a in addresses
                  if any(ipaddress.ip_address(a[1][0].split("%", 1)[0]) in network
                         for network in self.allowed)]
        if not inside:
            raise AddressNotAllowed(f"{host} is outside the allowed node networks "
                                    f"({', '.join(map(str, self.allowed))})")
        return inside

    async def _resolve(self, host: str, port: int,
                       family: socket.AddressFamily) -> list[tuple[int, Any]]:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return await self._resolve_name(host, port, family)
        if ip.version == 4 and family in (socket.AF_UNSPEC, socket.AF_INET):
            return [(socket.AF_INET, (host, port))]
        if ip.version == 6 and family in (socket.AF_UNSPEC, socket.AF_INET6):
            return [(socket.AF_INET6, (host, port, 0, 0))]
        return await self._inner.resolve(host, port, family)

    async def _resolve_name(self, host: str, port: int,
                            family: socket.AddressFamily) -> list[tuple[int, Any]]:
        key = (host, port, int(family))
        cached = self._cache.get(key)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        pending = self._pending.get(key)
        if pending is None:
            # One lookup per name at a time, shared by everyone asking.
            pending = asyncio.ensure_future(self._inner.resolve(host, port, family))
            self._pending[key] = pending
            pending.add_done_callback(lambda f: self._store(key, f))
        return await asyncio.shield(pending)

    def _store(self, key: tuple[str, int, int], future: asyncio.Future) -> None:
        del self._pending[key]
        if future.cancelled() or future.exception() is not None:
            return
        if len(self._cache) > 1024:
            self._cache.clear()
        self._cache[key] = (time.monotonic() + CACHE_SECONDS, future.result())

    def close(self) -> None:
        self._inner.close()
