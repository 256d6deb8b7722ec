"""Model-signing keys and their rotation: the keys, the statements sent to devices, and who acknowledged what.

A rotation (:meth:`KeyService.rotate`) creates the next key (:meth:`federated.signing.Signer.begin_rotation`) and
sends every enrolled device a ``trust_signing_key`` command carrying the key transition, signed by the key in use;
signing goes on with the old key. :meth:`KeyService.complete` switches signing to the new key (refused while
devices have not acknowledged it, unless forced), re-signs every stored model manifest and the releases of active
deployments with it (content unchanged) and sends ``retire_signing_key``, signed by the new key.

Delivery: the commands go through the command publisher (QoS 1, so an offline device with a broker session gets
them when it is back). A background sweep (:meth:`KeyService.start`) sends each device its next step: a device
enrolled during the rotation gets the key; a device whose command is still pending when it announces itself
online again (its session may have expired) gets it again; a device that trusts the new key gets the retirement
once the rotation is complete; a device that missed several rotations gets them in order (each transition is
signed by the previous key). A refused statement is not re-sent: its reason shows in :meth:`KeyService.keys`.

Where the state lives: the keys and the rotations in the key directory (``rotation.json``, see
:mod:`federated.signing`: every process that signs reads it); per device, the ``command`` table — each statement
is a command whose args carry the rotation number, and its ack's result (stored by ingest) lists the key ids the
device trusts afterwards. No table of its own: a device's progress is exactly its acknowledged commands.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import msgspec
import structlog
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from agent import protocol as wire
from agent.manifest import Release, decode_signed
from controlplane._errors import Conflict, InvalidInput
from controlplane.db import (
    CommandRecord,
    DeploymentRecord,
    DeploymentReleaseRecord,
    Device,
    ModelArtifactRecord,
    as_utc,
    utcnow,
)
from controlplane.devices.publisher import CommandPublisher
from controlplane.keys._send import send_statement
from controlplane.keys.ca import CaRenewalService
from controlplane.keys.schemas import DeviceKeyRead, DeviceKeyStep, KeyRead, KeysRead, KeyState, RotationRead
from controlplane.pki import FleetPKI
from controlplane.statuses import CommandStatus, DeploymentStatus
from federated.signing import KeyRotation, RotationStatus, Signer, SigningKeyError

__all__ = ["KeyService"]

log = structlog.get_logger("edgefleet.controlplane.keys")

_KINDS: Final = (wire.CommandKind.TRUST_SIGNING_KEY, wire.CommandKind.RETIRE_SIGNING_KEY)
PENDING_SHOWN: Final = 20  # devices listed by `keys status` and in a refused completion
_RESIGN_WINDOW_S: Final = 120.0  # after a completion, sweeps re-sign what another key signed meanwhile


@dataclass
class _Step:
    """One device's commands for one statement (a rotation's transition or retirement)."""

    ok: bool = False
    latest: CommandRecord | None = None


@dataclass(frozen=True)
class _DeviceRow:
    """What a sweep needs of a device (not its telemetry)."""

    device_id: str
    online: bool
    created_at: datetime
    state_ts: float | None


@dataclass
class _Device:
    device: _DeviceRow
    steps: dict[tuple[int, str], _Step] = field(default_factory=lambda: defaultdict(_Step))
    trusted: list[str] | None = None
    trusted_at: datetime | None = None

    def step(self, number: int, kind: str) -> _Step:
        return self.steps[(number, kind)]


def _connected_at(device: _DeviceRow) -> datetime | None:
    """When the device last announced itself online (its state message's own timestamp)."""
    ts = device.state_ts
    return datetime.fromtimestamp(ts, UTC) if ts is not None and ts > 0 else None


def _at(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC)


def _applies(rotation: KeyRotation, device: _DeviceRow) -> bool:
    """Devices enrolled after a rotation completed were given its new key at enrolment."""
    done = _at(rotation.completed_at)
    return done is None or as_utc(device.created_at) <= done


class KeyService:
    """Signing-key rotation; with ``pki``, the fleet CA's renewal too (:attr:`ca`, swept by the same loop)."""

    def __init__(self, engine: Engine, signer: Signer, publisher: CommandPublisher | None, *,
                 pki: FleetPKI | None = None, sweep_interval_s: float = 2.0) -> None:
        self.engine = engine
        self.signer = signer
        self.publisher = publisher
        self.ca = None if pki is None else CaRenewalService(engine, pki, signer, publisher)
        self.sweep_interval_s = sweep_interval_s
        self._sweep_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> KeyService:
        """Run :meth:`sweep` in the background (re-sends to devices as they come back)."""
        def loop() -> None:
            while not self._stop.wait(self.sweep_interval_s):
                try:
                    self.sweep()
                except Exception:  # the next sweep tries again; the API keeps working
                    log.exception("keys.sweep_failed")
                if self.ca is not None:
                    try:
                        self.ca.sweep()
                    except Exception:
                        log.exception("keys.ca_sweep_failed")

        self._stop.clear()
        self._thread = threading.Thread(target=loop, name="signing-keys", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    # -- reading -----------------------------------------------------------------------------------------------
    def keys(self, limit: int = PENDING_SHOWN) -> KeysRead:
        """The keys, the latest rotation and (up to ``limit``) the devices that have not acknowledged it."""
        rotations = self.signer.rotations()
        active = self.signer.key_id
        public = self.signer.public_keys()
        introduced = {r.new_key_id: r.number for r in rotations}
        retired = {r.old_key_id for r in rotations if r.status is RotationStatus.COMPLETE}
        keys = [KeyRead(key_id=kid, public_key=b64, rotation=introduced.get(kid, 0),
                        state=KeyState.ACTIVE if kid == active else
                        KeyState.RETIRED if kid in retired else KeyState.NEXT)
                for kid, b64 in public.items()]
        keys.sort(key=lambda k: k.rotation)
        rotation = rotations[-1] if rotations else None
        return KeysRead(active_key_id=active, keys=keys,
                        rotation=None if rotation is None else self._rotation_read(rotation, limit))

    def _rotation_read(self, rotation: KeyRotation, limit: int) -> RotationRead:
        with Session(self.engine) as session:
            devices = [d for d in self._progress(session).values() if _applies(rotation, d.device)]
        complete = rotation.status is RotationStatus.COMPLETE
        acknowledged = [d for d in devices if d.step(rotation.number, _KINDS[0]).ok]
        retired = [d for d in acknowledged if d.step(rotation.number, _KINDS[1]).ok]
        pending = [d for d in devices if not d.step(rotation.number, _KINDS[0]).ok
                   or (complete and not d.step(rotation.number, _KINDS[1]).ok)]
        pending.sort(key=lambda d: d.device.device_id)
        return RotationRead(
            number=rotation.number, status=str(rotation.status), old_key_id=rotation.old_key_id,
            new_key_id=rotation.new_key_id, issued_at=_at(rotation.issued_at) or utcnow(),
            completed_at=_at(rotation.completed_at), devices=len(devices), acknowledged=len(acknowledged),
            retired=len(retired), pending=[self._device_read(d, rotation) for d in pending[:limit]])

    @staticmethod
    def _device_read(progress: _Device, rotation: KeyRotation) -> DeviceKeyRead:
        trust = progress.step(rotation.number, _KINDS[0])
        kind, step = (_KINDS[0], DeviceKeyStep.TRUST) if not trust.ok else (_KINDS[1], DeviceKeyStep.RETIRE)
        if trust.ok and (rotation.status is not RotationStatus.COMPLETE
                         or progress.step(rotation.number, _KINDS[1]).ok):
            step = DeviceKeyStep.DONE
        latest = progress.step(rotation.number, kind).latest
        device = progress.device
        reason = None if latest is None else latest.reason
        if latest is None and step is not DeviceKeyStep.DONE:
            reason = "not sent yet: the next sweep sends it (after the device's steps of earlier rotations)"
        elif latest is not None and latest.status == CommandStatus.PENDING:
            reason = "waiting for the device's ack" if device.online else \
                "the device is offline: the command waits in its broker session and is sent again when it is back"
        return DeviceKeyRead(device_id=device.device_id, online=device.online, step=step,
                             status=None if latest is None else CommandStatus(latest.status), reason=reason,
                             trusted_key_ids=progress.trusted)

    def _progress(self, session: Session) -> dict[str, _Device]:
        """Every enrolled device with its signing-key commands, grouped by rotation and kind."""
        rows = session.exec(select(Device.device_id, Device.online, Device.created_at,
                                   col(Device.reported_state)["ts"].as_float()))
        devices = {device_id: _Device(_DeviceRow(device_id, bool(online), as_utc(created), ts))
                   for device_id, online, created, ts in rows}
        commands = session.exec(select(CommandRecord).where(col(CommandRecord.kind).in_([str(k) for k in _KINDS]))
                                .order_by(col(CommandRecord.created_at)))
        for command in commands:
            progress = devices.get(command.device_id)
            number = (command.args or {}).get("rotation")
            if progress is None or not isinstance(number, int):
                continue
            step = progress.step(number, command.kind)
            step.latest = command
            step.ok = step.ok or command.status == CommandStatus.OK
            trusted = (command.result or {}).get("trusted_key_ids")
            acked = as_utc(command.acked_at)
            if isinstance(trusted, list) and acked is not None and (progress.trusted_at is None
                                                                      or acked >= progress.trusted_at):
                progress.trusted, progress.trusted_at = [str(t) for t in trusted], acked
        return devices

    # -- changing ----------------------------------------------------------------------------------------------
    def rotate(self) -> KeysRead:
        """Begin a rotation: a new key, and its transition sent to every enrolled device."""
        if self.publisher is None:
            raise InvalidInput("this control plane has no broker connection for commands")
        try:
            rotation = self.signer.begin_rotation()
        except SigningKeyError as exc:
            raise Conflict(str(exc)) from exc
        log.info("keys.rotation_begun", rotation=rotation.number, new_key_id=rotation.new_key_id,
                 old_key_id=rotation.old_key_id)
        self.sweep()
        return self.keys()

    def complete(self, *, force: bool = False) -> KeysRead:
        """Sign with the new key from now on, re-sign what is stored, retire the old key on the devices.

        Raises Conflict while devices have not acknowledged the new key (listing up to 20), unless ``force``.
        """
        rotation = self.signer.current_rotation()
        if rotation is None or rotation.status is not RotationStatus.IN_PROGRESS:
            raise Conflict("no signing-key rotation is in progress (start one with `edgefleet keys rotate`)")
        if not force:
            with Session(self.engine) as session:
                missing = sorted(d.device.device_id for d in self._progress(session).values()
                                 if not d.step(rotation.number, _KINDS[0]).ok)
            if missing:
                more = f" and {len(missing) - PENDING_SHOWN} more" if len(missing) > PENDING_SHOWN else ""
                raise Conflict(f"{len(missing)} device(s) have not acknowledged key {rotation.new_key_id}: "
                               f"{', '.join(missing[:PENDING_SHOWN])}{more}; they would refuse every release "
                               f"signed by it (complete with force to do it anyway)")
        try:
            rotation = self.signer.complete_rotation()
        except SigningKeyError as exc:
            raise Conflict(str(exc)) from exc
        manifests, releases = self.resign()
        log.info("keys.rotation_complete", rotation=rotation.number, new_key_id=rotation.new_key_id,
                 retired_key_id=rotation.old_key_id, manifests_resigned=manifests, releases_resigned=releases,
                 forced=force)
        self.sweep()
        return self.keys()

    def resign(self) -> tuple[int, int]:
        """Re-sign, with the active key, every stored model manifest and the releases of active deployments that
        another key signed (their content unchanged). Returns (manifests, releases) re-signed."""
        active = self.signer.key_id
        manifests = releases = 0
        with Session(self.engine) as session:
            for artifact in session.exec(select(ModelArtifactRecord)):
                if not artifact.signed_manifest:  # a variant the gate rejected (JSON null, not SQL NULL)
                    continue
                signed = decode_signed(msgspec.json.encode(artifact.signed_manifest))
                if signed.key_id != active:
                    artifact.signed_manifest = msgspec.to_builtins(self.signer.sign(signed.manifest))
                    session.add(artifact)
                    manifests += 1
            rows = session.exec(select(DeploymentReleaseRecord, DeploymentRecord)
                                .where(DeploymentReleaseRecord.deployment_id == DeploymentRecord.id))
            for row, deployment in rows:
                if not DeploymentStatus(deployment.status).active or row.signed_release.get("key_id") == active:
                    continue
                release = msgspec.convert(row.signed_release["release"], Release)
                row.signed_release = msgspec.to_builtins(self.signer.sign_release(release))
                session.add(row)
                releases += 1
            session.commit()
        return manifests, releases

    def sweep(self) -> int:
        """Send each device its next signing-key statement where it needs one (see the module docstring).
        Returns how many commands were sent."""
        rotations = self.signer.rotations()
        if not rotations or self.publisher is None:
            return 0
        latest = rotations[-1]
        sent = 0
        with self._sweep_lock:
            if latest.status is RotationStatus.COMPLETE and latest.completed_at is not None \
                    and time.time() - latest.completed_at < _RESIGN_WINDOW_S:
                # A release renewed by the deployments' own loop while the rotation completed may have been
                # signed (by the old key) after complete() re-signed: catch it.
                self.resign()
            with Session(self.engine) as session:
                progress = list(self._progress(session).values())
                session.expunge_all()
            for device in progress:
                due = self._next_step(device, rotations)
                if due is not None and self._send(device.device, *due):
                    sent += 1
        return sent

    @staticmethod
    def _next_step(progress: _Device, rotations: list[KeyRotation]) -> tuple[KeyRotation, str] | None:
        """The first statement the device has not acknowledged, if it should be sent (again) now."""
        for rotation in rotations:
            if not _applies(rotation, progress.device):
                continue
            for kind in _KINDS:
                if kind == _KINDS[1] and rotation.status is not RotationStatus.COMPLETE:
                    return None  # the retirement comes with completion
                step = progress.step(rotation.number, kind)
                if step.ok:
                    continue
                latest = step.latest
                if latest is None:
                    return rotation, kind
                if latest.status != CommandStatus.PENDING:
                    return None  # refused: the reason shows in `keys status`; sending it again changes nothing
                back = _connected_at(progress.device)
                if progress.device.online and back is not None and back > as_utc(latest.created_at):
                    return rotation, kind  # it came back after the command was sent: its session may be gone
                return None
        return None

    def _send(self, device: _DeviceRow, rotation: KeyRotation, kind: str) -> bool:
        assert self.publisher is not None
        statement = rotation.transition if kind == _KINDS[0] else rotation.retirement
        if statement is None:
            return False
        args: dict[str, Any] = {"rotation": rotation.number, "statement": msgspec.to_builtins(statement)}
        if not send_statement(self.engine, self.publisher, device.device_id, kind, args, "keys"):
            return False
        log.info("keys.sent", device_id=device.device_id, kind=kind, rotation=rotation.number)
        return True
