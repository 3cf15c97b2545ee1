"""One Settings object built from command-line flags and the environment.

Flags win over environment variables, which win over the defaults; every
other module reads its configuration from here only.
"""
from __future__ import annotations

import argparse
import os
import ssl
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from .relay.resolver import Networks, parse_networks

from .logs import LOG_FORMATS
from .startup import ollama_host

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    db: str = "./aivonx.db"
    nodes: list[str] = field(default_factory=list)
    health_interval: float = 10.0
    log_level: str = "info"
    log_format: str = "text"  # or "json": one object a line (aivonx.logs)
    # Upstream timeouts. There is no total deadline on a generation: a
    # connect timeout plus an idle (no byte received) timeout instead, long
    # enough for a cold model load, which sends nothing for minutes.
    connect_timeout: float = 5.0
    idle_timeout: float = 600.0
    probe_timeout: float = 3.0
    # Base64 images make request bodies of hundreds of megabytes; Ollama
    # itself sets no limit.
    max_body_size: int = 1024 * 1024 * 1024
    # Request bodies held in memory at once, over all requests; past it a
    # request is answered 503 with Retry-After instead of risking the process.
    max_body_in_flight: int = 1024 * 1024 * 1024
    # A client sending a request body may pause this long between two reads
    # (a slow sender must not hold a connection for the idle timeout).
    body_timeout: float = 60.0
    # Client connections open at once; past it Aivonx stops accepting until
    # one closes. Also bounded by the process's file descriptor limit.
    max_connections: int = 4096
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
    # A PEM bundle HTTPS nodes are verified against, instead of the
    # system's trust store (e.g. a private CA or a self-signed node).
    node_ca_file: str | None = None
    # When not empty, nodes are only ever connected to at addresses within
    # these networks (names are resolved, then checked): a fence for what
    # the proxy may reach, whatever an admin account is made to add.
    node_networks: Networks = ()
    # A file of AIVONX_*=value lines, read at start and again on SIGHUP.
    env_file: str | None = None
    # Processes serving the port (SO_REUSEPORT, aivonx.workers); each takes
    # an equal share of every node's slots.
    workers: int = 1
    # Which of them this process is (0-based), and the descriptor of the
    # supervisor's database lock it inherited; set for workers only.
    worker_index: int = 0
    worker_lock_fd: int | None = None
    # Served when the store has no node and none is given (the command line
    # sets it from OLLAMA_HOST; None in code that builds Settings itself).
    local_node: str | None = None
    # A redis:// URL: node slots counted and admin changes told across every
    # instance using it (aivonx.cluster). None: this instance alone.
    redis: str | None = None
    # How this instance is named to the others; None: host name and pid.
    instance_name: str | None = None


# What SIGHUP applies to a running process; anything else needs a restart.
RELOADABLE = ("log_level", "log_format")


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


def _log_level(text: str) -> str:
    if text.lower() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(LOG_LEVELS)}, got {text!r}")
    return text.lower()


def _log_format(text: str) -> str:
    if text.lower() not in LOG_FORMATS:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(LOG_FORMATS)}, got {text!r}")
    return text.lower()


def _ca_file(path: str) -> str:
    """A PEM bundle that loads as trusted certificates (read once at start)."""
    try:
        ssl.create_default_context(cafile=path)
    except (OSError, ssl.SSLError) as exc:
        raise argparse.ArgumentTypeError(f"cannot load CA bundle {path!r}: {exc}") from None
    return path


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


# Flags that map one-to-one onto a Settings field:
# (flag, environment variable, parse, help; the default is the field's).
_SIMPLE_FLAGS = [
    ("--host", "AIVONX_HOST", str, "address to listen on"),
    ("--port", "AIVONX_PORT", _port, "port to listen on"),
    ("--db", "AIVONX_DB", str, "SQLite database path, or postgresql://user:password@host:port/name "
     "for several instances sharing one configuration"),
    ("--health-interval", "AIVONX_HEALTH_INTERVAL", _positive_float,
     "seconds between node probes"),
    ("--connect-timeout", "AIVONX_CONNECT_TIMEOUT", _positive_float,
     "seconds to connect to a node"),
    ("--idle-timeout", "AIVONX_IDLE_TIMEOUT", _positive_float,
     "seconds without a byte from a node before its request is given up; "
     "there is no total deadline"),
    ("--max-queue", "AIVONX_MAX_QUEUE", _positive_int,
     "requests that may wait for a free node slot"),
    ("--max-wait", "AIVONX_MAX_WAIT", _positive_float,
     "seconds a request may wait for a slot before a 503"),
    ("--shutdown-grace", "AIVONX_SHUTDOWN_GRACE", _positive_float,
     "seconds in-flight requests get to finish on SIGTERM"),
    ("--max-body-size", "AIVONX_MAX_BODY_SIZE", _positive_int,
     "bytes: the largest request body accepted"),
    ("--max-body-in-flight", "AIVONX_MAX_BODY_IN_FLIGHT", _positive_int,
     "bytes of request bodies held in memory at once before requests get 503"),
    ("--body-timeout", "AIVONX_BODY_TIMEOUT", _positive_float,
     "seconds a client may pause while sending a request body"),
    ("--max-connections", "AIVONX_MAX_CONNECTIONS", _positive_int,
     "client connections open at once"),
    ("--workers", "AIVONX_WORKERS", _positive_int,
     "processes serving the port (SO_REUSEPORT), each with an equal share of every "
     "node's slots"),
]


def _redis_url(text: str) -> str:
    if not text.startswith(("redis://", "rediss://", "unix://")):
        raise argparse.ArgumentTypeError(f"must be a redis:// URL, got {text[:100]!r}")
    return text


def _networks(text: str) -> Networks:
    try:
        return parse_networks(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The serve command's flags; defaults come from AIVONX_* variables."""
    env = os.environ if environ is None else environ
    defaults = Settings()
    parser = argparse.ArgumentParser(
        prog="aivonx", description="Load-balancing reverse proxy for Ollama."
    )
    for flag, variable, parse, help_text in _SIMPLE_FLAGS:
        field = flag[2:].replace("-", "_")
        default = getattr(defaults, field)
        shown = f"{default:g}" if isinstance(default, float) else default
        parser.add_argument(flag, dest=field, type=parse,
                            default=parse(_env(env, variable) or str(default)),
                            help=f"{help_text} ({variable}, default {shown})")
    env_nodes = [n.strip() for n in (_env(env, "AIVONX_NODES") or "").split(",") if n.strip()]
    parser.add_argument("--node", dest="nodes", action="append", default=None,
                        metavar="URL",
                        help="an Ollama node, e.g. http://gpu1:11434; repeatable "
                             "(AIVONX_NODES, comma-separated)")
    # A string default goes through type=, which checks AIVONX_LOG_LEVEL too.
    parser.add_argument("--log-level", choices=LOG_LEVELS, type=_log_level,
                        default=_env(env, "AIVONX_LOG_LEVEL") or defaults.log_level,
                        help="log verbosity (AIVONX_LOG_LEVEL, default info)")
    parser.add_argument("--log-format", choices=LOG_FORMATS, type=_log_format,
                        default=_env(env, "AIVONX_LOG_FORMAT") or defaults.log_format,
                        help="text, or json: one object a line (AIVONX_LOG_FORMAT, "
                             "default text)")
    parser.add_argument("--env-file", default=_env(env, "AIVONX_ENV_FILE"), metavar="PATH",
                        help="KEY=value lines (a systemd EnvironmentFile) that win over the "
                             "environment; re-read on SIGHUP (AIVONX_ENV_FILE)")
    parser.add_argument("--node-ca-file", type=_ca_file, metavar="PEM",
                        default=_env(env, "AIVONX_NODE_CA_FILE"),
                        help="CA bundle that HTTPS nodes are verified against instead of the "
                             "system's (AIVONX_NODE_CA_FILE, default the system's)")
    parser.add_argument("--node-networks", type=_networks, metavar="CIDR,...",
                        default=_networks(_env(env, "AIVONX_NODE_NETWORKS") or ""),
                        help="only connect to nodes at addresses in these networks, e.g. "
                             "10.0.0.0/8,127.0.0.1/32 (AIVONX_NODE_NETWORKS, default any)")
    parser.add_argument("--redis", type=_redis_url, metavar="URL",
                        default=_env(env, "AIVONX_REDIS"),
                        help="redis://host:port/N shared by several instances: node slots "
                             "counted and admin changes told cluster-wide (AIVONX_REDIS, "
                             "default none)")
    parser.add_argument("--instance-name", metavar="NAME",
                        default=_env(env, "AIVONX_INSTANCE_NAME"),
                        help="this instance's name in the cluster (AIVONX_INSTANCE_NAME, "
                             "default host name and process id)")
    root_password = _env(env, "AIVONX_ROOT_PASSWORD") or _env(env, "ROOT_PASSWORD")
    parser.set_defaults(env_nodes=env_nodes, root_password=root_password)
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    nodes = args.nodes if args.nodes is not None else args.env_nodes
    simple = {flag[2:].replace("-", "_") for flag, *_ in _SIMPLE_FLAGS}
    return Settings(nodes=list(nodes), log_level=args.log_level, log_format=args.log_format,
                    root_password=args.root_password, env_file=args.env_file,
                    node_ca_file=args.node_ca_file, node_networks=args.node_networks,
                    redis=args.redis, instance_name=args.instance_name,
                    **{name: getattr(args, name) for name in simple})


def read_env_file(path: str) -> dict[str, str]:
    """KEY=value lines as systemd's EnvironmentFile= reads them: blank lines
    and lines starting with # or ; skipped, optional `export `, one level of
    matching quotes removed."""
    values = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line[0] in "#;" or "=" not in line:
                continue
            key, _, value = line.partition("=")
            key = key.strip().removeprefix("export ").strip()
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            values[key] = value
    return values


def parse_settings(argv: Sequence[str] | None = None,
                   environ: Mapping[str, str] | None = None) -> Settings:
    """Flags, then the --env-file (the admin's latest word: on SIGHUP it is
    newer than the process environment), then the environment."""
    environ = os.environ if environ is None else environ
    first = build_parser(environ).parse_args(argv)
    if first.env_file:
        try:
            environ = {**environ, **read_env_file(first.env_file)}
        except (OSError, UnicodeDecodeError) as exc:
            build_parser(environ).error(f"--env-file: {exc}")
    settings = settings_from_args(build_parser(environ).parse_args(argv))
    settings.local_node = ollama_host(environ)
    return settings
