"""The relay path: one client request streamed to a node and back.

exchange.py runs a request's attempts (failover before the first byte,
cancel, the idle watchdog); sink.py is everything the client receives;
leanclient.py is the HTTP/1.1 client relayed requests go out on (strict
framing, on IOStream); upstream.py holds the keep-alive pool, the chunk
framing and a per-request connection handle, and Tornado's client for the
other node requests (model operations, blobs); resolver.py resolves
node addresses inline and fences them in (--node-networks).
"""
from .exchange import Attempt, Exchange, IdleWatchdog, Relay, describe_failure
from .sink import ClientSink

__all__ = ["Attempt", "ClientSink", "Exchange", "IdleWatchdog", "Relay", "describe_failure"]
