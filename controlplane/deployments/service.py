"""Rollouts: desired model per device, `deploy_model` commands wave by wave, progress from the devices' acks."""

from __future__ import annotations

import math
import secrets
import threading
import time
import uuid
from datetime import datetime, timedelta

import structlog
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from agent import protocol as wire
from controlplane._errors import InvalidInput, NotFound
from controlplane.db import (
    CommandRecord,
    DeploymentRecord,
    DeploymentTargetRecord,
    Device,
    DeviceTag,
    ModelArtifactRecord,
    as_utc,
    utcnow,
)
from controlplane.deployments.schemas import DeploymentCreate, DeploymentRead, TargetRead
from controlplane.devices.publisher import CommandPublisher
from controlplane.models.service import ModelService, artifact_url, manifest_url
from firmware_profiles import ModelVariant, Profile, ProfileError, get_profile, variant_unsupported

__all__ = ["DeploymentService", "choose_variant", "download_token_valid"]

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


def download_token_valid(engine: Engine, version: str, token: str) -> bool:
    with Session(engine) as session:
        row = session.exec(select(DeploymentRecord.id).where(
            DeploymentRecord.model_version == version, DeploymentRecord.download_token == token)).first()
        return row is not None


class DeploymentService:
    def __init__(self, engine: Engine, models: ModelService, publisher: CommandPublisher | None) -> None:
        self.engine = engine
        self.models = models
        self.publisher = publisher
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
            devices: list[Device] = self._resolve(session, data)
            if not devices:
                raise InvalidInput("the targets match no enrolled device")
            now = utcnow()
            record = DeploymentRecord(model_version=data.model_version, targets=_to_dict(data), waves=data.waves,
                                      failure_threshold=data.failure_threshold, wave_timeout_s=data.wave_timeout_s,
                                      download_token=secrets.token_urlsafe(24), created_at=now, updated_at=now)
            session.add(record)
            session.flush()
            assert record.id is not None
            total = len(devices)
            bounds = [math.ceil(total * p / 100) for p in data.waves]
            for index, device in enumerate(devices):
                wave = next(i for i, bound in enumerate(bounds) if index < bound)
                try:
                    variant, reason = choose_variant(get_profile(device.profile), published)
                except ProfileError as exc:
                    variant, reason = None, str(exc)
                session.add(DeploymentTargetRecord(
                    deployment_id=record.id, device_id=device.device_id, wave=wave, variant=variant,
                    status="waiting" if variant else "skipped", reason=None if variant else reason))
            session.commit()
            deployment_id = record.id
        log.info("deployment.created", deployment_id=deployment_id, model_version=data.model_version,
                 devices=len(devices))
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
            session.commit()

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
        assert target.variant is not None
        command_id = uuid.uuid4().hex
        args = {"model_version": record.model_version, "variant": target.variant,
                "manifest_url": manifest_url(record.model_version, target.variant),
                "artifact_url": artifact_url(record.model_version, target.variant),
                "bearer": record.download_token}
        with Session(self.engine) as cmd_session:
            cmd_session.add(CommandRecord(command_id=command_id, device_id=target.device_id,
                                          kind=wire.CommandKind.DEPLOY_MODEL, args=args, created_at=now))
            cmd_session.commit()
        try:
            payload = wire.encode(wire.Command(command_id=command_id, kind=wire.CommandKind.DEPLOY_MODEL,
                                               args=args, ts=time.time()))
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
        return DeploymentRead(
            id=record.id, model_version=record.model_version, status=record.status, reason=record.reason,
            waves=record.waves, current_wave=record.current_wave, failure_threshold=record.failure_threshold,
            created_at=as_utc(record.created_at) or utcnow(), updated_at=as_utc(record.updated_at) or utcnow(),
            counts=counts,
            targets=[TargetRead(device_id=t.device_id, wave=t.wave, variant=t.variant, status=t.status,
                                reason=t.reason, command_id=t.command_id) for t in targets],
        )


def _to_dict(data: DeploymentCreate) -> dict[str, object]:
    import msgspec

    return msgspec.to_builtins(data.targets)  # type: ignore[no-any-return]
