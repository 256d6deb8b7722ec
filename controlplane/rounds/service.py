"""Federated rounds: plan (eligibility, invitations), run (Flower), record, then publish the result through the
model pipeline (build → gate → sign → register → (deploy)), directly or after a burst step."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import msgspec
import structlog
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from controlplane._errors import InvalidInput, NotFound
from controlplane.burst.service import JobService, JobServiceStopped
from controlplane.db import Device, RoundRecord, as_utc, utcnow
from controlplane.pipeline import ModelPipeline, round_version
from controlplane.rounds.eligibility import decide, invite_count
from controlplane.rounds.schemas import RoundCreate, RoundDrop, RoundRead
from controlplane.statuses import JobStatus, ModelSource, RoundStatus
from firmware_profiles import ProfileError, get_profile

__all__ = ["RoundOutcome", "RoundRunner", "RoundService", "final_drops"]

log = structlog.get_logger("edgefleet.rounds")


NO_DROP_REASON = "no reason recorded"  # a round recorded before the ServerApp's drop reasons were kept


def final_drops(metrics: list[dict[str, Any]]) -> dict[str, RoundDrop]:
    """Devices whose last appearance in a run's Flower rounds is a drop, from its per-round metrics.

    A device that dropped out of a round and contributed to a later one finished the run: it is not listed.
    The reasons are the ServerApp's per-round ``drop_reasons`` (as the runner may have corrected them).
    """
    drops: dict[str, RoundDrop] = {}
    contributed: dict[str, list[int]] = {}
    for entry in sorted((m for m in metrics if int(m.get("round") or 0) >= 1), key=lambda m: int(m["round"])):
        rnd = int(entry["round"])
        for device_id in entry.get("participants") or []:
            contributed.setdefault(device_id, []).append(rnd)
            drops.pop(device_id, None)
        reasons = entry.get("drop_reasons") or {}
        for device_id in entry.get("dropped") or []:
            drops[device_id] = RoundDrop(round=rnd, reason=str(reasons.get(device_id) or NO_DROP_REASON),
                                         contributed=[])
    for device_id, drop in drops.items():
        drop.contributed = [r for r in contributed.get(device_id, []) if r < drop.round]
    return dict(sorted(drops.items()))


class RoundOutcome(msgspec.Struct):
    """What a finished federated run hands back."""

    ok: bool
    reason: str | None = None
    metrics: list[dict[str, Any]] = msgspec.field(default_factory=list)
    participants: list[str] = msgspec.field(default_factory=list)
    # device -> why it dropped out, for devices that never contributed (those that did and then dropped out: the
    # metrics' drop_reasons, see final_drops)
    dropped: dict[str, str] = msgspec.field(default_factory=dict)
    refused: dict[str, str] = msgspec.field(default_factory=dict)  # device -> the reason its agent declined
    weights_path: str | None = None  # .npz of the global model's state_dict


class RoundRunner(Protocol):
    """Runs the Flower side of a round among the invited devices (blocking)."""

    def run(self, round_id: int, data: RoundCreate, invited: list[str],
            initial_weights: Path | None = None) -> RoundOutcome: ...


class RoundService:
    def __init__(self, engine: Engine, runner: RoundRunner | None, pipeline: ModelPipeline | None = None,
                 jobs: JobService | None = None) -> None:
        self.engine = engine
        self.runner = runner
        self.pipeline = pipeline  # publishes a round's result (none: rounds build nothing)
        self.jobs = jobs  # runs a round's burst step
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()

    def stop(self) -> None:
        """Before the SuperLink and the database go: rounds in flight stay recorded as running (see recover())."""
        self._stopping.set()

    def validate(self, data: RoundCreate) -> None:
        """Refuse what cannot run: a task this control plane does not register (the name never imports code:
        see federated.tasks), client bounds, a burst step that cannot run here."""
        from federated.tasks import TaskNotFound, get_task

        try:
            get_task(data.task)
        except TaskNotFound as exc:
            raise InvalidInput(str(exc)) from None
        if data.max_clients is not None and data.max_clients < data.min_clients:
            raise InvalidInput(f"max_clients {data.max_clients} < min_clients {data.min_clients}")
        if data.initial_model is not None:
            self.initial_weights(data.task, data.initial_model)
        if data.burst is not None:
            if self.jobs is None:
                raise InvalidInput("burst: this control plane runs no burst jobs")
            try:
                self.jobs.check(data.burst.job(data.task, build=data.build, deploy=data.deploy))
            except InvalidInput as exc:
                raise InvalidInput(f"burst: {exc}") from None

    def initial_weights(self, task: str, version: str) -> Path:
        """The weights a round of `task` starts from when it starts from model `version` (InvalidInput if it
        cannot: unknown, of another task, or without stored weights). Where burst jobs find their base model."""
        if self.pipeline is None:
            raise InvalidInput("initial_model: this control plane keeps no model registry")
        try:
            model = self.pipeline.models.get(version)
        except NotFound:
            raise InvalidInput(f"initial_model: no model version {version!r}") from None
        if model.task != task:
            raise InvalidInput(f"initial_model: {version!r} is a model of task {model.task!r}, not {task!r}")
        path = self.pipeline.weights_of(model.version)
        if not path.is_file():
            raise InvalidInput(f"initial_model: {version!r} has no stored weights to start from")
        return path

    def latest_released(self, task: str) -> str | None:
        """The task's newest model version with a published variant (what a schedule starts from)."""
        if self.pipeline is None:
            return None
        released = [m for m in self.pipeline.models.list_all()
                    if m.task == task and any(v.published for v in m.variants)
                    and self.pipeline.weights_of(m.version).is_file()]
        return max(released, key=lambda m: m.release).version if released else None

    def recover(self) -> None:
        """After a restart: a round waiting on its burst job waits again (the job was re-attached); a round whose
        Flower run the restart cut off is failed with that reason, never left running."""
        with Session(self.engine) as session:
            unfinished = col(RoundRecord.status).in_((RoundStatus.PENDING, RoundStatus.RUNNING))
            rows = list(session.exec(select(RoundRecord).where(unfinished)))
        for record in rows:
            assert record.id is not None
            if record.job_id is not None and self.jobs is not None:
                log.info("round.reattached", round_id=record.id, job_id=record.job_id)
                self._spawn(self._resume, record.id, record.job_id)
            else:
                self._update(record.id, status=RoundStatus.FAILED,
                             reason="the control plane restarted during the Flower run", finished=True)

    # -- API -------------------------------------------------------------------------------------------------
    def start(self, data: RoundCreate, schedule_id: str | None = None, *, wait: bool = False) -> RoundRead:
        """Decide who is invited now (and why the others are not), record it, then run in the background.

        A request that does not validate raises InvalidInput; a schedule's firing that does not (its stored task
        is no longer registered, say) is recorded as a failed round with the reason instead. A schedule's round
        without `initial_model` starts from the task's latest released model, if there is one."""
        if schedule_id is not None and data.initial_model is None:
            with contextlib.suppress(InvalidInput, LookupError):
                latest = self.latest_released(data.task)
                if latest is not None:
                    data = msgspec.structs.replace(data, initial_model=latest)
        try:
            self.validate(data)
        except InvalidInput as exc:
            if schedule_id is None:
                raise
            return self._refuse(data, schedule_id, str(exc))
        invited, skipped = self.plan(data)
        with Session(self.engine) as session:
            record = RoundRecord(schedule_id=schedule_id, task=data.task, strategy=data.strategy,
                                 config=msgspec.to_builtins(data), invited=invited, skipped=skipped,
                                 created_at=utcnow())
            if len(invited) < data.min_clients:
                record.status = RoundStatus.FAILED
                record.reason = (f"{len(invited)} eligible device(s), min_clients is {data.min_clients}")
                record.finished_at = utcnow()
            session.add(record)
            session.commit()
            assert record.id is not None
            round_id = record.id
        log.info("round.planned", round_id=round_id, invited=invited, skipped=len(skipped))
        if len(invited) >= data.min_clients:
            thread = self._spawn(self._execute, round_id, data, invited)
            if wait:
                thread.join()
        return self.get(round_id)

    def _refuse(self, data: RoundCreate, schedule_id: str, reason: str) -> RoundRead:
        with Session(self.engine) as session:
            record = RoundRecord(schedule_id=schedule_id, task=data.task, strategy=data.strategy,
                                 config=msgspec.to_builtins(data), status=RoundStatus.FAILED, reason=reason,
                                 created_at=utcnow(), finished_at=utcnow())
            session.add(record)
            session.commit()
            assert record.id is not None
            round_id = record.id
        log.warning("round.refused", round_id=round_id, schedule_id=schedule_id, reason=reason)
        return self.get(round_id)

    def _spawn(self, target: Callable[..., None], round_id: int, *args: Any) -> threading.Thread:
        thread = threading.Thread(target=target, args=(round_id, *args), name=f"round-{round_id}", daemon=True)
        self._threads.append(thread)
        thread.start()
        return thread

    def get(self, round_id: int) -> RoundRead:
        with Session(self.engine) as session:
            record = session.get(RoundRecord, round_id)
            if record is None:
                raise NotFound(f"no round {round_id}")
            return self._read(record)

    def list_all(self, limit: int = 100) -> list[RoundRead]:
        with Session(self.engine) as session:
            rows = session.exec(select(RoundRecord).order_by(col(RoundRecord.id).desc()).limit(limit))
            return [self._read(r) for r in rows]

    def dropout_rate(self, last: int = 20) -> float:
        """Observed share of invited devices that did not take part, over recent finished rounds."""
        with Session(self.engine) as session:
            rows = session.exec(select(RoundRecord).where(RoundRecord.status == RoundStatus.SUCCEEDED)
                                .order_by(col(RoundRecord.id).desc()).limit(last))
            invited = participated = 0
            for r in rows:
                invited += len(r.invited)
                participated += len(r.participants)
        return 0.0 if invited == 0 else max(0.0, 1.0 - participated / invited)

    def plan(self, data: RoundCreate) -> tuple[list[str], dict[str, str]]:
        eligible: list[str] = []
        skipped: dict[str, str] = {}
        with Session(self.engine) as session:
            for device in session.exec(select(Device).order_by(Device.device_id)):
                try:
                    profile = get_profile(device.profile)
                except ProfileError as exc:
                    skipped[device.device_id] = str(exc)
                    continue
                ok, reason = decide(profile, device.online, device.last_telemetry, data.eligibility)
                if ok:
                    eligible.append(device.device_id)
                else:
                    skipped[device.device_id] = reason
        count = invite_count(data.min_clients, len(eligible), self.dropout_rate(), data.max_clients)
        for device_id in eligible[count:]:
            skipped[device_id] = f"eligible, not needed this round (max_clients {data.max_clients})"
        return eligible[:count], skipped

    def wait(self, timeout: float | None = None) -> None:
        for thread in list(self._threads):
            thread.join(timeout)

    # -- execution -------------------------------------------------------------------------------------------
    def _execute(self, round_id: int, data: RoundCreate, invited: list[str]) -> None:
        self._update(round_id, status=RoundStatus.RUNNING)
        try:
            if self.runner is None:
                raise RuntimeError("no federated runtime (install edgefleet[train])")
            weights = None if data.initial_model is None else self.initial_weights(data.task, data.initial_model)
            outcome = self.runner.run(round_id, data, invited, weights)
        except Exception as exc:
            if self._stopping.is_set():
                # The SuperLink went down with the control plane: recover() marks the round on the next start.
                log.info("round.interrupted_by_shutdown", round_id=round_id)
                return
            log.exception("round.failed", round_id=round_id)
            self._update(round_id, status=RoundStatus.FAILED, reason=f"{type(exc).__name__}: {exc}", finished=True)
            return
        skipped_extra = {d: f"dropped out: {why}" for d, why in outcome.dropped.items()}
        skipped_extra.update({d: f"declined the invitation: {why}" for d, why in outcome.refused.items()})
        self._update(round_id, metrics=outcome.metrics, participants=outcome.participants, skipped_extra=skipped_extra)
        if not outcome.ok:
            reason = outcome.reason or "the Flower run failed"
            if outcome.refused and "declined" not in reason:
                reason += f" ({len(outcome.refused)} invited device(s) declined: " + "; ".join(
                    f"{d}: {why}" for d, why in sorted(outcome.refused.items())) + ")"
            self._update(round_id, status=RoundStatus.FAILED, reason=reason, finished=True)
            return
        version = None
        try:
            if data.burst is not None:
                version = self._burst_step(round_id, data, outcome)
            elif data.build and self.pipeline is not None:
                version = self._publish(round_id, data, outcome)
        except _BurstStepFailed as exc:
            self._update(round_id, status=RoundStatus.FAILED, reason=str(exc), finished=True)
            return
        except JobServiceStopped:
            return  # shutting down: the round stays running with its job, and recover() picks it up again
        except Exception as exc:
            log.exception("round.build_failed", round_id=round_id)
            self._update(round_id, status=RoundStatus.FAILED, reason=f"build failed: {exc}", finished=True)
            return
        self._update(round_id, status=RoundStatus.SUCCEEDED, model_version=version, finished=True)
        log.info("round.succeeded", round_id=round_id, model_version=version)

    def _publish(self, round_id: int, data: RoundCreate, outcome: RoundOutcome) -> str:
        assert self.pipeline is not None
        if outcome.weights_path is None:
            raise RuntimeError("the round returned no weights")
        return self.pipeline.publish(weights=Path(outcome.weights_path), task=data.task, name=round_version(round_id),
                                     source=ModelSource.ROUND, source_id=str(round_id), deploy=data.deploy)

    def _burst_step(self, round_id: int, data: RoundCreate, outcome: RoundOutcome) -> str | None:
        """The round's result goes through a burst job (e.g. QAT) whose output is what gets built and signed."""
        assert data.burst is not None
        if self.jobs is None or outcome.weights_path is None:
            raise _BurstStepFailed("burst step: no job service or no weights from the Flower run")
        try:
            job = self.jobs.submit(data.burst.job(data.task, build=data.build, deploy=data.deploy),
                                   base_weights=Path(outcome.weights_path), round_id=round_id)
        except Exception as exc:
            raise _BurstStepFailed(f"burst step could not be submitted: {exc}") from exc
        self._update(round_id, job_id=job.id)
        log.info("round.burst_step", round_id=round_id, job_id=job.id, kind=job.kind, placement=job.placement)
        return self._await_job(job.id)

    def _await_job(self, job_id: int) -> str | None:
        assert self.jobs is not None
        job = self.jobs.wait(job_id)
        if job.status is not JobStatus.SUCCEEDED:
            raise _BurstStepFailed(f"burst step (job {job_id}, {job.kind}) {job.status}: {job.reason}")
        return job.model_version

    def _resume(self, round_id: int, job_id: int) -> None:
        try:
            version = self._await_job(job_id)
        except JobServiceStopped:
            return
        except (_BurstStepFailed, NotFound) as exc:
            self._update(round_id, status=RoundStatus.FAILED, reason=str(exc), finished=True)
            return
        self._update(round_id, status=RoundStatus.SUCCEEDED, model_version=version, finished=True)
        log.info("round.succeeded", round_id=round_id, model_version=version)

    def _update(self, round_id: int, *, status: RoundStatus | None = None, reason: str | None = None,
                metrics: list[dict[str, Any]] | None = None, participants: list[str] | None = None,
                skipped_extra: dict[str, str] | None = None, model_version: str | None = None,
                job_id: int | None = None, finished: bool = False) -> None:
        with Session(self.engine) as session:
            record = session.get(RoundRecord, round_id)
            assert record is not None
            if status is not None:
                record.status = status
            if reason is not None:
                record.reason = reason
            if metrics is not None:
                record.metrics = metrics
            if participants is not None:
                record.participants = participants
            if skipped_extra:
                record.skipped = {**record.skipped, **skipped_extra}
            if model_version is not None:
                record.model_version = model_version
            if job_id is not None:
                record.job_id = job_id
            if finished:
                record.finished_at = utcnow()
            session.add(record)
            session.commit()

    @staticmethod
    def _read(record: RoundRecord) -> RoundRead:
        assert record.id is not None
        return RoundRead(id=record.id, schedule_id=record.schedule_id, task=record.task, strategy=record.strategy,
                         status=record.status, reason=record.reason, config=record.config, invited=record.invited,
                         participants=record.participants, skipped=record.skipped,
                         dropped=final_drops(record.metrics), metrics=record.metrics,
                         model_version=record.model_version, initial_model=record.config.get("initial_model"),
                         job_id=record.job_id,
                         created_at=as_utc(record.created_at) or utcnow(),
                         finished_at=as_utc(record.finished_at))


class _BurstStepFailed(RuntimeError):
    """The round's burst job did not produce a model (its reason is the round's)."""
