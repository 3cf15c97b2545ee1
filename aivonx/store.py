"""The durable truth for what admins configure: nodes, strategy, users,
tokens, keys; and the usage and audit records.

Routing never reads the database; the registry holds the live state. SQLite
runs in WAL mode with synchronous=NORMAL, where a small write costs well
under a millisecond, so the rare admin writes run inline on the event loop.
They wait at most a couple of milliseconds for the write lock (another
process holding it: `passwd`, a backup, a shell); past that the client gets
503 and retries, rather than the event loop and every stream on it stalling
for the seconds the lock may be held.

PostgreSQL (a `postgresql://` URL, several instances sharing it) is a
network round trip away and may be unreachable, so its admin writes run in
a small thread pool (`run`), each in one transaction; a database that
cannot be reached answers 503, and serving goes on from the registry.
"""
from __future__ import annotations

import asyncio
import datetime
import json
import logging
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar
from urllib.parse import unquote, urlsplit

import peewee
from playhouse.migrate import SchemaMigrator, migrate
from playhouse.pool import MaxConnectionsExceeded, PooledPostgresqlDatabase


log = logging.getLogger("aivonx.store")

database = peewee.DatabaseProxy()

# How long a write waits for SQLite's write lock: on the event loop just
# enough for another process's sub-millisecond write; at start-up and in the
# command line, which block nothing else, a while.
SERVING_BUSY_TIMEOUT_MS = 2
PATIENT_BUSY_TIMEOUT_MS = 5000


class StoreError(Exception):
    """The database cannot be used at all (start-up): one line saying why."""


def is_postgres(db: str) -> bool:
    """Whether --db names a PostgreSQL database rather than a SQLite file."""
    return db.startswith(("postgresql://", "postgres://"))


def unavailable(exc: BaseException) -> tuple[str, int] | None:
    """For a storage failure a client can wait out (the database locked by
    another process, the disk full, PostgreSQL unreachable): the message and
    Retry-After seconds to answer with 503. None for anything else."""
    if isinstance(database.obj, peewee.PostgresqlDatabase) and isinstance(
            exc, (peewee.OperationalError, peewee.InterfaceError, MaxConnectionsExceeded)):
        return "the database is unavailable; nothing was changed, try again", 5
    if not isinstance(exc, (peewee.OperationalError, sqlite3.OperationalError)):
        return None
    text = str(exc).lower()
    if "cannot rollback" in text and exc.__context__ is not None:
        # SQLite ended the transaction itself (a full disk): say why it failed.
        return unavailable(exc.__context__)
    if "locked" in text or "busy" in text:
        return "database busy, try again", 1
    if "full" in text:
        return "database or disk is full; the change was not saved", 60
    return None


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


class BaseModel(peewee.Model):
    class Meta:
        database = database


class NeverReusedIdField(peewee.AutoField):
    """A deleted row's id is never handed to the next row: AUTOINCREMENT on
    SQLite; on PostgreSQL a SERIAL's sequence never goes back by itself."""

    def ddl(self, ctx: Any) -> Any:
        nodes = super().ddl(ctx)
        if isinstance(database.obj, peewee.SqliteDatabase):
            return peewee.NodeList((nodes, peewee.SQL("AUTOINCREMENT")))
        return nodes


class Node(BaseModel):
    # A script or a dashboard holding an old id cannot hit another node.
    id = NeverReusedIdField()
    name = peewee.CharField(max_length=100)
    address = peewee.CharField(max_length=300)
    port = peewee.IntegerField(default=11434)
    # The admin's switch: False means never routed (drained), whatever the
    # health monitor sees.
    active = peewee.BooleanField(default=True)
    created_at = peewee.DateTimeField(default=utcnow)
    # The last model list discovered by the monitor (JSON list of display
    # names), so that after a restart a node that is down still counts as
    # having its models: a request for them gets 503, not 404.
    models_json = peewee.TextField(default="[]")
    # Parallel requests the node takes before requests queue (Ollama's
    # default parallelism), and its relative capacity for unequal hardware.
    slots = peewee.IntegerField(default=4)
    weight = peewee.FloatField(default=1.0)

    class Meta:
        table_name = "node"
        indexes = ((("address", "port"), True),)

    @property
    def models(self) -> list[str]:
        try:
            value = json.loads(self.models_json or "[]")
        except ValueError:
            return []
        return [m for m in value if isinstance(m, str)] if isinstance(value, list) else []


class ProxyConfig(BaseModel):
    """Routing settings as key/value rows, so a new setting needs no migration."""
    key = peewee.CharField(max_length=64, primary_key=True)
    value = peewee.TextField()

    class Meta:
        table_name = "proxy_config"


class User(BaseModel):
    username = peewee.CharField(max_length=150, unique=True)
    password_hash = peewee.CharField(max_length=300)
    created_at = peewee.DateTimeField(default=utcnow)

    class Meta:
        table_name = "user"


class Token(BaseModel):
    """Issued tokens, stored by hash only, so that they survive a restart and
    a stolen database does not hand out sessions."""
    token_hash = peewee.CharField(max_length=64, unique=True)
    user = peewee.ForeignKeyField(User, backref="tokens", on_delete="CASCADE")
    kind = peewee.CharField(max_length=16)  # "access" | "refresh" | "session"
    family = peewee.CharField(max_length=64, index=True)
    expires_at = peewee.DateTimeField()
    revoked = peewee.BooleanField(default=False)
    created_at = peewee.DateTimeField(default=utcnow)

    class Meta:
        table_name = "token"


class ApiKey(BaseModel):
    """A long-lived key: "inference" keys for the Ollama/OpenAI/Anthropic
    APIs, "admin" keys for tools that manage the cluster (they may infer
    too). Only the SHA-256 of the key is stored; `prefix` identifies it."""
    id = NeverReusedIdField()
    name = peewee.CharField(max_length=100)
    kind = peewee.CharField(max_length=16, default="inference")
    key_hash = peewee.CharField(max_length=64, unique=True)
    prefix = peewee.CharField(max_length=16)
    user = peewee.ForeignKeyField(User, null=True, on_delete="SET NULL")  # who created it
    models_json = peewee.TextField(default="[]")  # names or globs; empty: every model
    rpm = peewee.IntegerField(null=True)
    max_concurrent = peewee.IntegerField(null=True)
    daily_tokens = peewee.BigIntegerField(null=True)
    monthly_tokens = peewee.BigIntegerField(null=True)
    priority = peewee.IntegerField(default=1)
    expires_at = peewee.DateTimeField(null=True)
    revoked_at = peewee.DateTimeField(null=True)
    created_at = peewee.DateTimeField(default=utcnow)
    last_used_at = peewee.DateTimeField(null=True)

    class Meta:
        table_name = "api_key"


class Usage(BaseModel):
    """Counters per key, model and UTC hour, added to in batches. Key id 0
    is the anonymous key (requests without a key under inference_auth
    "open")."""
    key_id = peewee.IntegerField()
    model = peewee.CharField(max_length=200)
    hour = peewee.DateTimeField()  # UTC, truncated to the hour
    requests = peewee.BigIntegerField(default=0)
    errors = peewee.BigIntegerField(default=0)
    prompt_tokens = peewee.BigIntegerField(default=0)
    completion_tokens = peewee.BigIntegerField(default=0)
    estimated = peewee.BigIntegerField(default=0)  # requests whose tokens were estimated
    node_ms = peewee.BigIntegerField(default=0)

    class Meta:
        table_name = "usage"
        indexes = ((("key_id", "model", "hour"), True), (("hour",), False))


class AuditEntry(BaseModel):
    """An admin change, or a failed login: who, from where, when, what."""
    id = NeverReusedIdField()
    at = peewee.DateTimeField(default=utcnow, index=True)
    actor = peewee.CharField(max_length=200)
    address = peewee.CharField(max_length=100)
    action = peewee.CharField(max_length=300)
    status = peewee.IntegerField()
    detail = peewee.TextField(default="")

    class Meta:
        table_name = "audit"


MODELS = [Node, ProxyConfig, User, Token, ApiKey, Usage, AuditEntry]

# PostgreSQL: the pool's size and the threads that use it. Admin writes are
# rare; a few threads keep one slow write from queueing the others.
POOL_CONNECTIONS = 8
DB_THREADS = 4
CONNECT_TIMEOUT = 3        # seconds (libpq's minimum is 2)
# Instances starting at once take this advisory lock around the migration,
# so only one creates or alters the tables at a time.
MIGRATION_LOCK = 0x41_69_76_6F_6E_78  # "Aivonx"

_executor: ThreadPoolExecutor | None = None  # set while PostgreSQL is open

T = TypeVar("T")


async def run(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) against the store: inline on SQLite (sub-millisecond, see
    above); on PostgreSQL in the store's threads, each call with a pooled
    connection of its own, so neither a round trip nor an unreachable server
    holds the event loop."""
    if _executor is None:
        return fn(*args)
    return await asyncio.get_running_loop().run_in_executor(_executor, _in_connection, fn, args)


def offloaded() -> bool:
    """Whether store calls run in threads (PostgreSQL) rather than inline."""
    return _executor is not None


def _in_connection(fn: Callable[..., T], args: tuple) -> T:
    with database.obj.connection_context():
        return fn(*args)


def release_connection() -> None:
    """Give the event loop thread's PostgreSQL connection back to the pool
    after a request (one the server dropped is discarded there, so the next
    request connects afresh). Nothing to do on SQLite."""
    if _executor is not None and not database.is_closed():
        database.close()


def open_database(path: str, busy_timeout_ms: int = SERVING_BUSY_TIMEOUT_MS) -> peewee.Database:
    """Open (creating if needed) the database, bind the models and migrate.
    StoreError when it cannot be opened or written (a read-only file
    system, a directory that does not exist, a server that refuses)."""
    global _executor
    if is_postgres(path):
        return _open_postgres(path)
    _executor = None
    db = peewee.SqliteDatabase(path, pragmas={
        "journal_mode": "wal",
        "synchronous": "normal",
        "foreign_keys": 1,
        "busy_timeout": busy_timeout_ms,
    })
    database.initialize(db)
    try:
        db.connect(reuse_if_open=True)
        db.execute_sql(f"PRAGMA busy_timeout = {max(busy_timeout_ms, PATIENT_BUSY_TIMEOUT_MS)}")
        with db.atomic():
            db.create_tables(MODELS, safe=True)
            _add_missing_columns(db)
            _never_reuse_node_ids(db)
        db.execute_sql(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    except (peewee.DatabaseError, sqlite3.Error, OSError) as exc:
        db.close()
        raise StoreError(f"cannot open the database {path}: {exc}") from None
    return db


def _open_postgres(url: str) -> peewee.Database:
    global _executor
    parts = urlsplit(url)
    name = unquote(parts.path.lstrip("/"))
    shown = f"postgresql://{parts.hostname or ''}{':%d' % parts.port if parts.port else ''}/{name}"
    db = PooledPostgresqlDatabase(
        name, user=unquote(parts.username or "") or None,
        password=unquote(parts.password or "") or None, host=parts.hostname or None,
        port=parts.port or None, max_connections=POOL_CONNECTIONS, stale_timeout=300,
        timeout=CONNECT_TIMEOUT, connect_timeout=CONNECT_TIMEOUT,
        application_name="aivonx")
    database.initialize(db)
    try:
        with db.connection_context(), db.atomic():
            db.execute_sql("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            db.create_tables(MODELS, safe=True)
            _add_missing_columns(db)
    except (peewee.DatabaseError, peewee.InterfaceError, ValueError) as exc:
        db.close_all()
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StoreError(f"cannot open the database {shown}: {reason}") from None
    _executor = ThreadPoolExecutor(DB_THREADS, thread_name_prefix="aivonx-db")
    log.info("using PostgreSQL at %s", shown)
    return db


def close_database(db: peewee.Database) -> None:
    """Close the database (every pooled connection on PostgreSQL)."""
    global _executor
    if isinstance(db, PooledPostgresqlDatabase):
        if database.obj is db and _executor is not None:
            _executor.shutdown(wait=True)
            _executor = None
        db.close_all()
    else:
        db.close()


def _add_missing_columns(db: peewee.Database) -> None:
    """Columns added to a model after a database was created are added here,
    so upgrading never needs a manual step (new columns carry a default)."""
    migrator = SchemaMigrator.from_database(db)
    operations = []
    for model in MODELS:
        table = model._meta.table_name
        existing = {c.name for c in db.get_columns(table)}
        for fld in model._meta.sorted_fields:
            if fld.column_name not in existing:
                operations.append(migrator.add_column(table, fld.column_name, fld))
                log.info("migrating: adding column %s.%s", table, fld.column_name)
    if operations:
        migrate(*operations)


def _never_reuse_node_ids(db: peewee.SqliteDatabase) -> None:
    """Rebuild a node table made before ids were AUTOINCREMENT, keeping its
    rows and their ids (SQLite cannot alter a primary key in place). Runs
    inside open_database's transaction: all or nothing."""
    row = db.execute_sql("SELECT sql FROM sqlite_master WHERE type = 'table' "
                         "AND name = 'node'").fetchone()
    if row is None or "AUTOINCREMENT" in row[0].upper():
        return
    log.info("migrating: node ids are never reused (AUTOINCREMENT)")
    columns = ", ".join(f'"{c.name}"' for c in db.get_columns("node"))
    db.execute_sql('ALTER TABLE "node" RENAME TO "node_before_autoincrement"')
    for index in db.get_indexes("node_before_autoincrement"):
        if not index.name.startswith("sqlite_autoindex"):
            db.execute_sql(f'DROP INDEX "{index.name}"')
    db.create_tables([Node])
    db.execute_sql(f'INSERT INTO "node" ({columns}) '
                   f'SELECT {columns} FROM "node_before_autoincrement"')
    db.execute_sql('DROP TABLE "node_before_autoincrement"')


def get_config(key: str, default: Any = None) -> Any:
    row = ProxyConfig.get_or_none(ProxyConfig.key == key)
    if row is None:
        return default
    try:
        return json.loads(row.value)
    except ValueError:
        return default


def set_config(key: str, value: Any) -> None:
    ProxyConfig.insert(key=key, value=json.dumps(value)).on_conflict(
        conflict_target=[ProxyConfig.key], preserve=[ProxyConfig.value]).execute()


_TIME_FORMATS = {  # (SQLite strftime, PostgreSQL to_char)
    "hour": ("%Y-%m-%dT%H:00:00Z", 'YYYY-MM-DD"T"HH24:00:00"Z"'),
    "day": ("%Y-%m-%d", "YYYY-MM-DD"),
    "month": ("%Y-%m", "YYYY-MM"),
}


def format_time(column: Any, unit: str) -> Any:
    """A timestamp column as text truncated to `unit` (hour, day, month),
    in the SQL of the engine in use."""
    sqlite_format, postgres_format = _TIME_FORMATS[unit]
    if isinstance(database.obj, peewee.PostgresqlDatabase):
        return peewee.fn.to_char(column, postgres_format).coerce(False)
    return peewee.fn.strftime(sqlite_format, column)


def set_configs(values: dict[str, Any]) -> None:
    """Several settings at once: all of them or none."""
    with database.atomic():
        for key, value in values.items():
            set_config(key, value)


def save_models(node_id: int, models: list[str]) -> None:
    """Keep a node's model list for the next start; routing already has it,
    so a database that is busy or full costs only a warning."""
    try:
        Node.update(models_json=json.dumps(models)).where(Node.id == node_id).execute()
    except (peewee.OperationalError, peewee.InterfaceError, MaxConnectionsExceeded) as exc:
        log.warning("could not save the models of node %s: %s", node_id, exc)
