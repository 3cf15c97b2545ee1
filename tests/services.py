"""PostgreSQL and Redis servers of the tests' own: a private data directory
and a free port each, on 127.0.0.1, stopped at the end of the session.

The binaries come from Debian's packages (.ci/run installs them). Without
them the tests that need a server are skipped, except in CI (CI=true), where
a missing server fails them: there they must run.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

from tests.helpers import free_port

# PostgreSQL refuses to run as root: it runs as this unprivileged user
# (.ci/run creates it; the fixture does when it is missing).
SERVICE_USER = "aivonx-test"
PG_USER, PG_PASSWORD = "aivonx", "test-pg-password"


def missing(what: str) -> None:
    """Skip outside CI, fail in CI, where these tests must run."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} is not installed; .ci/run installs it", pytrace=False)
    pytest.skip(f"{what} is not installed")


def _wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout:g} s")


def _service_user() -> dict:
    """Popen arguments that drop root to SERVICE_USER, created when missing
    (none when not root)."""
    if os.geteuid() != 0:
        return {}
    try:
        entry = pwd.getpwnam(SERVICE_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                        SERVICE_USER], check=True)
        entry = pwd.getpwnam(SERVICE_USER)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _chown(path: str) -> None:
    if os.geteuid() == 0:
        entry = pwd.getpwnam(SERVICE_USER)
        os.chown(path, entry.pw_uid, entry.pw_gid)


def postgres_bin() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    if found:
        return os.path.dirname(found[-1])
    postgres = shutil.which("postgres")
    return os.path.dirname(postgres) if postgres else None


class PostgresServer:
    """`initdb` into a temporary directory, then `postgres` on a free port,
    with password (scram) authentication for PG_USER."""

    def __init__(self, bindir: str) -> None:
        self.bindir = bindir
        self.as_user = _service_user()  # creates the user when missing
        self.root = tempfile.mkdtemp(prefix="aivonx-pg-")
        os.chmod(self.root, 0o755)
        self.data = os.path.join(self.root, "data")
        self.sockets = os.path.join(self.root, "sock")
        os.mkdir(self.sockets)
        _chown(self.sockets)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self._databases = 0
        pwfile = os.path.join(self.root, "pw")
        with open(pwfile, "w") as f:
            f.write(PG_PASSWORD)
        _chown(pwfile)
        _chown(self.root)
        subprocess.run([os.path.join(bindir, "initdb"), "-D", self.data, "-U", PG_USER,
                        "--pwfile", pwfile, "--auth", "scram-sha-256", "-E", "UTF8",
                        "--no-sync"], check=True, stdout=subprocess.DEVNULL, cwd=self.root,
                       **self.as_user)
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [os.path.join(self.bindir, "postgres"), "-D", self.data,
             "-p", str(self.port), "-k", self.sockets, "-c", "listen_addresses=127.0.0.1",
             "-c", "fsync=off", "-c", "max_connections=200"],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.root, "log"), "ab"),
            cwd=self.root, **self.as_user)
        _wait_port(self.port, self.proc, "postgres")
        self._ready()

    def _ready(self, timeout: float = 30) -> None:
        import psycopg2
        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg2.connect(self.url("postgres")).close()
                return
            except psycopg2.OperationalError:  # "the database system is starting up"
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def url(self, database: str) -> str:
        return f"postgresql://{PG_USER}:{PG_PASSWORD}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database's URL."""
        import psycopg2
        self._databases += 1
        name = f"aivonx_test_{os.getpid()}_{self._databases}"
        conn = psycopg2.connect(self.url("postgres"))
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        conn.close()
        return self.url(name)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown: clients are cut off
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


class RedisServer:
    """`redis-server` on a free port, no persistence; stop() and start()
    again on the same port, as a Redis restart."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.root = tempfile.mkdtemp(prefix="aivonx-redis-")
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.root],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.port, self.proc, "redis-server")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def flush(self) -> None:
        import redis
        client = redis.Redis(host="127.0.0.1", port=self.port)
        client.flushall()
        client.close()

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
