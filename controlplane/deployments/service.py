"""Rollouts: desired model per device, `deploy_model` commands wave by wave, progress from the devices' acks.

A deployment issues one signed :class:`~agent.manifest.Release` per variant it sends (release number, task,
device classes, deployment id, expiry, rollback flag) and one download token per device, sent only in that
device's command: the database keeps its SHA-256, the command table keeps the command without it. A token
opens the release and artifact of its own deployment and variant only, and only while the deployment runs and
its release has not expired.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import threading
import time
import uuid
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import msgspec
import structlog
from sqlalchemy import Engine, update
from sqlmodel import Session, col, select

from agent import protocol as wire
from agent.manifest import Release, decode_signed
from controlplane._errors import InvalidInput, NotFound
from controlplane.db import (
    CommandRecord,
    DeploymentRecord,
    DeploymentReleaseRecord,
    DeploymentTargetRecord,
    Device,
    DeviceTag,
    ModelArtifactRecord,
    ModelVersionRecord,
    as_utc,
    utcnow,
)
from controlplane.deployments import _quality
from controlplane.deployments.schemas import DeploymentCreate, DeploymentRead, TargetRead
from controlplane.devices.publisher import CommandPublisher
from firmware_profiles import ModelVariant, Profile, ProfileError, get_profile, variant_unsupported

if TYPE_CHECKING:  # the models package imports this module (its download routes serve deployments' releases)
    from controlplane.models.service import ModelService
    from federated.signing import Signer

__all__ = [
    "RELEASE_GRACE_S",
    "DeploymentService",
    "choose_variant",
    "download_authorized",
    "release_artifact_url",
    "release_manifest_url",
]

log = structlog.get_logger("edgefleet.deployments")

# Which variant a device class prefers when several pass the gate, by its accelerator's delegate.
_PREFERENCE: dict[str | None, list[str]] = {
    "edgetpu": ["full-int8"],
    "gpu": ["fp16", "fp32", "full-int8", "dynamic-int8"],
    None: ["full-int8", "dynamic-int8", "fp16", "fp32"],  # CPU (XNNPACK): integer kernels are fastest
}
_ACCURACY_SLACK = 0.005  # variants within half a point of the best count as equally accurate


def choose_variant(profile: Profile, published: dict[str, ModelArtifactRecord]) -> tuple[str | None, str]:
    """The best published variant this device class can run, and why (or why none)."""
    runnable: dict[str, ModelArtifactRecord] = {}
    reasons = []
    for variant, artifact in published.items():
        if not profile.allows(variant):
            reasons.append(f"{variant}: not allowed by profile")
            continue
        why = variant_unsupported(profile.runtime.name, profile.runtime.version, ModelVariant(variant))
        if why:
            reasons.append(f"{variant}: {why}")
            continue
        runtimes = (artifact.signed_manifest or {}).get("manifest", {}).get("runtimes", {})
        if runtimes and str(profile.runtime.name) not in runtimes:
            reasons.append(f"{variant}: built for {', '.join(sorted(runtimes))}, not {profile.runtime.name}")
            continue
        if (artifact.size_bytes or 0) > profile.max_model_bytes:
            reasons.append(f"{variant}: {artifact.size_bytes} bytes > max {profile.max_model_bytes}")
            continue
        runnable[variant] = artifact
    if not runnable:
        return None, "no published variant this device can run (" + "; ".join(reasons or ["none published"]) + ")"
    best = max((a.accuracy or 0.0) for a in runnable.values())
    delegate = profile.hardware.accelerator.delegate if profile.hardware.accelerator else None
    order = _PREFERENCE.get(delegate, _PREFERENCE[None])
    candidates = [v for v, a in runnable.items() if (a.accuracy or 0.0) >= best - _ACCURACY_SLACK]
    candidates.sort(key=lambda v: order.index(v) if v in order else len(order))
    chosen = candidates[0]
    return chosen, f"{chosen}: most accurate the device can run (accuracy {runnable[chosen].accuracy})"


# A release stays valid this long beyond the deployment's own schedule (waves x wave timeout).
RELEASE_GRACE_S = 900.0


def release_manifest_url(deployment_id: int, variant: str) -> str:
    return f"/api/v1/deployments/{deployment_id}/variants/{variant}/manifest"


def release_artifact_url(deployment_id: int, variant: str) -> str:
    return f"/api/v1/deployments/{deployment_id}/variants/{variant}/artifact"


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def download_authorized(engine: Engine, deployment_id: int, variant: str, token: str) -> str | None:
    """None if ``token`` is a download token of this deployment and variant, still valid; else why not."""
    with Session(engine) as session:
        row = session.exec(
            select(DeploymentTargetRecord, DeploymentRecord)
            .join(DeploymentRecord, col(DeploymentRecord.id) == col(DeploymentTargetRecord.deployment_id))
            .where(DeploymentTargetRecord.token_hash == _token_hash(token))).first()
        if row is None:
            return "not a valid token"
        target, deployment = row
        if (target.deployment_id, target.variant) != (deployment_id, variant):
            return "the token is for another deployment or variant"
        if deployment.status != "running":
            return f"deployment {deployment.id} is {deployment.status}: its download tokens have expired"
        release = session.get(DeploymentReleaseRecord, (deployment_id, variant))
        if release is None or (as_utc(release.expires_at) or utcnow()) <= utcnow():
            return "the token has expired"
        return None


class DeploymentService:
    def __init__(self, engine: Engine, models: ModelService, publisher: CommandPublisher | None,
                 signer: Signer) -> None:
        self.engine = engine
        self.models = models
        self.publisher = publisher
        self.signer = signer
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- API -------------------------------------------------------------------------------------------------
    def create(self, data: DeploymentCreate) -> DeploymentRead:
        if data.waves != sorted(data.waves) or data.waves[-1] != 100:
            raise InvalidInput(f"waves must be increasing cumulative percentages ending at 100, got {data.waves}")
        model = self.models.get(data.model_version)
        if model.status != "ready":
            raise InvalidInput(f"model '{data.model_version}' is {model.status}, not ready to deploy")
        published = self.models.published(data.model_version)
        with Session(self.engine) as session:
            highest = self._highest_deployed(session)
            if highest is not None and model.release < highest[0] and not data.rollback:
                raise InvalidInput(
                    f"model '{data.model_version}' is release {model.release}, lower than release {highest[0]} "
                    f"('{highest[1]}') already deployed: going back needs \"rollback\": true")
            devices: list[Device] = self._resolve(session, data)
            if not devices:
                raise InvalidInput("the targets match no enrolled device")
            now = utcnow()
            record = DeploymentRecord(model_version=data.model_version, targets=_to_dict(data), waves=data.waves,
                                      failure_threshold=data.failure_threshold, wave_timeout_s=data.wave_timeout_s,
                                      rollback=data.rollback, created_at=now, updated_at=now)
            session.add(record)
            session.flush()
            assert record.id is not None
            total = len(devices)
            bounds = [math.ceil(total * p / 100) for p in data.waves]
            classes: dict[str, set[str]] = {}  # variant -> the device classes (profiles) it is sent to
            for index, device in enumerate(devices):
                wave = next(i for i, bound in enumerate(bounds) if index < bound)
                try:
                    variant, reason = choose_variant(get_profile(device.profile), published)
                except ProfileError as exc:
                    variant, reason = None, str(exc)
                if variant:
                    classes.setdefault(variant, set()).add(device.profile)
                session.add(DeploymentTargetRecord(
                    deployment_id=record.id, device_id=device.device_id, wave=wave, variant=variant,
                    status="waiting" if variant else "skipped", reason=None if variant else reason))
            rollback_from = max(model.release, highest[0] if highest else 0) if data.rollback else 0
            expires = now + timedelta(seconds=data.wave_timeout_s * len(data.waves) + RELEASE_GRACE_S)
            for variant, profiles in classes.items():
                build = decode_signed(msgspec.json.encode(published[variant].signed_manifest)).manifest
                release = Release(release=model.release, model_version=data.model_version, variant=variant,
                                  task=model.task, device_classes=sorted(profiles), deployment_id=record.id,
                                  rollback=data.rollback, rollback_from=rollback_from,
                                  issued_at=int(now.timestamp()), expires_at=int(expires.timestamp()),
                                  artifact=build)
                session.add(DeploymentReleaseRecord(deployment_id=record.id, variant=variant, expires_at=expires,
                                                    signed_release=self._sign(release)))
            session.commit()
            deployment_id = record.id
        log.info("deployment.created", deployment_id=deployment_id, model_version=data.model_version,
                 release=model.release, rollback=data.rollback, devices=len(devices))
        self.step()
        return self.get(deployment_id)

    def get(self, deployment_id: int) -> DeploymentRead:
        with Session(self.engine) as session:
            record = session.get(DeploymentRecord, deployment_id)
            if record is None:
                raise NotFound(f"no deployment {deployment_id}")
            return self._read(session, record)

    def list_all(self) -> list[DeploymentRead]:
        with Session(self.engine) as session:
            rows = session.exec(select(DeploymentRecord).order_by(col(DeploymentRecord.id).desc()))
            return [self._read(session, r) for r in rows]

    # -- progress --------------------------------------------------------------------------------------------
    def start(self, interval_s: float = 1.0) -> None:
        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.step()
                except Exception:
                    log.exception("deployment.step_failed")

        self._thread = threading.Thread(target=loop, name="deployments", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def step(self) -> None:
        """Advance every running deployment: send the current wave, collect acks, judge the wave."""
        with Session(self.engine) as session:
            running = list(session.exec(select(DeploymentRecord).where(DeploymentRecord.status == "running")))
            for record in running:
                self._advance(session, record)
            # Succeeded is not the end: the devices' predictions with the new model are watched for a while.
            since = utcnow() - timedelta(seconds=_quality.WATCH_S)
            for record in session.exec(select(DeploymentRecord).where(
                    col(DeploymentRecord.status).in_(("succeeded", "suspect")))
                    .order_by(col(DeploymentRecord.id).desc()).limit(20)):
                if (as_utc(record.updated_at) or since) > since:
                    self._watch(session, record)
            session.commit()

    def _watch(self, session: Session, record: DeploymentRecord) -> None:
        """Report updated devices whose predictions with the new model look wrong (see _quality) as suspect."""
        gate = {a.variant: a.accuracy for a in session.exec(select(ModelArtifactRecord).where(
            ModelArtifactRecord.model_version == record.model_version))}
        targets = list(session.exec(select(DeploymentTargetRecord).where(
            DeploymentTargetRecord.deployment_id == record.id, DeploymentTargetRecord.status == "succeeded")))
        suspects = []
        for target in targets:
            reason = _quality.suspect_reason(session, target.device_id, record.model_version,
                                             gate_accuracy=gate.get(target.variant or ""))
            if reason is not None:
                target.status, target.reason = "suspect", reason
                session.add(target)
                suspects.append(target)
                log.warning("deployment.suspect_device", deployment_id=record.id, device_id=target.device_id,
                            reason=reason)
        if suspects:
            every = list(session.exec(select(DeploymentTargetRecord).where(
                DeploymentTargetRecord.deployment_id == record.id, DeploymentTargetRecord.status == "suspect")))
            record.status = "suspect"
            record.reason = (f"installed, but {len(every)} device(s) predict suspiciously with the new model: "
                             + "; ".join(f"{t.device_id}: {t.reason}" for t in every[:5]))
            record.updated_at = utcnow()
            session.add(record)

    def _advance(self, session: Session, record: DeploymentRecord) -> None:
        assert record.id is not None
        targets = list(session.exec(select(DeploymentTargetRecord).where(
            DeploymentTargetRecord.deployment_id == record.id, DeploymentTargetRecord.wave == record.current_wave)))
        now = utcnow()
        for target in targets:
            if target.status == "waiting":
                self._send(record, target, now)
            elif target.status == "sent":
                self._collect(session, record, target, now)
            session.add(target)
        if any(t.status in ("waiting", "sent") for t in targets):
            return
        counted = [t for t in targets if t.status != "skipped"]
        failed = [t for t in counted if t.status == "failed"]
        if counted and len(failed) / len(counted) > record.failure_threshold:
            record.status = "halted"
            record.reason = (f"wave {record.current_wave + 1}: {len(failed)} of {len(counted)} devices failed "
                             f"(threshold {record.failure_threshold:.0%}): "
                             + "; ".join(f"{t.device_id}: {t.reason}" for t in failed[:5]))
            log.warning("deployment.halted", deployment_id=record.id, reason=record.reason)
        elif record.current_wave + 1 >= len(record.waves):
            record.status = "succeeded"
            log.info("deployment.succeeded", deployment_id=record.id)
        else:
            record.current_wave += 1
        record.updated_at = now
        session.add(record)

    def _send(self, record: DeploymentRecord, target: DeploymentTargetRecord, now: datetime) -> None:
        if self.publisher is None:
            target.status, target.reason = "failed", "no broker connection"
            return
        assert target.variant is not None and record.id is not None
        command_id = uuid.uuid4().hex
        token = secrets.token_urlsafe(32)
        args: dict[str, Any] = {
            "model_version": record.model_version, "variant": target.variant, "deployment_id": record.id,
            "manifest_url": release_manifest_url(record.id, target.variant),
            "artifact_url": release_artifact_url(record.id, target.variant)}
        # Own session, committed before the command goes out: the device may download at once. (The step's
        # session is never flushed in between, so this does not wait on its lock.)
        with Session(self.engine) as cmd_session:
            self._renew_release(cmd_session, record, target.variant, now)
            cmd_session.add(CommandRecord(command_id=command_id, device_id=target.device_id,
                                          kind=wire.CommandKind.DEPLOY_MODEL, args=args, created_at=now))
            cmd_session.exec(update(DeploymentTargetRecord).where(
                col(DeploymentTargetRecord.deployment_id) == record.id,
                col(DeploymentTargetRecord.device_id) == target.device_id).values(token_hash=_token_hash(token)))
            cmd_session.commit()
        target.token_hash = _token_hash(token)
        try:
            payload = wire.encode(wire.Command(command_id=command_id, kind=wire.CommandKind.DEPLOY_MODEL,
                                               args={**args, "bearer": token}, ts=time.time()))
            self.publisher.publish(wire.topic(target.device_id, wire.Channel.CMD), payload)
        except Exception as exc:  # noqa: BLE001 - retried on the next step
            log.warning("deployment.send_failed", device_id=target.device_id, error=str(exc))
            return
        target.command_id, target.status, target.sent_at = command_id, "sent", now

    def _collect(self, session: Session, record: DeploymentRecord, target: DeploymentTargetRecord,
                 now: datetime) -> None:
        command = session.get(CommandRecord, target.command_id) if target.command_id else None
        if command is not None and command.status != "pending":
            target.status = "succeeded" if command.status == "ok" else "failed"
            target.reason = command.reason
            target.finished_at = now
            return
        sent_at = as_utc(target.sent_at) or now
        if now - sent_at > timedelta(seconds=record.wave_timeout_s):
            target.status, target.reason, target.finished_at = "failed", "no answer within the wave timeout", now

    # -- releases --------------------------------------------------------------------------------------------
    def _sign(self, release: Release) -> dict[str, Any]:
        signed: dict[str, Any] = msgspec.to_builtins(self.signer.sign_release(release))
        return signed

    def _renew_release(self, session: Session, record: DeploymentRecord, variant: str, now: datetime) -> None:
        """Re-sign a running deployment's release with a later expiry when it would lapse before this wave ends
        (a wave held up by a broker outage, for instance)."""
        row = session.get(DeploymentReleaseRecord, (record.id, variant))
        if row is None:
            raise NotFound(f"deployment {record.id} issued no release for variant {variant}")
        if (as_utc(row.expires_at) or now) - now >= timedelta(seconds=record.wave_timeout_s + RELEASE_GRACE_S / 2):
            return
        remaining = len(record.waves) - record.current_wave
        expires = now + timedelta(seconds=record.wave_timeout_s * remaining + RELEASE_GRACE_S)
        release = msgspec.convert(row.signed_release["release"], Release)
        release = msgspec.structs.replace(release, issued_at=int(now.timestamp()),
                                          expires_at=int(expires.timestamp()))
        row.signed_release, row.expires_at = self._sign(release), expires
        session.add(row)
        log.info("deployment.release_renewed", deployment_id=record.id, variant=variant,
                 expires_at=expires.isoformat())

    def signed_release(self, deployment_id: int, variant: str) -> dict[str, Any]:
        with Session(self.engine) as session:
            row = session.get(DeploymentReleaseRecord, (deployment_id, variant))
            if row is None:
                raise NotFound(f"deployment {deployment_id} has no release for variant '{variant}'")
            return row.signed_release

    def model_version_of(self, deployment_id: int) -> str:
        with Session(self.engine) as session:
            record = session.get(DeploymentRecord, deployment_id)
            if record is None:
                raise NotFound(f"no deployment {deployment_id}")
            return record.model_version

    @staticmethod
    def _highest_deployed(session: Session) -> tuple[int, str] | None:
        """The highest release that reached a device or is on its way to one, and its model version.

        (A release no device installed does not count: devices that never got it accept the ones below it.)
        """
        row = session.exec(
            select(ModelVersionRecord.release, ModelVersionRecord.version)
            .join(DeploymentRecord, col(DeploymentRecord.model_version) == col(ModelVersionRecord.version))
            .join(DeploymentTargetRecord, col(DeploymentTargetRecord.deployment_id) == col(DeploymentRecord.id))
            .where(col(DeploymentTargetRecord.status).in_(("sent", "succeeded", "suspect")))
            .order_by(col(ModelVersionRecord.release).desc()).limit(1)).first()
        return (row[0], row[1]) if row else None

    # -- helpers ---------------------------------------------------------------------------------------------
    @staticmethod
    def _resolve(session: Session, data: DeploymentCreate) -> list[Device]:
        t = data.targets
        query = select(Device).order_by(Device.device_id)
        if not t.all:
            conditions = []
            if t.profiles:
                conditions.append(col(Device.profile).in_(t.profiles))
            if t.device_ids:
                conditions.append(col(Device.device_id).in_(t.device_ids))
            if t.tags:
                conditions.append(col(Device.device_id).in_(
                    select(DeviceTag.device_id).where(col(DeviceTag.tag).in_(t.tags))))
            if not conditions:
                return []
            from sqlalchemy import or_

            query = query.where(or_(*conditions))
        return list(session.exec(query))

    @staticmethod
    def _read(session: Session, record: DeploymentRecord) -> DeploymentRead:
        targets = list(session.exec(select(DeploymentTargetRecord).where(
            DeploymentTargetRecord.deployment_id == record.id).order_by(
            col(DeploymentTargetRecord.wave), col(DeploymentTargetRecord.device_id))))
        counts: dict[str, int] = {}
        for t in targets:
            counts[t.status] = counts.get(t.status, 0) + 1
        assert record.id is not None
        model = session.get(ModelVersionRecord, record.model_version)
        return DeploymentRead(
            id=record.id, model_version=record.model_version, release=model.release if model else 0,
            rollback=record.rollback, status=record.status, reason=record.reason,
            waves=record.waves, current_wave=record.current_wave, failure_threshold=record.failure_threshold,
            created_at=as_utc(record.created_at) or utcnow(), updated_at=as_utc(record.updated_at) or utcnow(),
            counts=counts,
            targets=[TargetRead(device_id=t.device_id, wave=t.wave, variant=t.variant, status=t.status,
                                reason=t.reason, command_id=t.command_id) for t in targets],
        )


def _to_dict(data: DeploymentCreate) -> dict[str, object]:
    import msgspec

    return msgspec.to_builtins(data.targets)  # type: ignore[no-any-return]
