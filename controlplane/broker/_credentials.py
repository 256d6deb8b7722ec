"""Broker accounts of the embedded broker, kept in a JSON file the broker process reloads when it changes.

The file (written atomically: temp file + ``os.replace``)::

    {"users": {"<username>": {"hash": "$pbkdf2-sha512$...", "role": "device" | "service"}}}

The control plane writes it (:class:`EmbeddedBrokerAuth`), the amqtt plugin of the embedded broker reads it
(``controlplane.broker._amqtt_plugin``). :func:`acl_allows` is the topic rule both sides agree on.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, get_args

from agent.protocol import TOPIC_PREFIX, Channel, DeviceIdError, validate_device_id

from ._auth import check_device_username, reserved_reason
from ._errors import BrokerAuthError
from ._passwords import hash_password, verify_password

try:  # POSIX: serialise writers across processes too
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["CredentialsFile", "EmbeddedBrokerAuth", "Role", "UserEntry", "acl_allows"]

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


class CredentialsFile:
    """Read-modify-write access to the credentials file. Thread-safe; writers in other processes are
    serialised with ``flock`` on ``<file>.lock`` (POSIX)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = Path(path)
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        return self._path

    def __repr__(self) -> str:
        return f"CredentialsFile({str(self._path)!r})"

    def load(self) -> dict[str, UserEntry]:
        """All users; an absent file has none.

        Raises
        ------
        BrokerAuthError
            The file cannot be read or is malformed.
        """
        try:
            raw = self._path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise BrokerAuthError(f"cannot read broker credentials file {self._path}: {exc}") from exc
        return self._parse(raw)

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
                result[username] = UserEntry(hash=hashed, role=role)
        except (ValueError, TypeError, KeyError) as exc:
            raise BrokerAuthError(f"malformed broker credentials file {self._path}: {exc!r}") from exc
        return result

    def ensure_user(self, username: str, password: str, role: Role) -> bool:
        """Create the user or update its password/role. Returns whether the file changed (an existing user with
        the same role whose hash already matches ``password`` is left alone)."""
        _validate_username(username)
        if role not in _ROLES:
            raise ValueError(f"role must be one of {sorted(_ROLES)}, not {role!r}")
        if not password:
            raise BrokerAuthError(f"empty password for broker user {username!r}")
        with self._locked():
            users = self.load()
            current = users.get(username)
            if current is not None and current.role == role and verify_password(password, current.hash):
                return False
            users[username] = UserEntry(hash=hash_password(password), role=role)
            self._write(users)
            return True

    def remove_user(self, username: str) -> bool:
        """Remove the user; returns whether it existed."""
        with self._locked():
            users = self.load()
            if users.pop(username, None) is None:
                return False
            self._write(users)
            return True

    def get(self, username: str) -> UserEntry | None:
        return self.load().get(username)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # A thread lock for this process, then flock for other processes (a second control plane, `edgefleet
        # tokens`): six lines of fcntl instead of a filelock dependency in the control plane for one blocking lock.
        with self._lock:
            if fcntl is None:  # pragma: no cover
                yield
                return
            try:
                self._path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(f"{self._path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            except OSError as exc:
                raise BrokerAuthError(f"cannot lock broker credentials file {self._path}: {exc}") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # releases the flock

    def _write(self, users: Mapping[str, UserEntry]) -> None:
        payload: dict[str, Any] = {
            "users": {name: {"hash": entry.hash, "role": entry.role} for name, entry in sorted(users.items())}
        }
        data = json.dumps(payload, indent=2).encode("utf-8") + b"\n"
        directory = self._path.parent
        tmp_name: str | None = None
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=f".{self._path.name}.", suffix=".tmp", dir=directory)
            with os.fdopen(fd, "wb") as tmp:  # mkstemp creates it 0600
                tmp.write(data)
                tmp.flush()
                os.fsync(tmp.fileno())
            os.replace(tmp_name, self._path)
            tmp_name = None
            with contextlib.suppress(OSError):  # durability of the rename; not possible everywhere
                dir_fd = os.open(directory, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
        except OSError as exc:
            raise BrokerAuthError(f"cannot write broker credentials file {self._path}: {exc}") from exc
        finally:
            if tmp_name is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp_name)


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

    def ensure_service(self, username: str, password: str) -> None:
        """Create or update the control plane's service account (may do everything under ``edgefleet/``)."""
        self._file.ensure_user(username, password, "service")

    def remove_device(self, device_id: str) -> None:
        self._refuse_service_account(device_id, "remove as a device")
        self._file.remove_user(device_id)

    def close(self) -> None:
        return None

    def _refuse_service_account(self, username: str, what: str) -> None:
        entry = self._file.get(username)
        if entry is not None and entry.role == "service":
            raise BrokerAuthError(f"{username!r} is the broker's service account; refusing to {what}")
