"""The durable truth for what admins configure: nodes, strategy, users,
tokens, keys; and the usage and audit records.

Routing never reads the database; the registry holds the live state. SQLite
runs in WAL mode with synchronous=NORMAL, where a small write costs well
under a millisecond, so the rare admin writes run inline on the event loop.
They wait at most a couple of milliseconds for the write lock (another
process holding it: `passwd`, a backup, a shell); past that the client gets
503 and retries, rather than the event loop and every stream on it stalling
for the seconds the lock may be held.
"""
from __future__ import annotations

import datetime
import json
import logging
import sqlite3
from typing import Any

import peewee
from playhouse.migrate import SqliteMigrator, migrate
from playhouse.sqlite_ext import AutoIncrementField


log = logging.getLogger("aivonx.store")

database = peewee.DatabaseProxy()

# How long a write waits for SQLite's write lock: on the event loop just
# enough for another process's sub-millisecond write; at start-up and in the
# command line, which block nothing else, a while.
SERVING_BUSY_TIMEOUT_MS = 2
PATIENT_BUSY_TIMEOUT_MS = 5000


class StoreError(Exception):
    """The database cannot be used at all (start-up): one line saying why."""


def unavailable(exc: BaseException) -> tuple[str, int] | None:
    """For a storage failure a client can wait out (the database locked by
    another process, the disk full): the message and Retry-After seconds to
    answer with 503. None for anything else."""
    if not isinstance(exc, (peewee.OperationalError, sqlite3.OperationalError)):
        return None
    text = str(exc).lower()
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


class Node(BaseModel):
    # AUTOINCREMENT: a deleted node's id is never handed to the next node,
    # so a script or a dashboard holding an old id cannot hit another node.
    id = AutoIncrementField()
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
    id = AutoIncrementField()
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
    id = AutoIncrementField()
    at = peewee.DateTimeField(default=utcnow, index=True)
    actor = peewee.CharField(max_length=200)
    address = peewee.CharField(max_length=100)
    action = peewee.CharField(max_length=300)
    status = peewee.IntegerField()
    detail = peewee.TextField(default="")

    class Meta:
        table_name = "audit"


MODELS = [Node, ProxyConfig, User, Token, ApiKey, Usage, AuditEntry]


def open_database(path: str,
                  busy_timeout_ms: int = SERVING_BUSY_TIMEOUT_MS) -> peewee.SqliteDatabase:
    """Open (creating if needed) the database, bind the models and migrate.
    StoreError when it cannot be opened or written (a read-only file
    system, a directory that does not exist)."""
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


def _add_missing_columns(db: peewee.SqliteDatabase) -> None:
    """Columns added to a model after a database was created are added here,
    so upgrading never needs a manual step (new columns carry a default)."""
    migrator = SqliteMigrator(db)
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
    ProxyConfig.insert(key=key, value=json.dumps(value)).on_conflict_replace().execute()


def save_models(node_id: int, models: list[str]) -> None:
    """Keep a node's model list for the next start; routing already has it,
    so a database that is busy or full costs only a warning."""
    try:
        Node.update(models_json=json.dumps(models)).where(Node.id == node_id).execute()
    except peewee.OperationalError as exc:
        log.warning("could not save the models of node %s: %s", node_id, exc)
