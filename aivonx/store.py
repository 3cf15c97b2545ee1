"""The durable truth for what admins configure: nodes, strategy, users, tokens.

Routing never reads the database; the registry holds the live state. SQLite
runs in WAL mode with synchronous=NORMAL, where a small write costs well
under a millisecond, so the rare admin writes run inline on the event loop.
"""
from __future__ import annotations

import datetime
import json
import logging
from typing import Any

import peewee
from playhouse.migrate import SqliteMigrator, migrate


log = logging.getLogger("aivonx.store")

database = peewee.DatabaseProxy()


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


class BaseModel(peewee.Model):
    class Meta:
        database = database


class Node(BaseModel):
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


MODELS = [Node, ProxyConfig, User, Token]


def open_database(path: str) -> peewee.SqliteDatabase:
    """Open (creating if needed) the database, bind the models and migrate."""
    db = peewee.SqliteDatabase(path, pragmas={
        "journal_mode": "wal",
        "synchronous": "normal",
        "foreign_keys": 1,
        "busy_timeout": 5000,
    })
    database.initialize(db)
    db.connect(reuse_if_open=True)
    with db.atomic():
        db.create_tables(MODELS, safe=True)
        _add_missing_columns(db)
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
    Node.update(models_json=json.dumps(models)).where(Node.id == node_id).execute()
