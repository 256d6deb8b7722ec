"""Ingest counters, kept in the database so every worker adds to the same figures and they survive restarts."""

from __future__ import annotations

from collections import Counter

from sqlalchemy import Connection, Engine, select
from sqlalchemy.dialects import postgresql, sqlite

from controlplane.db import IngestCounter

__all__ = ["DEAD_LETTER_PREFIX", "add_counts", "read_stats"]

DEAD_LETTER_PREFIX = "dead_letter:"
_TABLE = IngestCounter.__table__  # type: ignore[attr-defined]


def add_counts(conn: Connection, counts: Counter[str]) -> None:
    """Increment counters inside the caller's transaction."""
    if not counts:
        return
    insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    stmt = insert(_TABLE)
    stmt = stmt.on_conflict_do_update(
        index_elements=[_TABLE.c.name], set_={"count": _TABLE.c.count + stmt.excluded.count}
    )
    # Sorted: concurrent workers take row locks in the same order and cannot deadlock.
    conn.execute(stmt, [{"name": name, "count": n} for name, n in sorted(counts.items()) if n])


def read_stats(engine: Engine) -> dict[str, object]:
    """`{"received", "stored", "duplicates", "dead_letters": {reason: count}, "states", "acks"}`.

    Every received message is exactly one of: stored, duplicate, dead letter, state update or command ack.
    """
    with engine.connect() as conn:
        rows = conn.execute(select(_TABLE.c.name, _TABLE.c.count)).all()
    counts = {name: int(n) for name, n in rows}
    return {
        "received": counts.get("received", 0),
        "stored": counts.get("stored", 0),
        "duplicates": counts.get("duplicates", 0),
        "dead_letters": {
            name[len(DEAD_LETTER_PREFIX) :]: n for name, n in sorted(counts.items()) if name.startswith(DEAD_LETTER_PREFIX)
        },
        "states": counts.get("states", 0),
        "acks": counts.get("acks", 0),
    }
