"""Database access: engines, migrations (Alembic) and idempotent inserts."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from lesion_tasks.core.settings import Settings

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
# Our own Alembic version table, so the schema can share a database with Airflow's metadata.
VERSION_TABLE = "lesion_alembic_version"


def make_engine(url: str) -> Engine:
    """Engine for `url`; SQLite gets foreign keys, WAL and a busy timeout."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 60})

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # noqa: ANN001
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.close()

        return engine
    return sa.create_engine(url, pool_pre_ping=True)


def engine_for(settings: Settings) -> Engine:
    return make_engine(settings.db_url)


def _alembic_config(url: str, store_url: str | None = None):
    """Alembic's configuration; `store_url` (the configured store) is there for migrations that
    rewrite stored references (0006)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.set_main_option("version_table", VERSION_TABLE)
    cfg.attributes["store_url"] = store_url
    return cfg


def _target(settings_or_url: Settings | str):
    if isinstance(settings_or_url, str):
        return settings_or_url, _alembic_config(settings_or_url)
    return settings_or_url.db_url, _alembic_config(settings_or_url.db_url, settings_or_url.store_url)


def upgrade(settings_or_url: Settings | str, revision: str = "head") -> str:
    """Apply migrations up to `revision`; return the database's revision afterwards."""
    from alembic import command

    url, cfg = _target(settings_or_url)
    command.upgrade(cfg, revision)
    return current_revision(url)


def downgrade(settings_or_url: Settings | str, revision: str) -> str | None:
    """Step back to `revision` (an operator's rollback); return the database's revision afterwards."""
    from alembic import command

    url, cfg = _target(settings_or_url)
    command.downgrade(cfg, revision)
    return current_revision(url)


def current_revision(url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()
    finally:
        engine.dispose()


def _insert(conn: Connection, table: sa.Table):
    """The dialect's INSERT, which knows ON CONFLICT."""
    dialect = conn.dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:
        raise ValueError(f"database dialect {dialect!r}: expected postgresql or sqlite")
    return insert(table)


def insert_ignore(conn: Connection, table: sa.Table, rows: Sequence[dict[str, Any]], keys: Iterable[str]) -> None:
    """INSERT rows, skipping those that conflict on `keys` (idempotent re-runs)."""
    if rows:
        conn.execute(_insert(conn, table).on_conflict_do_nothing(index_elements=list(keys)), list(rows))


def upsert(conn: Connection, table: sa.Table, rows: Sequence[dict[str, Any]], keys: Iterable[str]) -> None:
    """INSERT rows, or UPDATE every other column where they conflict on `keys`."""
    if not rows:
        return
    keys = list(keys)
    stmt = _insert(conn, table)
    updates = {c.name: stmt.excluded[c.name] for c in table.columns if c.name not in keys}
    conn.execute(stmt.on_conflict_do_update(index_elements=keys, set_=updates), list(rows))


def take_turns(conn: Connection, name: str) -> None:
    """At the start of a transaction: wait for, then hold until it ends, the lock that writers named `name` take
    turns on, so that what this transaction reads is still true when it writes. SQLite: the database's write lock
    (BEGIN IMMEDIATE, before the first read); PostgreSQL: a transaction-scoped advisory lock keyed by `name`."""
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    else:
        key = int.from_bytes(hashlib.sha256(f"lesion:{name}".encode()).digest()[:8], "big", signed=True)
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(key)))


def analyze(engine: Engine, tables: Iterable[str]) -> None:
    """Refresh PostgreSQL's planner statistics after a bulk load (a nightly run adds thousands of
    rows; without fresh statistics the review queue's joins were seen to take 2.3 s instead of 0.08 s).
    SQLite plans well without; a role that may not ANALYZE only gets a warning."""
    if engine.dialect.name != "postgresql":
        return
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("ANALYZE " + ", ".join(tables)))
    except sa.exc.DBAPIError as exc:
        log.warning("ANALYZE %s skipped: %s", ", ".join(tables), exc.orig)
