"""Engine creation and schema migration (alembic, run at start-up)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, event
from sqlalchemy.engine import make_url
from sqlmodel import create_engine

from controlplane._private import private_file

__all__ = ["create_db_engine", "migrate"]

_MIGRATIONS = Path(__file__).parent / "migrations"


def create_db_engine(url: str) -> Engine:
    """An engine for SQLite (a file in WAL mode) or PostgreSQL (psycopg 3)."""
    parsed = make_url(url)
    kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            # 0600 before SQLite creates it: it holds token hashes, download tokens and telemetry. SQLite gives
            # its -wal and -shm files the database file's mode.
            database = Path(parsed.database)
            database.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            private_file(database)
            for suffix in ("-wal", "-shm"):
                if (sidecar := Path(f"{database}{suffix}")).exists():
                    private_file(sidecar)
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    else:
        kwargs.update(pool_size=10, max_overflow=10, pool_pre_ping=True)
    engine = create_engine(url, **kwargs)
    if parsed.get_backend_name() == "sqlite":

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")  # with WAL: durable at checkpoint, never corrupt
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

    return engine


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision."""
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
