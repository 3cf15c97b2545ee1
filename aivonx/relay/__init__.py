"""The relay path: one client request streamed to a node and back.

exchange.py runs a request's attempts (failover before the first byte,
cancel, the idle watchdog); sink.py is everything the client receives;
upstream.py is the HTTP client that talks to nodes (strict framing, a
keep-alive pool, a per-request connection handle); resolver.py resolves
node addresses inline and fences them in (--node-networks).
"""
from .exchange import Attempt, Exchange, IdleWatchdog, Relay, describe_failure
from .sink import ClientSink

__all__ = ["Attempt", "ClientSink", "Exchange", "IdleWatchdog", "Relay", "describe_failure"]
