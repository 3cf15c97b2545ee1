"""One Settings object built from command-line flags and the environment.

Flags win over environment variables, which win over the defaults; every
other module reads its configuration from here only.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import Mapping, Sequence

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    db: str = "./aivonx.db"
    nodes: list[str] = field(default_factory=list)
    health_interval: float = 10.0
    log_level: str = "info"
    # Upstream timeouts. There is no total deadline on a generation: a
    # connect timeout plus an idle (no byte received) timeout instead, long
    # enough for a cold model load, which sends nothing for minutes.
    connect_timeout: float = 5.0
    idle_timeout: float = 600.0
    probe_timeout: float = 3.0
    # Base64 images make request bodies of hundreds of megabytes; Ollama
    # itself sets no limit.
    max_body_size: int = 1024 * 1024 * 1024
    max_header_size: int = 64 * 1024
    # A client must send its request head within this many seconds (slow
    # senders would otherwise hold connections for ever); also how long an
    # idle keep-alive connection stays open.
    header_timeout: float = 30.0
    # The password user root gets at first start (environment only: a flag
    # would show in `ps`); None generates one and logs it once.
    root_password: str | None = None
    # When every node is full, requests wait in one FIFO queue this long at
    # most (Ollama's own queue holds 512 by default).
    max_queue: int = 512
    max_wait: float = 120.0
    # On SIGTERM/SIGINT, in-flight requests get this long to finish.
    shutdown_grace: float = 30.0


def _env(environ: Mapping[str, str], name: str) -> str | None:
    value = environ.get(name)
    return value if value not in (None, "") else None


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0-65535, got {text!r}")
    return value


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The serve command's flags; defaults come from AIVONX_* variables."""
    env = os.environ if environ is None else environ
    defaults = Settings()
    parser = argparse.ArgumentParser(
        prog="aivonx", description="Load-balancing reverse proxy for Ollama."
    )
    parser.add_argument("--host", default=_env(env, "AIVONX_HOST") or defaults.host,
                        help="address to listen on (AIVONX_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=_port,
                        default=_port(_env(env, "AIVONX_PORT") or str(defaults.port)),
                        help="port to listen on (AIVONX_PORT, default 8000)")
    parser.add_argument("--db", default=_env(env, "AIVONX_DB") or defaults.db,
                        help="SQLite database path (AIVONX_DB, default ./aivonx.db)")
    env_nodes = [n.strip() for n in (_env(env, "AIVONX_NODES") or "").split(",") if n.strip()]
    parser.add_argument("--node", dest="nodes", action="append", default=None,
                        metavar="URL",
                        help="an Ollama node, e.g. http://gpu1:11434; repeatable "
                             "(AIVONX_NODES, comma-separated)")
    parser.add_argument("--health-interval", type=_positive_float,
                        default=_positive_float(_env(env, "AIVONX_HEALTH_INTERVAL")
                                                or str(defaults.health_interval)),
                        help="seconds between node probes (AIVONX_HEALTH_INTERVAL, default 10)")
    parser.add_argument("--connect-timeout", type=_positive_float,
                        default=_positive_float(_env(env, "AIVONX_CONNECT_TIMEOUT")
                                                or str(defaults.connect_timeout)),
                        help="seconds to connect to a node (AIVONX_CONNECT_TIMEOUT, default 5)")
    parser.add_argument("--idle-timeout", type=_positive_float,
                        default=_positive_float(_env(env, "AIVONX_IDLE_TIMEOUT")
                                                or str(defaults.idle_timeout)),
                        help="seconds without a byte from a node before its request is given "
                             "up; there is no total deadline (AIVONX_IDLE_TIMEOUT, default 600)")
    parser.add_argument("--max-queue", type=int,
                        default=int(_env(env, "AIVONX_MAX_QUEUE") or defaults.max_queue),
                        help="requests that may wait for a free node slot (AIVONX_MAX_QUEUE, "
                             "default 512)")
    parser.add_argument("--max-wait", type=_positive_float,
                        default=_positive_float(_env(env, "AIVONX_MAX_WAIT")
                                                or str(defaults.max_wait)),
                        help="seconds a request may wait for a slot before a 503 "
                             "(AIVONX_MAX_WAIT, default 120)")
    parser.add_argument("--shutdown-grace", type=_positive_float,
                        default=_positive_float(_env(env, "AIVONX_SHUTDOWN_GRACE")
                                                or str(defaults.shutdown_grace)),
                        help="seconds in-flight requests get to finish on SIGTERM "
                             "(AIVONX_SHUTDOWN_GRACE, default 30)")
    parser.add_argument("--log-level", choices=LOG_LEVELS,
                        default=(_env(env, "AIVONX_LOG_LEVEL") or defaults.log_level).lower(),
                        help="log verbosity (AIVONX_LOG_LEVEL, default info)")
    root_password = _env(env, "AIVONX_ROOT_PASSWORD") or _env(env, "ROOT_PASSWORD")
    parser.set_defaults(env_nodes=env_nodes, root_password=root_password)
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    nodes = args.nodes if args.nodes is not None else args.env_nodes
    return Settings(host=args.host, port=args.port, db=args.db, nodes=list(nodes),
                    health_interval=args.health_interval, log_level=args.log_level,
                    connect_timeout=args.connect_timeout, idle_timeout=args.idle_timeout,
                    max_queue=args.max_queue, max_wait=args.max_wait,
                    shutdown_grace=args.shutdown_grace,
                    root_password=args.root_password)


def parse_settings(argv: Sequence[str] | None = None,
                   environ: Mapping[str, str] | None = None) -> Settings:
    return settings_from_args(build_parser(environ).parse_args(argv))
