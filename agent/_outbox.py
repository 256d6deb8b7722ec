"""On-disk outbox: every message is written here before it is published and removed on PUBACK.

Nothing is lost while the broker is down or the agent restarts. The outbox is bounded in bytes; when full, the
oldest messages are dropped first and the drops are counted (and reported in telemetry).

It is also the agent's gate to the wire: a telemetry or ack payload that breaks the wire contract
(`agent.protocol.check`: ranges, lengths, nesting, NUL characters, another device's id) is refused with a log
line and counted in `rejected`, so the agent never publishes what the control plane would have to dead-letter.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from agent import protocol as wire
from agent.logsetup import get_logger

__all__ = ["Outbox", "OutboxEntry"]

log = get_logger("edgefleet.agent.outbox")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool


class Outbox:
    """A bounded FIFO of unacknowledged MQTT messages in SQLite (WAL, synchronous=FULL).

    Also keeps the per-device telemetry sequence counter, so `seq` stays monotonic across restarts.
    """

    def __init__(self, path: Path, max_bytes: int = 16 * 1024 * 1024) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a message acknowledged to the caller survives power loss, not only a process crash.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._bytes = int(self._db.execute("SELECT COALESCE(SUM(LENGTH(payload)), 0) FROM outbox").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _meta(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def _set_meta(self, key: str, value: int) -> None:
        self._db.execute(
            "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def next_seq(self) -> int:
        """Reserve the next telemetry sequence number (durable before it is used)."""
        with self._lock:
            seq = self._meta("seq") + 1
            self._set_meta("seq", seq)
            return seq

    def put(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int:
        """Store a message; drops the oldest messages when the byte bound would be exceeded.

        Returns the message's id, or 0 when the payload breaks the wire contract (then it is logged, counted in
        `rejected` and not stored: it is never published).
        """
        problem = _contract_problem(topic, payload)
        if problem is not None:
            with self._lock:
                self._set_meta("rejected", self._meta("rejected") + 1)
            log.error("outbox.rejected", topic=topic, size=len(payload), error=problem)
            return 0
        size = len(payload)
        if size > self.max_bytes:
            raise ValueError(f"message of {size} bytes exceeds the outbox bound of {self.max_bytes} bytes")
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                dropped = 0
                while self._bytes + size > self.max_bytes:
                    row = self._db.execute(
                        "SELECT id, LENGTH(payload) FROM outbox ORDER BY id LIMIT 1"
                    ).fetchone()
                    self._db.execute("DELETE FROM outbox WHERE id = ?", (row[0],))
                    self._bytes -= int(row[1])
                    dropped += 1
                if dropped:
                    self._set_meta("dropped", self._meta("dropped") + dropped)
                cur = self._db.execute(
                    "INSERT INTO outbox(topic, payload, qos, retain) VALUES (?, ?, ?, ?)",
                    (topic, payload, qos, int(retain)),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._bytes += size
            assert cur.lastrowid is not None
            return cur.lastrowid

    def peek(self, limit: int, after_id: int = 0) -> list[OutboxEntry]:
        """The oldest pending messages with id > after_id."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, payload, qos, retain FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
                (after_id, limit),
            ).fetchall()
        return [OutboxEntry(r[0], r[1], bytes(r[2]), r[3], bool(r[4])) for r in rows]

    def remove(self, entry_id: int) -> None:
        """Forget a message once the broker acknowledged it."""
        with self._lock:
            row = self._db.execute(
                "DELETE FROM outbox WHERE id = ? RETURNING LENGTH(payload)", (entry_id,)
            ).fetchone()
            if row is not None:
                self._bytes -= int(row[0])

    def has(self, entry_id: int) -> bool:
        """Whether that message still waits for the broker's acknowledgement."""
        with self._lock:
            return self._db.execute("SELECT 1 FROM outbox WHERE id = ?", (entry_id,)).fetchone() is not None

    @property
    def pending(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    @property
    def pending_bytes(self) -> int:
        return self._bytes

    @property
    def dropped(self) -> int:
        with self._lock:
            return self._meta("dropped")

    @property
    def rejected(self) -> int:
        """Messages refused because they broke the wire contract (never stored, never published)."""
        with self._lock:
            return self._meta("rejected")


def _contract_problem(topic: str, payload: bytes) -> str | None:
    """Why a payload for an EdgeFleet device topic breaks the wire contract, or None. Other topics pass."""
    try:
        device_id, channel = wire.parse_topic(topic)
    except wire.ProtocolError:
        return None
    if channel not in wire.UPSTREAM_CHANNELS or (channel is wire.Channel.STATE and not payload):
        return None
    try:
        message = wire.check(payload, channel)
    except wire.ProtocolError as exc:
        return str(exc)
    if message.device_id != device_id:
        return f"device_id {message.device_id!r} in a message on {device_id!r}'s topic"
    return None
