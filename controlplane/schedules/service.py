"""Round schedules on APScheduler 3, with the job store in the control plane's database.

Jobs survive a control-plane restart (APScheduler's SQLAlchemyJobStore; a missed firing while the control plane was
down runs once on start, within the grace time). One scheduler per control plane: run it in one process only.

A stored job names :func:`fire` (APScheduler stores a job's callable by reference); the service's own executor
hands every due job to the service's ``on_fire`` instead, so no module-level state links the two.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import msgspec
import structlog
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.job import Job
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from controlplane._errors import Conflict, InvalidInput, NotFound
from controlplane.db import ScheduleRecord, as_utc, utcnow
from controlplane.rounds.schemas import RoundCreate
from controlplane.schedules.schemas import ScheduleCreate, ScheduleRead

__all__ = ["ScheduleService", "fire"]

log = structlog.get_logger("edgefleet.schedules")

OnFire = Callable[[str, RoundCreate], None]  # (schedule id, the round to start)


def fire(schedule_id: str, round_json: str) -> None:
    """What a stored job names. A :class:`ScheduleService` runs its jobs through its own executor, which calls the
    service instead; this runs only for a job some other scheduler picked up, and says so."""
    log.error("schedule.fired_without_controlplane", schedule_id=schedule_id)


class _FiringExecutor(ThreadPoolExecutor):  # type: ignore[misc]  # apscheduler ships no type hints
    """Runs a due schedule job as a firing of the service that owns this executor (see :func:`fire`)."""

    def __init__(self, fire_job: Callable[[str, str], None]) -> None:
        super().__init__(max_workers=10)
        self._fire_job = fire_job

    def _do_submit_job(self, job: Job, run_times: list[datetime]) -> None:
        # `job` is this firing's own copy, read back from the job store; what is stored again is its reference.
        job.func = self._fire_job
        super()._do_submit_job(job, run_times)


class ScheduleService:
    def __init__(self, engine: Engine, on_fire: OnFire, validate: Callable[[RoundCreate], None]) -> None:
        self.engine = engine
        self._on_fire = on_fire
        self._validate = validate
        self._scheduler = BackgroundScheduler(
            jobstores={"default": SQLAlchemyJobStore(engine=engine, tablename="apscheduler_jobs")},
            executors={"default": _FiringExecutor(self._fire)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 3600},
            timezone=UTC,
        )

    def _fire(self, schedule_id: str, round_json: str) -> None:
        """A job is due: start a round for the schedule (a stored round that no longer validates, e.g. one written
        before the API's bounds, is logged with the reason and skipped)."""
        try:
            data = msgspec.json.decode(round_json, type=RoundCreate)
        except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
            log.error("schedule.invalid_round", schedule_id=schedule_id, reason=str(exc))
            return
        self._on_fire(schedule_id, data)

    def start(self) -> None:
        self._scheduler.start()
        self._restore_jobs()

    def _restore_jobs(self) -> None:
        """Give a schedule whose stored job is gone its job back (APScheduler drops a stored job it cannot read
        back, e.g. one stored when its callable had another module path), unless it has fired `max_runs` times."""
        known = {job.id for job in self._scheduler.get_jobs()}
        with Session(self.engine) as session:
            records = [r for r in session.exec(select(ScheduleRecord)) if r.id not in known]
        for record in records:
            definition = record.definition
            max_runs = definition.get("max_runs")
            if max_runs is not None and int(definition.get("runs", 0)) >= int(max_runs):
                continue
            try:
                data = msgspec.convert({k: v for k, v in definition.items() if k != "runs"}, ScheduleCreate)
                trigger = _trigger(data)
            except (msgspec.ValidationError, InvalidInput) as exc:
                log.error("schedule.unrestorable", schedule_id=record.id, reason=str(exc))
                continue
            self._scheduler.add_job(fire, trigger, args=[record.id, msgspec.json.encode(data.round).decode()],
                                    id=record.id, replace_existing=True)
            log.info("schedule.restored", schedule_id=record.id)

    def stop(self) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)

    def create(self, data: ScheduleCreate) -> ScheduleRead:
        trigger = _trigger(data)
        self._validate(data.round)
        schedule_id = data.id or uuid.uuid4().hex[:12]
        with Session(self.engine) as session:
            if session.get(ScheduleRecord, schedule_id) is not None:
                raise Conflict(f"schedule '{schedule_id}' exists")
            session.add(ScheduleRecord(id=schedule_id, definition=msgspec.to_builtins(data) | {"id": schedule_id,
                                                                                             "runs": 0},
                                       created_at=utcnow()))
            session.commit()
        self._scheduler.add_job(fire, trigger, args=[schedule_id, msgspec.json.encode(data.round).decode()],
                                id=schedule_id, replace_existing=True)
        log.info("schedule.created", schedule_id=schedule_id)
        return self.get(schedule_id)

    def record_run(self, schedule_id: str) -> None:
        """Count a firing; remove the job once it has fired `max_runs` times."""
        with Session(self.engine) as session:
            record = session.get(ScheduleRecord, schedule_id)
            if record is None:
                return
            runs = int(record.definition.get("runs", 0)) + 1
            record.definition = {**record.definition, "runs": runs}
            session.add(record)
            session.commit()
            max_runs = record.definition.get("max_runs")
        if max_runs is not None and runs >= int(max_runs):
            job = self._scheduler.get_job(schedule_id)
            if job is not None:
                job.remove()

    def get(self, schedule_id: str) -> ScheduleRead:
        with Session(self.engine) as session:
            record = session.get(ScheduleRecord, schedule_id)
            if record is None:
                raise NotFound(f"no schedule '{schedule_id}'")
            return self._read(record)

    def list_all(self) -> list[ScheduleRead]:
        with Session(self.engine) as session:
            return [self._read(r) for r in session.exec(select(ScheduleRecord).order_by(
                col(ScheduleRecord.created_at)))]

    def delete(self, schedule_id: str) -> None:
        with Session(self.engine) as session:
            record = session.get(ScheduleRecord, schedule_id)
            if record is None:
                raise NotFound(f"no schedule '{schedule_id}'")
            session.delete(record)
            session.commit()
        job = self._scheduler.get_job(schedule_id)
        if job is not None:
            job.remove()

    def _read(self, record: ScheduleRecord) -> ScheduleRead:
        definition: dict[str, Any] = record.definition
        job = self._scheduler.get_job(record.id)
        # A job added before the scheduler started (run_scheduler off) has no next run time yet: None.
        next_run: datetime | None = getattr(job, "next_run_time", None)
        created = as_utc(record.created_at)
        return ScheduleRead(id=record.id, cron=definition.get("cron"), interval_s=definition.get("interval_s"),
                            max_runs=definition.get("max_runs"), runs=int(definition.get("runs", 0)),
                            next_run_time=next_run, round=definition.get("round", {}), created_at=created)


def _trigger(data: ScheduleCreate) -> BaseTrigger:
    if (data.cron is None) == (data.interval_s is None):
        raise InvalidInput("give exactly one of 'cron' (e.g. \"0 2 * * *\") or 'interval_s'")
    if data.cron is not None:
        try:
            return CronTrigger.from_crontab(data.cron, timezone=UTC)
        except ValueError as exc:
            raise InvalidInput(f"invalid cron expression {data.cron!r}: {exc}") from None
    assert data.interval_s is not None
    return IntervalTrigger(seconds=data.interval_s, timezone=UTC)
