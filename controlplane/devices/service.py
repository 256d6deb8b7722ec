"""Device registry: enrolment, queries, updates, telemetry reads and commands."""

from __future__ import annotations

import json
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, Final, Protocol, runtime_checkable

import structlog
from sqlalchemy import Engine, delete, func
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from agent import protocol as wire
from controlplane._errors import Conflict, InvalidInput, NotFound
from controlplane.broker import BrokerAuth
from controlplane.db import CommandRecord, Device, DeviceTag, TelemetryRecord, as_utc, utcnow
from controlplane.devices.publisher import CommandPublisher
from controlplane.devices.schemas import (
    CommandCreate,
    CommandRead,
    DeviceCreate,
    DeviceEnrolled,
    DeviceRead,
    DeviceUpdate,
    TelemetryRead,
)
from controlplane.statuses import CommandStatus
from firmware_profiles import ProfileNotFound, get_profile

__all__ = ["DeviceService"]

log = structlog.get_logger("edgefleet.devices")

_ORPHAN_AFTER_S: Final = 60.0


@runtime_checkable
class ExclusiveBrokerAuth(Protocol):
    """A :class:`~controlplane.broker.BrokerAuth` that can create an account only if it does not exist, and undo
    exactly that (:class:`~controlplane.broker.EmbeddedBrokerAuth`)."""

    def add_device(self, device_id: str, password: str, *, replace_older_than: float | None = None) -> str | None:
        """The new credential, or None when the device id already has an account."""

    def discard_device(self, device_id: str, credential: str) -> bool:
        """Remove the account only if ``credential`` is still its credential."""

    def rotate_device(self, device_id: str, password: str) -> bool:
        """Change the password of an existing account only; False when there is none."""


def _check_profile(name: str) -> None:
    try:
        profile = get_profile(name)
    except ProfileNotFound as exc:
        raise InvalidInput(str(exc)) from None
    if not profile.runtime.python_agent:
        raise InvalidInput(
            f"profile '{name}' runs {profile.runtime.name} without a Python agent: it is a model-export "
            "target, not an enrollable device"
        )


class DeviceService:
    def __init__(self, engine: Engine, broker_auth: BrokerAuth, device_broker_url: str,
                 publisher: CommandPublisher | None, signing_public_key: str | Callable[[], str] = "") -> None:
        # A callable is read at each enrolment: after a signing-key rotation new devices get the key in use.
        self._signing_public_key = signing_public_key
        self.engine = engine
        self.broker_auth = broker_auth
        self.device_broker_url = device_broker_url
        self.publisher = publisher
        self._id_locks = [threading.Lock() for _ in range(64)]
        # Called with the device id before a device is deleted, while its row still exists (e.g. the round
        # runner withdraws its SuperNode key); a failing hook is logged and does not stop the deletion.
        self.before_delete: list[Callable[[str], object]] = []

    @property
    def signing_public_key(self) -> str:
        key = self._signing_public_key
        return key() if callable(key) else key

    # -- registry --------------------------------------------------------------------------------------------
    def enroll(self, data: DeviceCreate) -> DeviceEnrolled:
        """Register a device and create its broker account.

        The broker account is created first and the registry row committed after it, each in its own short step:
        no database write transaction is open while the broker is called (enrolments run concurrently), a device
        is never in the registry without broker credentials, and a failed insert removes the account it made.
        A second enrolment of the same id, racing or repeated, is a :class:`Conflict` and never changes the
        first device's credentials.
        """
        reserved = self.broker_auth.reserved(data.device_id)
        if reserved is not None:  # it could pass for the control plane on the broker
            raise InvalidInput(reserved)
        _check_profile(data.profile)
        device_id = data.device_id
        password = secrets.token_urlsafe(32)  # 256 bits: see docs/architecture.md, "Device secrets ... (issue 10)"
        tags = sorted(set(data.tags))
        conflict = Conflict(f"device '{device_id}' is already enrolled")
        # Serialises enrolments of one id in this process; the broker's add-only create covers other processes.
        with self._id_locks[hash(device_id) % len(self._id_locks)]:
            if self._exists(device_id):
                raise conflict
            credential = self._create_broker_account(device_id, password)
            if credential is None:
                raise conflict
            try:
                with Session(self.engine) as session:
                    session.add(Device(device_id=device_id, profile=data.profile, created_at=utcnow()))
                    session.add_all(DeviceTag(device_id=device_id, tag=t) for t in tags)
                    session.commit()
            except BaseException as exc:
                self._undo_broker_account(device_id, credential)
                if isinstance(exc, IntegrityError):  # another process enrolled it between the check and here
                    raise conflict from None
                raise
        log.info("device.enrolled", device_id=device_id, profile=data.profile)
        return DeviceEnrolled(device_id=device_id, profile=data.profile, tags=tags,
                              mqtt_username=device_id, mqtt_password=password,
                              broker_url=self.device_broker_url, signing_public_key=self.signing_public_key)

    def rotate_credentials(self, device_id: str) -> DeviceEnrolled:
        password = secrets.token_urlsafe(32)
        with Session(self.engine) as session:  # a read: nothing is locked while the broker is called
            device = self._device(session, device_id)
            profile = device.profile
            tags = self._tags(session, [device_id])[device_id]
        with self._id_locks[hash(device_id) % len(self._id_locks)]:
            # Update-only first: a delete that removed the account meanwhile is not undone by a new one.
            auth = self.broker_auth
            if not (isinstance(auth, ExclusiveBrokerAuth) and auth.rotate_device(device_id, password)):
                # No account (a device enrolled under another broker backend) or a backend without update-only.
                self.broker_auth.ensure_device(device_id, password)
                if not self._exists(device_id):
                    # Deleted meanwhile (delete removes the broker account first): this account would outlive it.
                    self.broker_auth.remove_device(device_id)
                    raise NotFound(f"no device '{device_id}'")
        return DeviceEnrolled(device_id=device_id, profile=profile, tags=tags,
                              mqtt_username=device_id, mqtt_password=password,
                              broker_url=self.device_broker_url, signing_public_key=self.signing_public_key)

    def _exists(self, device_id: str) -> bool:
        with Session(self.engine) as session:
            return session.get(Device, device_id) is not None

    def _create_broker_account(self, device_id: str, password: str) -> str | None:
        """Create the device's broker account only if it has none; returns what undoes it, or None (taken)."""
        if isinstance(self.broker_auth, ExclusiveBrokerAuth):
            # An account without a registry row older than this is an orphan (a crash between the two steps):
            # replaced. A newer one may be another process's enrolment in flight, and stays.
            return self.broker_auth.add_device(device_id, password, replace_older_than=_ORPHAN_AFTER_S)
        # Backends without an add-only create: the id lock above serialises this process's enrolments.
        self.broker_auth.ensure_device(device_id, password)
        return password

    def _undo_broker_account(self, device_id: str, credential: str) -> None:
        try:
            if isinstance(self.broker_auth, ExclusiveBrokerAuth):
                self.broker_auth.discard_device(device_id, credential)
            elif not self._exists(device_id):
                self.broker_auth.remove_device(device_id)
        except Exception as exc:  # noqa: BLE001 - the original error is the one to report
            log.error("device.enroll_undo_failed", device_id=device_id, error=str(exc))

    def find(self, *, profile: str | None = None, tag: str | None = None, online: bool | None = None,
             limit: int = 500, offset: int = 0) -> list[DeviceRead]:
        with Session(self.engine) as session:
            query = select(Device).order_by(Device.device_id)
            if profile is not None:
                query = query.where(Device.profile == profile)
            if online is not None:
                query = query.where(Device.online == online)
            if tag is not None:
                query = query.where(col(Device.device_id).in_(
                    select(DeviceTag.device_id).where(DeviceTag.tag == tag)))
            devices = list(session.exec(query.offset(offset).limit(limit)))
            tags = self._tags(session, [d.device_id for d in devices])
            return [self._read(d, tags[d.device_id]) for d in devices]

    def get(self, device_id: str) -> DeviceRead:
        with Session(self.engine) as session:
            device = self._device(session, device_id)
            return self._read(device, self._tags(session, [device_id])[device_id])

    def update(self, device_id: str, data: DeviceUpdate) -> DeviceRead:
        with Session(self.engine) as session:
            device = self._device(session, device_id)
            if data.profile is not None:
                _check_profile(data.profile)
                device.profile = data.profile
                session.add(device)
            if data.tags is not None:
                session.exec(delete(DeviceTag).where(col(DeviceTag.device_id) == device_id))
                session.add_all(DeviceTag(device_id=device_id, tag=t) for t in sorted(set(data.tags)))
            session.commit()
            session.refresh(device)
            return self._read(device, self._tags(session, [device_id])[device_id])

    def delete(self, device_id: str) -> None:
        self.get(device_id)  # 404 before any hook runs
        for hook in self.before_delete:
            try:
                hook(device_id)
            except Exception as exc:  # noqa: BLE001 - the deletion stands; the leftover is logged
                log.warning("device.delete_hook_failed", device_id=device_id, error=str(exc))
        # Under the id's lock: a credential rotation running meanwhile cannot leave a working account behind.
        with self._id_locks[hash(device_id) % len(self._id_locks)], Session(self.engine) as session:
            self._device(session, device_id)
            self.broker_auth.remove_device(device_id)
            for table in (DeviceTag, TelemetryRecord, CommandRecord):
                session.exec(delete(table).where(col(table.device_id) == device_id))
            session.exec(delete(Device).where(col(Device.device_id) == device_id))
            session.commit()
        if self.publisher is not None:
            try:  # clear the retained state so the device does not look alive to other tools
                self.publisher.publish(wire.topic(device_id, wire.Channel.STATE), b"", retain=True, timeout_s=2)
            except Exception as exc:  # noqa: BLE001 - the registry change stands; log the leftover
                log.warning("device.retained_state_not_cleared", device_id=device_id, error=str(exc))
        log.info("device.deleted", device_id=device_id)

    def count(self) -> int:
        with Session(self.engine) as session:
            return int(session.exec(select(func.count()).select_from(Device)).one())

    # -- telemetry -------------------------------------------------------------------------------------------
    def telemetry(self, device_id: str, *, since: float | None, until: float | None,
                  limit: int) -> list[TelemetryRead]:
        with Session(self.engine) as session:
            self._device(session, device_id)
            query = select(TelemetryRecord).where(TelemetryRecord.device_id == device_id)
            if since is not None:
                query = query.where(TelemetryRecord.ts >= since)
            if until is not None:
                query = query.where(TelemetryRecord.ts < until)
            # The newest `limit` records, returned oldest first.
            rows = list(session.exec(query.order_by(col(TelemetryRecord.seq).desc()).limit(limit)))
            rows.reverse()
            return [TelemetryRead(device_id=r.device_id, seq=r.seq, ts=r.ts, received_at=as_utc(r.received_at),
                                  payload=json.loads(r.payload)) for r in rows]

    # -- commands --------------------------------------------------------------------------------------------
    def send_command(self, device_id: str, data: CommandCreate) -> CommandRead:
        if self.publisher is None:
            raise InvalidInput("this control plane has no broker connection for commands")
        command_id = uuid.uuid4().hex
        with Session(self.engine) as session:
            self._device(session, device_id)
            session.add(CommandRecord(command_id=command_id, device_id=device_id, kind=data.kind,
                                      args=redact_secrets(data.args), created_at=utcnow()))
            session.commit()
        payload = wire.encode(wire.Command(command_id=command_id, kind=data.kind, args=data.args, ts=time.time()))
        self.publisher.publish(wire.topic(device_id, wire.Channel.CMD), payload)
        deadline = time.monotonic() + data.wait_s
        while True:
            command = self.get_command(device_id, command_id)
            if command.status is not CommandStatus.PENDING or time.monotonic() >= deadline:
                return command
            time.sleep(0.05)

    def get_command(self, device_id: str, command_id: str) -> CommandRead:
        with Session(self.engine) as session:
            row = session.get(CommandRecord, command_id)
            if row is None or row.device_id != device_id:
                raise NotFound(f"no command '{command_id}' for device '{device_id}'")
            return CommandRead(command_id=row.command_id, device_id=row.device_id, kind=row.kind, args=row.args,
                               status=row.status, reason=row.reason, result=row.result,
                               created_at=as_utc(row.created_at), acked_at=as_utc(row.acked_at))

    # -- helpers ---------------------------------------------------------------------------------------------
    @staticmethod
    def _device(session: Session, device_id: str) -> Device:
        device = session.get(Device, device_id)
        if device is None:
            raise NotFound(f"no device '{device_id}'")
        return device

    @staticmethod
    def _tags(session: Session, ids: list[str]) -> dict[str, list[str]]:
        tags: dict[str, list[str]] = {i: [] for i in ids}
        if ids:
            rows = session.exec(select(DeviceTag).where(col(DeviceTag.device_id).in_(ids)).order_by(DeviceTag.tag))
            for row in rows:
                tags[row.device_id].append(row.tag)
        return tags

    @staticmethod
    def _read(device: Device, tags: list[str]) -> DeviceRead:
        return DeviceRead(
            device_id=device.device_id, profile=device.profile, tags=tags, online=device.online,
            created_at=as_utc(device.created_at), last_seen=as_utc(device.last_seen),
            agent_version=device.agent_version, last_seq=device.last_seq,
            reported_state=device.reported_state, last_telemetry=device.last_telemetry,
        )


# Argument names whose values are credentials: they travel to the device in the command, and are never stored
# (viewers read stored commands).
_SECRET_ARGS = ("bearer", "token", "password", "secret", "authorization", "credential")


def redact_secrets(value: Any) -> Any:
    """`value` with every credential-named key's value replaced by "[redacted]", at any depth."""
    if isinstance(value, dict):
        return {k: "[redacted]" if any(word in str(k).lower() for word in _SECRET_ARGS) else redact_secrets(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [redact_secrets(v) for v in value]
    return value
