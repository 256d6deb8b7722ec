"""Broker accounts of the embedded broker, kept in a SQLite database (WAL) whose change log the broker polls.

Tables: ``users(username PRIMARY KEY, hash, role 'device' | 'service', changed_at)``, ``changes(seq, username)``
(one row per created, rotated or removed user) and ``meta``. Earlier versions kept a JSON file
(``{"users": {"<username>": {"hash": ..., "role": ...}}}``) rewritten whole on every change: O(N) per enrolment.
It is imported on first open (see :class:`CredentialsFile`).

The control plane writes it (:class:`EmbeddedBrokerAuth`), the amqtt plugin of the embedded broker reads it
(``controlplane.broker._amqtt_plugin``). :func:`acl_allows` is the topic rule both sides agree on.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, get_args

from agent.protocol import TOPIC_PREFIX, Channel, DeviceIdError, validate_device_id

from ._auth import check_device_username, reserved_reason
from ._errors import BrokerAuthError
from ._passwords import hash_password, verify_password

__all__ = ["CredentialsFile", "EmbeddedBrokerAuth", "Role", "UserEntry", "acl_allows", "database_path"]

Role = Literal["device", "service"]
_ROLES: Final = frozenset(get_args(Role))
# The first topic level everything of EdgeFleet lives under; the service account may do anything below it.
_ROOT: Final = TOPIC_PREFIX.split("/", 1)[0]
_DEVICE_PUBLISH: Final = (Channel.TELEMETRY, Channel.STATE, Channel.ACK)


@dataclass(frozen=True, slots=True)
class UserEntry:
    hash: str
    role: Role


def acl_allows(role: str, username: str, action: str, topic: str) -> bool:
    """The EdgeFleet topic rule.

    ``action`` is ``publish``, ``subscribe`` (``topic`` is then a filter) or ``receive``. A device (username ==
    device id) may publish only its own telemetry, state and ack, and subscribe to / receive only its own cmd,
    literally (no wildcards). The service account may do anything under ``edgefleet/``.
    """
    if role == "service":
        return topic.split("/", 1)[0] == _ROOT
    if role != "device":
        return False
    try:
        validate_device_id(username)
    except DeviceIdError:
        return False
    own = f"{TOPIC_PREFIX}/{username}/"
    if action == "publish":
        return topic in {own + channel for channel in _DEVICE_PUBLISH}
    if action in ("subscribe", "receive"):
        return topic == own + Channel.CMD
    return False


def _validate_username(username: str) -> str:
    # Usernames become topic levels (devices) and must never contain MQTT wildcards or separators.
    try:
        return validate_device_id(username)
    except DeviceIdError as exc:
        raise BrokerAuthError(f"invalid broker username {username!r}: {exc}") from None


_SCHEMA: Final = (
    (
        "CREATE TABLE IF NOT EXISTS users (username TEXT PRIMARY KEY, hash TEXT NOT NULL, role TEXT NOT NULL, "
        "changed_at REAL NOT NULL) WITHOUT ROWID"
    ),
    # One row per change of a user (created, rotated, removed): what the broker process polls.
    "CREATE TABLE IF NOT EXISTS changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, username TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)
# The change log keeps about this many rows; a reader further behind re-reads every user (still correct).
_KEEP_CHANGES: Final = 20_000


def database_path(path: str | os.PathLike[str]) -> Path:
    """Where the SQLite database of the credentials named ``path`` lives: ``creds.json`` -> ``creds.sqlite3``
    (a ``.sqlite3``/``.db`` path is the database itself)."""
    path = Path(path)
    if path.suffix in (".sqlite3", ".db"):
        return path
    if path.suffix == ".json":
        return path.with_suffix(".sqlite3")
    return path.with_name(path.name + ".sqlite3")


class CredentialsFile:
    """The broker accounts, in a SQLite database (WAL) next to ``path``.

    ``path`` keeps its historical name (``broker-credentials.json``): it is what the broker is started with. The
    database is :func:`database_path` of it; a JSON credentials file found there is imported on first open and
    renamed ``<name>.migrated``. Every change is one small transaction (no whole-file rewrite: enrolling the
    10,000th device costs what the first did) and appends the user's name to a change log, which the broker
    process polls (:meth:`changes_since`) to notice rotations and removals. Thread-safe; other processes (a
    second control plane, the broker) are serialised by SQLite's own locking.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = Path(path)
        self._db_path = database_path(self._path)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None

    @property
    def path(self) -> Path:
        return self._path

    @property
    def database(self) -> Path:
        return self._db_path

    def __repr__(self) -> str:
        return f"CredentialsFile({str(self._path)!r})"

    # -- reading ----------------------------------------------------------------------------------------------

    def load(self) -> dict[str, UserEntry]:
        """All users.

        Raises
        ------
        BrokerAuthError
            The database cannot be opened or read.
        """
        with self._transaction() as conn:
            return {name: self._entry(name, hashed, role)
                    for name, hashed, role in conn.execute("SELECT username, hash, role FROM users")}

    def get(self, username: str) -> UserEntry | None:
        with self._transaction() as conn:
            row = conn.execute("SELECT hash, role FROM users WHERE username = ?", (username,)).fetchone()
        return None if row is None else self._entry(username, row[0], row[1])

    def last_change(self) -> int:
        """The sequence number of the newest change (0: none)."""
        with self._transaction() as conn:
            return int(conn.execute("SELECT coalesce(max(seq), 0) FROM changes").fetchone()[0])

    def changes_since(self, seq: int) -> tuple[int, dict[str, UserEntry | None]] | None:
        """The users changed after change ``seq``, each with its current entry (None: removed), and the newest
        sequence number; None when the log no longer reaches back to ``seq`` (re-read everything then)."""
        with self._transaction() as conn:
            rows = conn.execute("SELECT seq, username FROM changes WHERE seq > ? ORDER BY seq", (seq,)).fetchall()
            if not rows:
                return seq, {}
            if rows[0][0] != seq + 1:
                return None
            names = sorted({name for _, name in rows})
            found: dict[str, UserEntry | None] = dict.fromkeys(names)
            for start in range(0, len(names), 500):  # SQLite's limit on bound parameters
                chunk = names[start:start + 500]
                marks = ",".join("?" * len(chunk))
                for name, hashed, role in conn.execute(
                    f"SELECT username, hash, role FROM users WHERE username IN ({marks})", chunk
                ):
                    found[name] = self._entry(name, hashed, role)
            return int(rows[-1][0]), found

    def snapshot(self) -> tuple[int, dict[str, UserEntry]]:
        """(newest change, all users), read consistently."""
        with self._transaction() as conn:
            seq = int(conn.execute("SELECT coalesce(max(seq), 0) FROM changes").fetchone()[0])
            users = {name: self._entry(name, hashed, role)
                     for name, hashed, role in conn.execute("SELECT username, hash, role FROM users")}
            return seq, users

    # -- writing ----------------------------------------------------------------------------------------------

    def ensure_user(self, username: str, password: str, role: Role) -> bool:
        """Create the user or update its password/role. Returns whether anything changed (an existing user with
        the same role whose hash already matches ``password`` is left alone)."""
        self._check(username, password, role)
        current = self.get(username)
        if current is not None and current.role == role and verify_password(password, current.hash):
            return False
        hashed = hash_password(password)  # outside the write transaction: PBKDF2 for short secrets is slow
        with self._transaction(write=True) as conn:
            self._put(conn, username, hashed, role)
        return True

    def add_user(self, username: str, password: str, role: Role, *,
                 replace_older_than: float | None = None) -> str | None:
        """Create the user only if it does not exist; never touches an existing one. Returns the new credential
        (its hash), or None when the name is taken.

        ``replace_older_than``: an existing user whose credential is older than this many seconds is replaced
        (the caller knows it is an orphan, e.g. no device of that name in the registry); a newer one, possibly
        an enrolment still in flight elsewhere, is still left alone.
        """
        self._check(username, password, role)
        hashed = hash_password(password)
        with self._transaction(write=True) as conn:
            row = conn.execute("SELECT changed_at FROM users WHERE username = ?", (username,)).fetchone()
            if row is not None and (replace_older_than is None or time.time() - row[0] < replace_older_than):
                return None
            self._put(conn, username, hashed, role)
        return hashed

    def replace_user(self, username: str, password: str, role: Role) -> bool:
        """Give an existing user a new password; returns False (and creates nothing) when there is no such user
        of that role."""
        self._check(username, password, role)
        hashed = hash_password(password)
        with self._transaction(write=True) as conn:
            row = conn.execute("SELECT role FROM users WHERE username = ?", (username,)).fetchone()
            if row is None or row[0] != role:
                return False
            self._put(conn, username, hashed, role)
        return True

    def remove_user(self, username: str, *, credential: str | None = None) -> bool:
        """Remove the user; returns whether it existed. With ``credential`` (a hash from :meth:`add_user` or
        :meth:`get`), only if that is still the user's credential."""
        with self._transaction(write=True) as conn:
            if credential is None:
                gone = conn.execute("DELETE FROM users WHERE username = ?", (username,)).rowcount
            else:
                gone = conn.execute("DELETE FROM users WHERE username = ? AND hash = ?",
                                    (username, credential)).rowcount
            if gone:
                self._log(conn, username)
            return bool(gone)

    # -- internals --------------------------------------------------------------------------------------------

    @staticmethod
    def _check(username: str, password: str, role: Role) -> None:
        _validate_username(username)
        if role not in _ROLES:
            raise ValueError(f"role must be one of {sorted(_ROLES)}, not {role!r}")
        if not password:
            raise BrokerAuthError(f"empty password for broker user {username!r}")

    def _entry(self, username: str, hashed: Any, role: Any) -> UserEntry:
        if role not in _ROLES or not isinstance(hashed, str):
            raise BrokerAuthError(f"malformed broker credentials in {self._db_path}: bad entry for {username!r}")
        return UserEntry(hash=hashed, role=role)

    def _put(self, conn: sqlite3.Connection, username: str, hashed: str, role: str) -> None:
        conn.execute(
            "INSERT INTO users (username, hash, role, changed_at) VALUES (?, ?, ?, ?) ON CONFLICT (username) "
            "DO UPDATE SET hash = excluded.hash, role = excluded.role, changed_at = excluded.changed_at",
            (username, hashed, role, time.time()),
        )
        self._log(conn, username)

    @staticmethod
    def _log(conn: sqlite3.Connection, username: str) -> None:
        seq = conn.execute("INSERT INTO changes (username) VALUES (?)", (username,)).lastrowid or 0
        if seq % 1000 == 0:
            conn.execute("DELETE FROM changes WHERE seq <= ?", (seq - _KEEP_CHANGES,))

    @contextlib.contextmanager
    def _transaction(self, *, write: bool = False) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                conn = self._connection()
                # IMMEDIATE: take the write lock up front, so two writers never deadlock upgrading read locks.
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            except (sqlite3.Error, OSError) as exc:
                raise BrokerAuthError(f"cannot open broker credentials {self._db_path}: {exc}") from exc
            try:
                yield conn
            except BaseException as exc:
                with contextlib.suppress(sqlite3.Error):
                    conn.rollback()
                if isinstance(exc, sqlite3.Error):
                    raise BrokerAuthError(f"broker credentials {self._db_path}: {exc}") from exc
                raise
            try:
                conn.commit()
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    conn.rollback()
                raise BrokerAuthError(f"cannot write broker credentials {self._db_path}: {exc}") from exc

    def _connection(self) -> sqlite3.Connection:
        if self._conn is not None:
            return self._conn
        self._db_path.parent.mkdir(parents=True, exist_ok=True)
        # Created 0600 before SQLite opens it; SQLite gives its -wal and -shm files the same mode.
        with contextlib.suppress(FileExistsError):
            os.close(os.open(self._db_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        conn = sqlite3.connect(self._db_path, timeout=30.0, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA busy_timeout=30000")
            conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a credential is on disk before the registry (synchronous=NORMAL) commits the device it belongs
            # to, so a power cut cannot leave an enrolled device without its broker account.
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA:
                conn.execute(statement)
            self._migrate_json(conn)
            conn.commit()
        except (sqlite3.Error, BrokerAuthError):
            conn.close()
            raise
        self._conn = conn
        return conn

    def _migrate_json(self, conn: sqlite3.Connection) -> None:
        """Import the JSON credentials file of earlier versions (once, inside the schema transaction)."""
        if self._path == self._db_path or not self._path.is_file():
            return
        if conn.execute("SELECT 1 FROM meta WHERE key = 'migrated_json'").fetchone() is None:
            try:
                users = self._parse(self._path.read_bytes())
            except OSError as exc:
                raise BrokerAuthError(f"cannot read broker credentials file {self._path}: {exc}") from exc
            for name, entry in users.items():
                exists = conn.execute("SELECT 1 FROM users WHERE username = ?", (name,)).fetchone()
                if exists is None:
                    self._put(conn, name, entry.hash, entry.role)
            conn.execute("INSERT INTO meta (key, value) VALUES ('migrated_json', ?)", (str(time.time()),))
        # The JSON file is no longer read: keep it only as the backup of what was imported.
        with contextlib.suppress(OSError):
            os.replace(self._path, self._path.with_name(self._path.name + ".migrated"))

    def _parse(self, raw: bytes) -> dict[str, UserEntry]:
        try:
            data = json.loads(raw)
            users = data["users"]
            if not isinstance(users, dict):
                raise TypeError("'users' is not an object")
            result: dict[str, UserEntry] = {}
            for username, entry in users.items():
                role = entry["role"]
                hashed = entry["hash"]
                if role not in _ROLES or not isinstance(hashed, str):
                    raise ValueError(f"bad entry for user {username!r}")
                _validate_username(username)
                result[username] = UserEntry(hash=hashed, role=role)
        except (ValueError, TypeError, KeyError, BrokerAuthError) as exc:
            raise BrokerAuthError(f"malformed broker credentials file {self._path}: {exc!r}") from exc
        return result

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class EmbeddedBrokerAuth:
    """:class:`~controlplane.broker.BrokerAuth` for the embedded (amqtt) broker, over a credentials file.

    The broker process picks changes up on the next connection and within about a second otherwise: a removed or
    rotated credential can no longer connect, its live connections are closed and its sessions dropped
    (subscriptions, queued messages), see ``controlplane.broker._embedded``.
    """

    def __init__(self, credentials: CredentialsFile | str | os.PathLike[str]) -> None:
        self._file = credentials if isinstance(credentials, CredentialsFile) else CredentialsFile(credentials)

    @property
    def credentials(self) -> CredentialsFile:
        return self._file

    def reserved(self, device_id: str) -> str | None:
        entry = self._file.get(device_id)
        if entry is not None and entry.role == "service":
            return f"device id '{device_id}' is reserved: it is the broker's service account"
        return reserved_reason(device_id)

    def ensure_device(self, device_id: str, password: str) -> None:
        validate_device_id(device_id)
        self._refuse_service_account(device_id, "turn into a device")
        check_device_username(device_id)
        self._file.ensure_user(device_id, password, "device")

    def add_device(self, device_id: str, password: str, *, replace_older_than: float | None = None) -> str | None:
        """Create the device's account only if there is none: an enrolment that races another, or repeats one,
        never changes an existing device's credentials. Returns the new credential (for :meth:`discard_device`),
        or None when the name is taken. ``replace_older_than``: see :meth:`CredentialsFile.add_user`."""
        validate_device_id(device_id)
        self._refuse_service_account(device_id, "turn into a device")
        check_device_username(device_id)
        return self._file.add_user(device_id, password, "device", replace_older_than=replace_older_than)

    def rotate_device(self, device_id: str, password: str) -> bool:
        """Give an existing device account a new password; False (nothing created) when it has none, e.g. the
        device was deleted meanwhile. Ends the old credential's sessions like :meth:`ensure_device`."""
        return self._file.replace_user(device_id, password, "device")

    def discard_device(self, device_id: str, credential: str) -> bool:
        """Remove the device's account only if ``credential`` (from :meth:`add_device`) is still its credential:
        undoing an enrolment that failed never removes someone else's account."""
        return self._file.remove_user(device_id, credential=credential)

    def ensure_service(self, username: str, password: str) -> None:
        """Create or update the control plane's service account (may do everything under ``edgefleet/``)."""
        self._file.ensure_user(username, password, "service")

    def remove_device(self, device_id: str) -> None:
        self._refuse_service_account(device_id, "remove as a device")
        self._file.remove_user(device_id)

    def close(self) -> None:
        self._file.close()

    def _refuse_service_account(self, username: str, what: str) -> None:
        entry = self._file.get(username)
        if entry is not None and entry.role == "service":
            raise BrokerAuthError(f"{username!r} is the broker's service account; refusing to {what}")
