"""Rollouts: desired model per device, `deploy_model` commands wave by wave, progress from the devices' acks.

A deployment is a desired state: the model each target device should run. A device is sent its command when
it is online and its wave has come (an offline device's target stays ``pending``, not failed), and its target
follows what the device reports: its ack, or the active model in its retained state (so a device that
installed the model while it was recorded ``timed_out`` still turns ``succeeded``). A wave waits only for
reachable devices; an optional deadline ends the waiting (``timed_out``, not counted as a failure). Operators
pause, resume, cancel and roll back; a newer deployment to a device supersedes the older one's unfinished
target. States and transitions: docs/architecture.md, "Rollouts".

A deployment issues one signed :class:`~agent.manifest.Release` per variant it sends (release number, task,
device classes, deployment id, expiry, rollback flag) and one download token per device, sent only in that
device's command: the database keeps its SHA-256, the command table keeps the command without it. A token
opens the release and artifact of its own deployment and variant only, and only while the deployment runs and
its release has not expired. Cancelling a deployment, or superseding one device's target, withdraws the
command that way: a device that gets it later (from its broker session) cannot download, and answers with
an error that the target records without turning ``failed``. A paused deployment keeps its tokens open: the
devices it already sent to may finish; it sends nothing new until resumed.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import msgspec
import structlog
from sqlalchemy import Engine, or_
from sqlmodel import Session, col, select

from agent import protocol as wire
from agent.manifest import Release, decode_signed
from controlplane._errors import Conflict, InvalidInput, NotFound
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
from controlplane.deployments.schemas import DeploymentCreate, DeploymentRead, TargetRead, Targets
from controlplane.devices.publisher import CommandPublisher
from controlplane.statuses import CommandStatus, DeploymentStatus, ModelVersionStatus, TargetStatus
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
        if not deployment.status.active:
            return f"deployment {deployment.id} is {deployment.status}: its download tokens have expired"
        if target.status in (TargetStatus.CANCELLED, TargetStatus.SUPERSEDED):
            return (f"deployment {deployment.id}'s command to {target.device_id} was {target.status} "
                    f"({target.reason}): its download token is withdrawn")
        release = session.get(DeploymentReleaseRecord, (deployment_id, variant))
        if release is None or (as_utc(release.expires_at) or utcnow()) <= utcnow():
            return "the token has expired"
        return None


# The agent's answer to a deploy_model that arrives while it is still installing another one: not a failure of
# this model, the command is sent again (after this pause).
_BUSY_REASON = "another model deployment is in progress"
_BUSY_RETRY_S = 5.0
_RECONCILE_LIMIT = 50  # timed_out or halted deployments whose timed_out targets follow their devices (newest)


def _online(device: Device | None) -> bool:
    return device is not None and device.online


def _reports(device: Device | None, model_version: str, variant: str | None) -> bool:
    """The device's retained state says this model (and variant) is active."""
    state = (device.reported_state or {}) if device is not None else {}
    return state.get("active_model") == model_version and (variant is None or state.get("active_variant") == variant)


def _connected_at(device: Device | None) -> datetime | None:
    """When the device last announced itself online (its state message's own timestamp)."""
    ts = ((device.reported_state or {}) if device is not None else {}).get("ts")
    return datetime.fromtimestamp(ts, UTC) if isinstance(ts, int | float) and ts > 0 else None


def _absent(device: Device | None) -> str:
    if device is None:
        return "not enrolled any more"
    if device.last_seen is None:
        return "offline: never connected"
    return f"offline since {as_utc(device.last_seen).isoformat(timespec='seconds')}"


class DeploymentService:
    def __init__(self, engine: Engine, models: ModelService, publisher: CommandPublisher | None,
                 signer: Signer) -> None:
        self.engine = engine
        self.models = models
        self.publisher = publisher
        self.signer = signer
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # The progress loop and the operators' actions change the same rows: one at a time (re-entrant: create
        # runs a step, rollback runs create).
        self._lock = threading.RLock()

    # -- API -------------------------------------------------------------------------------------------------
    def create(self, data: DeploymentCreate, *, rollback_of: int | None = None) -> DeploymentRead:
        if data.waves != sorted(data.waves) or data.waves[-1] != 100:
            raise InvalidInput(f"waves must be increasing cumulative percentages ending at 100, got {data.waves}")
        now = utcnow()
        if data.deadline_s is not None and data.deadline is not None:
            raise InvalidInput("give either deadline_s or deadline, not both")
        deadline_at = now + timedelta(seconds=data.deadline_s) if data.deadline_s is not None else None
        if data.deadline is not None:
            if data.deadline.tzinfo is None:
                raise InvalidInput(f"deadline {data.deadline.isoformat()} needs a time zone (e.g. a trailing Z)")
            if data.deadline <= now:
                raise InvalidInput(f"deadline {data.deadline.isoformat()} is in the past")
            deadline_at = data.deadline
        model = self.models.get(data.model_version)
        if model.status != ModelVersionStatus.READY:
            raise InvalidInput(f"model '{data.model_version}' is {model.status}, not ready to deploy")
        published = self.models.published(data.model_version)
        with self._lock, Session(self.engine) as session:
            highest = self._highest_deployed(session)
            if highest is not None and model.release < highest[0] and not data.rollback:
                raise InvalidInput(
                    f"model '{data.model_version}' is release {model.release}, lower than release {highest[0]} "
                    f"('{highest[1]}') already deployed: going back needs \"rollback\": true")
            devices: list[Device] = self._resolve(session, data.targets)
            if not devices:
                raise InvalidInput("the targets match no enrolled device")
            record = DeploymentRecord(model_version=data.model_version, targets=_to_dict(data), waves=data.waves,
                                      failure_threshold=data.failure_threshold, wave_timeout_s=data.wave_timeout_s,
                                      rollback=data.rollback, rollback_of=rollback_of, deadline_at=deadline_at,
                                      status=DeploymentStatus.RUNNING, created_at=now, updated_at=now)
            session.add(record)
            session.flush()
            assert record.id is not None
            total = len(devices)
            bounds = [math.ceil(total * p / 100) for p in data.waves]
            classes: dict[str, set[str]] = {}  # variant -> the device classes (profiles) it is sent to
            taking_over = []
            for index, device in enumerate(devices):
                wave = next(i for i, bound in enumerate(bounds) if index < bound)
                try:
                    variant, reason = choose_variant(get_profile(device.profile), published)
                except ProfileError as exc:
                    variant, reason = None, str(exc)
                if variant:
                    classes.setdefault(variant, set()).add(device.profile)
                    taking_over.append(device.device_id)
                session.add(DeploymentTargetRecord(
                    deployment_id=record.id, device_id=device.device_id, wave=wave, variant=variant,
                    previous_model=(device.reported_state or {}).get("active_model"),
                    status=TargetStatus.PENDING if variant else TargetStatus.SKIPPED,
                    reason=None if variant else reason))
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
            self._supersede(session, record.id, taking_over, now)
            session.commit()
            deployment_id = record.id
            log.info("deployment.created", deployment_id=deployment_id, model_version=data.model_version,
                     release=model.release, rollback=data.rollback, devices=len(devices), deadline=deadline_at)
            self.step()
        return self.get(deployment_id)

    def get(self, deployment_id: int) -> DeploymentRead:
        with Session(self.engine) as session:
            return self._read(session, self._record(session, deployment_id))

    def list_all(self) -> list[DeploymentRead]:
        with Session(self.engine) as session:
            rows = session.exec(select(DeploymentRecord).order_by(col(DeploymentRecord.id).desc()))
            return [self._read(session, r) for r in rows]

    # -- operators' actions ----------------------------------------------------------------------------------
    def pause(self, deployment_id: int) -> DeploymentRead:
        """Send nothing new; devices already sent to may finish (their tokens stay open)."""
        with self._lock, Session(self.engine) as session:
            record = self._record(session, deployment_id)
            if record.status != DeploymentStatus.RUNNING:
                raise Conflict(f"deployment {deployment_id} is {record.status}: only a running deployment can be "
                               f"paused")
            record.status, record.reason, record.updated_at = DeploymentStatus.PAUSED, "paused by an operator", utcnow()
            session.add(record)
            session.commit()
        log.info("deployment.paused", deployment_id=deployment_id)
        return self.get(deployment_id)

    def resume(self, deployment_id: int) -> DeploymentRead:
        with self._lock, Session(self.engine) as session:
            record = self._record(session, deployment_id)
            if record.status != DeploymentStatus.PAUSED:
                raise Conflict(f"deployment {deployment_id} is {record.status}: only a paused deployment can be "
                               f"resumed")
            record.status, record.reason, record.updated_at = DeploymentStatus.RUNNING, None, utcnow()
            session.add(record)
            session.commit()
            log.info("deployment.resumed", deployment_id=deployment_id)
            self.step()
        return self.get(deployment_id)

    def cancel(self, deployment_id: int) -> DeploymentRead:
        """Stop the rollout: unfinished targets are cancelled and every download token closes, so a device
        that receives the command later (from its broker session) cannot install it."""
        with self._lock, Session(self.engine) as session:
            record = self._record(session, deployment_id)
            if not record.status.active:
                raise Conflict(f"deployment {deployment_id} is already {record.status}: only a running or paused "
                               f"deployment can be cancelled")
            self._cancel(session, record, utcnow())
            session.commit()
        return self.get(deployment_id)

    def rollback(self, deployment_id: int) -> list[DeploymentRead]:
        """Re-deploy, to each device that installed this deployment's model, the model it ran before, signed as
        a rollback (one new deployment per previous model). A running or paused deployment is cancelled first."""
        with self._lock, Session(self.engine) as session:
            record = self._record(session, deployment_id)
            now = utcnow()
            if record.status.active:
                self._cancel(session, record, now)
            targets = list(session.exec(select(DeploymentTargetRecord).where(
                DeploymentTargetRecord.deployment_id == deployment_id,
                col(DeploymentTargetRecord.status).in_((TargetStatus.SUCCEEDED, TargetStatus.SUSPECT)))))
            devices = self._devices(session, [t.device_id for t in targets])
            groups: dict[str, list[str]] = {}
            left_out = []
            for target in targets:
                active = ((devices[target.device_id].reported_state or {}).get("active_model")
                          if target.device_id in devices else None)
                previous = target.previous_model
                if active is not None and active != record.model_version:
                    left_out.append(f"{target.device_id}: runs {active} now")
                elif previous is None:
                    left_out.append(f"{target.device_id}: no previous model known")
                elif (prior := session.get(ModelVersionRecord, previous)) is None \
                        or prior.status != ModelVersionStatus.READY:
                    left_out.append(f"{target.device_id}: its previous model {previous} is not in the registry")
                else:
                    groups.setdefault(previous, []).append(target.device_id)
            session.commit()  # the cancellation, even when nothing can be rolled back
            if not groups:
                why = "; ".join(left_out) if left_out else f"no device installed {record.model_version}"
                raise Conflict(f"deployment {deployment_id}: nothing to roll back ({why})")
            created = [self.create(DeploymentCreate(
                model_version=previous, targets=Targets(device_ids=sorted(ids)), failure_threshold=1.0,
                wave_timeout_s=record.wave_timeout_s, rollback=True), rollback_of=deployment_id)
                for previous, ids in sorted(groups.items())]
            record = self._record(session, deployment_id)
            note = "rolled back by deployment " + ", ".join(str(c.id) for c in created)
            if left_out:
                note += " (left out: " + "; ".join(left_out) + ")"
            record.reason = f"{record.reason}; {note}" if record.reason else note
            record.updated_at = utcnow()
            session.add(record)
            session.commit()
            log.info("deployment.rolled_back", deployment_id=deployment_id, by=[c.id for c in created])
        return created

    def _cancel(self, session: Session, record: DeploymentRecord, now: datetime) -> None:
        unfinished = [t for t in self._unfinished(session, record.id) if not self._settle(session, t, now)]
        for target in unfinished:
            target.status, target.finished_at = TargetStatus.CANCELLED, now
            target.reason = (f"deployment {record.id} cancelled"
                             + (" before the device answered" if target.command_id else " before it was sent"))
            session.add(target)
        record.status, record.updated_at = DeploymentStatus.CANCELLED, now
        record.reason = f"cancelled by an operator; {len(unfinished)} unfinished device(s) cancelled"
        session.add(record)
        log.info("deployment.cancelled", deployment_id=record.id, unfinished=len(unfinished))

    @staticmethod
    def _settle(session: Session, target: DeploymentTargetRecord, now: datetime) -> bool:
        """Record an answer the device gave before the progress loop collected it; True if it finished the
        target (a cancel or supersede must not overwrite what the device already did)."""
        command = session.get(CommandRecord, target.command_id) if target.command_id else None
        if command is None or command.status == CommandStatus.PENDING or _BUSY_REASON in (command.reason or ""):
            return False
        target.status = TargetStatus.SUCCEEDED if command.status == CommandStatus.OK else TargetStatus.FAILED
        target.reason, target.finished_at = command.reason, now
        session.add(target)
        return True

    def _supersede(self, session: Session, deployment_id: int, device_ids: list[str], now: datetime) -> None:
        """The unfinished targets of older active deployments on these devices give way to the new one; an older
        deployment left with no unfinished target ends superseded."""
        if not device_ids:
            return
        older = list(session.exec(
            select(DeploymentTargetRecord)
            .join(DeploymentRecord, col(DeploymentRecord.id) == col(DeploymentTargetRecord.deployment_id))
            .where(col(DeploymentTargetRecord.device_id).in_(device_ids),
                   col(DeploymentTargetRecord.deployment_id) != deployment_id,
                   col(DeploymentTargetRecord.status).in_((TargetStatus.PENDING, TargetStatus.SENT)),
                   col(DeploymentRecord.status).in_((DeploymentStatus.RUNNING, DeploymentStatus.PAUSED)))))
        for target in older:
            if self._settle(session, target, now):
                continue
            target.status, target.finished_at = TargetStatus.SUPERSEDED, now
            target.reason = f"superseded by deployment {deployment_id}"
            session.add(target)
        session.flush()
        for old_id in sorted({t.deployment_id for t in older}):
            if self._unfinished(session, old_id):
                continue
            record = self._record(session, old_id)
            record.status, record.updated_at = DeploymentStatus.SUPERSEDED, now
            record.reason = f"superseded by deployment {deployment_id}: " + self._summary(session, old_id)
            session.add(record)
            log.info("deployment.superseded", deployment_id=old_id, by=deployment_id)

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
        """Advance every running or paused deployment, follow late answers of finished ones, watch fresh ones."""
        # Objects stay loaded across the commits that precede each command (see _send).
        with self._lock, Session(self.engine, expire_on_commit=False) as session:
            now = utcnow()
            active = list(session.exec(select(DeploymentRecord).where(
                col(DeploymentRecord.status).in_((DeploymentStatus.RUNNING, DeploymentStatus.PAUSED)))))
            for record in active:
                self._advance(session, record, now)
            self._follow_late_answers(session, now)
            # Succeeded is not the end: the devices' predictions with the new model are watched for a while.
            since = now - timedelta(seconds=_quality.WATCH_S)
            for record in session.exec(select(DeploymentRecord).where(
                    col(DeploymentRecord.status).in_((DeploymentStatus.SUCCEEDED, DeploymentStatus.SUSPECT)))
                    .order_by(col(DeploymentRecord.id).desc()).limit(20)):
                if (as_utc(record.updated_at) or since) > since:
                    self._watch(session, record)
            session.commit()

    def _watch(self, session: Session, record: DeploymentRecord) -> None:
        """Report updated devices whose predictions with the new model look wrong (see _quality) as suspect."""
        gate = {a.variant: a.accuracy for a in session.exec(select(ModelArtifactRecord).where(
            ModelArtifactRecord.model_version == record.model_version))}
        targets = list(session.exec(select(DeploymentTargetRecord).where(
            DeploymentTargetRecord.deployment_id == record.id,
            DeploymentTargetRecord.status == TargetStatus.SUCCEEDED)))
        suspects = []
        for target in targets:
            reason = _quality.suspect_reason(session, target.device_id, record.model_version,
                                             gate_accuracy=gate.get(target.variant or ""))
            if reason is not None:
                target.status, target.reason = TargetStatus.SUSPECT, reason
                session.add(target)
                suspects.append(target)
                log.warning("deployment.suspect_device", deployment_id=record.id, device_id=target.device_id,
                            reason=reason)
        if suspects:
            every = list(session.exec(select(DeploymentTargetRecord).where(
                DeploymentTargetRecord.deployment_id == record.id,
                DeploymentTargetRecord.status == TargetStatus.SUSPECT)))
            record.status = DeploymentStatus.SUSPECT
            record.reason = (f"installed, but {len(every)} device(s) predict suspiciously with the new model: "
                             + "; ".join(f"{t.device_id}: {t.reason}" for t in every[:5]))
            record.updated_at = utcnow()
            session.add(record)

    def _advance(self, session: Session, record: DeploymentRecord, now: datetime) -> None:
        assert record.id is not None
        targets = list(session.exec(select(DeploymentTargetRecord).where(
            DeploymentTargetRecord.deployment_id == record.id)))
        devices = self._devices(session, [t.device_id for t in targets if t.status.unfinished])
        sending = record.status == DeploymentStatus.RUNNING
        for target in targets:
            device = devices.get(target.device_id)
            if target.status == TargetStatus.SENT:
                self._collect(session, record, target, device, now)
            elif target.status == TargetStatus.PENDING:
                if not _online(device):
                    reason = _absent(device)
                elif not sending or target.wave > record.current_wave:
                    reason = "paused" if not sending else f"waiting for wave {target.wave + 1}"
                elif target.sent_at is not None and now - as_utc(target.sent_at) < timedelta(seconds=_BUSY_RETRY_S):
                    continue  # the device was busy with another deployment: sent again shortly
                else:
                    self._send(session, record, target, now)
                    session.add(target)
                    continue
                if target.reason != reason:
                    target.reason = reason
                    session.add(target)
        # A device that got its command while online may come back much later and fetch the release only then:
        # keep the releases of a waiting deployment from lapsing (an expired release would fail the device).
        for variant in sorted({t.variant for t in targets if t.variant and t.status.unfinished}):
            self._renew_release(session, record, variant, now)
        deadline = as_utc(record.deadline_at)
        if deadline is not None and now >= deadline:
            for target in targets:
                if target.status.unfinished:
                    device = devices.get(target.device_id)
                    target.reason = (f"{_absent(device)} (deadline passed)" if not _online(device) else
                                     "no answer by the deadline" if target.status == TargetStatus.SENT else
                                     f"not sent by the deadline ({target.reason})")
                    target.status, target.finished_at = TargetStatus.TIMED_OUT, now
                    session.add(target)
            self._finish(session, record, targets, now)
            return
        if not sending:
            return
        wave = [t for t in targets if t.wave == record.current_wave]
        unfinished = [t for t in wave if t.status.unfinished]
        if any(_online(devices.get(t.device_id)) for t in unfinished):
            return  # a reachable device has yet to answer
        if unfinished and not any(t.status.answered for t in wave):
            reason = f"wave {record.current_wave + 1}: waiting for {len(unfinished)} offline device(s)"
            if record.reason != reason:
                record.reason, record.updated_at = reason, now
                session.add(record)
            return  # no reachable device in this wave yet: the next wave waits for evidence from this one
        answered = [t for t in targets if t.wave <= record.current_wave and t.status.answered]
        failed = [t for t in answered if t.status == TargetStatus.FAILED]
        if answered and len(failed) / len(answered) > record.failure_threshold:
            record.status = DeploymentStatus.HALTED
            record.reason = (f"wave {record.current_wave + 1}: {len(failed)} of {len(answered)} devices failed "
                             f"(threshold {record.failure_threshold:.0%}): "
                             + "; ".join(f"{t.device_id}: {t.reason}" for t in failed[:5]))
            for target in targets:  # withdrawn: their tokens close with the halt
                if target.status.unfinished:
                    target.reason = (f"deployment {record.id} halted "
                                     + ("before the device answered" if target.command_id else "before it was sent"))
                    target.status, target.finished_at = TargetStatus.CANCELLED, now
                    session.add(target)
            log.warning("deployment.halted", deployment_id=record.id, reason=record.reason)
        elif record.current_wave + 1 < len(record.waves):
            record.current_wave += 1
            record.reason = None
        elif any(t.status.unfinished for t in targets):
            waiting = sum(t.status.unfinished for t in targets)
            reason = f"every wave sent; waiting for {waiting} offline device(s)"
            if record.reason == reason:
                return
            record.reason = reason
        else:
            self._finish(session, record, targets, now)
            return
        record.updated_at = now
        session.add(record)

    def _finish(self, session: Session, record: DeploymentRecord, targets: list[DeploymentTargetRecord],
                now: datetime) -> None:
        """The end of the waiting (every target finished, or the deadline passed): succeeded, halted on failures
        among the devices that answered, or timed_out where devices never answered (not counted as failures)."""
        answered = [t for t in targets if t.status.answered]
        failed = [t for t in answered if t.status == TargetStatus.FAILED]
        timed_out = [t for t in targets if t.status == TargetStatus.TIMED_OUT]
        summary = self._summary(session, record.id)
        if answered and len(failed) / len(answered) > record.failure_threshold:
            record.status = DeploymentStatus.HALTED
            record.reason = (f"{len(failed)} of {len(answered)} devices that answered failed (threshold "
                             f"{record.failure_threshold:.0%}): {summary}; "
                             + "; ".join(f"{t.device_id}: {t.reason}" for t in failed[:5]))
        elif timed_out:
            record.status = DeploymentStatus.TIMED_OUT
            record.reason = f"the deadline passed: {summary}"
        else:
            record.status = DeploymentStatus.SUCCEEDED
            record.reason = summary if failed or any(t.status == TargetStatus.SKIPPED for t in targets) else None
        record.updated_at = now
        session.add(record)
        log.info("deployment.finished", deployment_id=record.id, status=record.status, reason=record.reason)

    @staticmethod
    def _summary(session: Session, deployment_id: int | None) -> str:
        counts: dict[str, int] = {}
        for status in session.exec(select(DeploymentTargetRecord.status).where(
                DeploymentTargetRecord.deployment_id == deployment_id)):
            counts[status] = counts.get(status, 0) + 1
        return ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))

    def _follow_late_answers(self, session: Session, now: datetime) -> None:
        """What devices report after their deployment stopped waiting for them: an ack, or the model active in
        their state. A timed_out, cancelled or superseded target whose device installed the model anyway turns
        succeeded (the record says what the device runs); a refusal of a withdrawn command keeps its status and
        records the device's answer. A timed_out deployment with no timed_out target left is finished again.

        Bounded per step: acks newer than their target's last change (rare), and the timed_out targets of the
        newest timed_out deployments."""
        changed: dict[int, DeploymentRecord] = {}
        acks = session.exec(
            select(DeploymentTargetRecord, DeploymentRecord, CommandRecord)
            .join(DeploymentRecord, col(DeploymentRecord.id) == col(DeploymentTargetRecord.deployment_id))
            .join(CommandRecord, col(CommandRecord.command_id) == col(DeploymentTargetRecord.command_id))
            .where(col(DeploymentRecord.status).not_in((DeploymentStatus.RUNNING, DeploymentStatus.PAUSED)),
                   col(DeploymentTargetRecord.status).in_((TargetStatus.SENT, TargetStatus.TIMED_OUT,
                                                           TargetStatus.CANCELLED, TargetStatus.SUPERSEDED)),
                   col(CommandRecord.status) != CommandStatus.PENDING,
                   or_(col(DeploymentTargetRecord.finished_at).is_(None),
                       col(CommandRecord.acked_at) > col(DeploymentTargetRecord.finished_at)))
            .limit(1000))
        for target, record, command in list(acks):
            if command.status == CommandStatus.OK:
                was = target.status
                target.status = TargetStatus.SUCCEEDED
                target.reason = f"installed although the target was {was} ({target.reason})"
            else:
                target.reason = f"{target.reason}; the device answered: {command.reason}"
            target.finished_at = as_utc(command.acked_at) or now
            session.add(target)
            changed[record.id or 0] = record
        timed_out = list(session.exec(
            select(DeploymentTargetRecord, DeploymentRecord)
            .join(DeploymentRecord, col(DeploymentRecord.id) == col(DeploymentTargetRecord.deployment_id))
            .where(col(DeploymentRecord.id).in_(
                       select(DeploymentRecord.id).where(col(DeploymentRecord.status).in_(
                           (DeploymentStatus.TIMED_OUT, DeploymentStatus.HALTED)))
                       .order_by(col(DeploymentRecord.id).desc()).limit(_RECONCILE_LIMIT)),
                   DeploymentTargetRecord.status == TargetStatus.TIMED_OUT)))
        devices = self._devices(session, [t.device_id for t, _ in timed_out])
        for target, record in timed_out:
            if _reports(devices.get(target.device_id), record.model_version, target.variant):
                target.status, target.finished_at = TargetStatus.SUCCEEDED, now
                target.reason = "the device reports the model active (after the deadline)"
                session.add(target)
                changed[record.id or 0] = record
        for record in changed.values():
            if record.status == DeploymentStatus.TIMED_OUT:
                session.flush()
                targets = list(session.exec(select(DeploymentTargetRecord).where(
                    DeploymentTargetRecord.deployment_id == record.id)))
                self._finish(session, record, targets, now)

    def _send(self, session: Session, record: DeploymentRecord, target: DeploymentTargetRecord,
              now: datetime) -> None:
        if self.publisher is None:
            target.status, target.reason = TargetStatus.FAILED, "no broker connection"
            return
        assert target.variant is not None and record.id is not None
        command_id = uuid.uuid4().hex
        token = secrets.token_urlsafe(32)
        args: dict[str, Any] = {
            "model_version": record.model_version, "variant": target.variant, "deployment_id": record.id,
            "manifest_url": release_manifest_url(record.id, target.variant),
            "artifact_url": release_artifact_url(record.id, target.variant)}
        # Committed before the command goes out: the device may download at once. (In the step's own session:
        # a second session would wait on the write locks of the step's flushed changes.)
        self._renew_release(session, record, target.variant, now)
        session.add(CommandRecord(command_id=command_id, device_id=target.device_id,
                                  kind=wire.CommandKind.DEPLOY_MODEL, args=args, created_at=now))
        target.token_hash = _token_hash(token)
        session.add(target)
        session.commit()
        try:
            payload = wire.encode(wire.Command(command_id=command_id, kind=wire.CommandKind.DEPLOY_MODEL,
                                               args={**args, "bearer": token}, ts=time.time()))
            self.publisher.publish(wire.topic(target.device_id, wire.Channel.CMD), payload)
        except Exception as exc:  # noqa: BLE001 - retried on the next step
            log.warning("deployment.send_failed", device_id=target.device_id, error=str(exc))
            return
        target.command_id, target.status, target.sent_at, target.reason = command_id, TargetStatus.SENT, now, None

    def _collect(self, session: Session, record: DeploymentRecord, target: DeploymentTargetRecord,
                 device: Device | None, now: datetime) -> None:
        command = session.get(CommandRecord, target.command_id) if target.command_id else None
        if command is not None and command.status != CommandStatus.PENDING:
            if command.status == CommandStatus.OK:
                target.status, target.reason = TargetStatus.SUCCEEDED, command.reason
            elif _BUSY_REASON in (command.reason or ""):
                target.status, target.sent_at = TargetStatus.PENDING, now  # sent again after _BUSY_RETRY_S
                target.reason = f"the device was busy ({command.reason}): sending again"
                session.add(target)
                return
            else:
                target.status, target.reason = TargetStatus.FAILED, command.reason
            target.finished_at = now
            session.add(target)
            return
        if _reports(device, record.model_version, target.variant):
            target.status, target.finished_at = TargetStatus.SUCCEEDED, now
            target.reason = "the device reports the model active"
        elif not _online(device):
            # The broker keeps the command in the device's session: it gets it when it is back.
            reason = f"{_absent(device)}; the command waits in its broker session"
            if target.reason == reason:
                return
            target.reason = reason
        else:
            since = max(as_utc(target.sent_at) or now, _connected_at(device) or now - timedelta(days=365))
            if now - since <= timedelta(seconds=record.wave_timeout_s):
                return
            target.status, target.finished_at = TargetStatus.FAILED, now
            target.reason = f"no answer within the wave timeout ({record.wave_timeout_s:g} s) while online"
        session.add(target)

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
        remaining = max(len(record.waves) - record.current_wave, 1)
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
            .where(col(DeploymentTargetRecord.status).in_((TargetStatus.SENT, TargetStatus.SUCCEEDED,
                                                           TargetStatus.SUSPECT)))
            .order_by(col(ModelVersionRecord.release).desc()).limit(1)).first()
        return (row[0], row[1]) if row else None

    # -- helpers ---------------------------------------------------------------------------------------------
    @staticmethod
    def _record(session: Session, deployment_id: int) -> DeploymentRecord:
        record = session.get(DeploymentRecord, deployment_id)
        if record is None:
            raise NotFound(f"no deployment {deployment_id}")
        return record

    @staticmethod
    def _unfinished(session: Session, deployment_id: int | None) -> list[DeploymentTargetRecord]:
        return list(session.exec(select(DeploymentTargetRecord).where(
            DeploymentTargetRecord.deployment_id == deployment_id,
            col(DeploymentTargetRecord.status).in_((TargetStatus.PENDING, TargetStatus.SENT)))))

    @staticmethod
    def _devices(session: Session, device_ids: list[str]) -> dict[str, Device]:
        found: dict[str, Device] = {}
        for start in range(0, len(device_ids), 1000):
            for device in session.exec(select(Device).where(col(Device.device_id).in_(device_ids[start:start + 1000]))):
                found[device.device_id] = device
        return found

    @staticmethod
    def _resolve(session: Session, t: Targets) -> list[Device]:
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
            rollback_of=record.rollback_of, deadline=as_utc(record.deadline_at),
            waves=record.waves, current_wave=record.current_wave, failure_threshold=record.failure_threshold,
            created_at=as_utc(record.created_at) or utcnow(), updated_at=as_utc(record.updated_at) or utcnow(),
            counts=counts,
            targets=[TargetRead(device_id=t.device_id, wave=t.wave, variant=t.variant, status=t.status,
                                reason=t.reason, command_id=t.command_id, previous_model=t.previous_model)
                     for t in targets],
        )


def _to_dict(data: DeploymentCreate) -> dict[str, object]:
    return msgspec.to_builtins(data.targets)  # type: ignore[no-any-return]
