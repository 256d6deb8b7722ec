"""Burst jobs: placement decision, submission, monitoring (progress, logs, timeouts), result → build → model."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import structlog
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from controlplane._errors import Conflict, InvalidInput, NotFound
from controlplane.burst.backends import LOG_WINDOW, Backend
from controlplane.burst.schemas import JobCreate, JobRead, Placement
from controlplane.db import Device, JobRecord, as_utc, utcnow
from controlplane.models.service import ModelService
from controlplane.pipeline import ModelPipeline, burst_version
from controlplane.statuses import JobStatus, ModelSource
from firmware_profiles import ProfileError, get_profile

__all__ = ["JobService", "JobServiceStopped", "decide_placement"]

log = structlog.get_logger("edgefleet.jobs")

PROGRESS_PREFIX = "EDGEFLEET_PROGRESS "
_ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING)
_ENDED = ("SUCCEEDED", "FAILED", "STOPPED")  # backend states


class JobServiceStopped(RuntimeError):
    """The control plane is shutting down: whoever waits on a job stops waiting (the job itself goes on)."""


def decide_placement(data: JobCreate, cost: dict[str, Any], budgets: dict[str, Any]) -> tuple[Placement, str]:
    """(burst | local, reason). Accelerators or a cost beyond every device class's training budget → burst."""
    if data.placement is Placement.BURST:
        return Placement.BURST, "placement=burst requested"
    if data.resources.gpus or data.resources.tpus:
        asked = ", ".join(f"{n:g} {k}" for k, n in (("GPU", data.resources.gpus), ("TPU", data.resources.tpus)) if n)
        if data.placement is Placement.LOCAL:
            raise InvalidInput(f"placement=local cannot provide {asked}")
        return Placement.BURST, f"asks for accelerators ({asked})"
    if data.placement is Placement.LOCAL:
        return Placement.LOCAL, "placement=local requested"
    memory, samples = float(cost.get("memory_mb", 0)), int(cost.get("samples", 0))
    ram, max_samples = budgets["ram_budget_mb"], budgets["max_samples"]
    if memory > ram:
        return Placement.BURST, f"needs ~{memory:.0f} MB to train; the largest on-device budget is {ram} MB"
    if samples * data.epochs > max_samples * 20:
        return Placement.BURST, (f"{samples} samples x {data.epochs} epochs exceeds what devices train "
                         f"(at most {max_samples} samples)")
    return Placement.LOCAL, (f"~{memory:.0f} MB and {samples} samples fit the fleet's on-device budgets "
                     f"({ram} MB, {max_samples} samples): runs beside the control plane")


class JobService:
    def __init__(self, engine: Engine, data_dir: Path, backends: dict[str, Backend], models: ModelService,
                 pipeline: ModelPipeline) -> None:
        self.engine = engine
        self.data_dir = data_dir
        self.backends = backends
        self.models = models
        self.pipeline = pipeline
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._queued_since: dict[int, float] = {}

    # -- API -------------------------------------------------------------------------------------------------
    def submit(self, data: JobCreate, *, base_weights: Path | None = None, round_id: int | None = None) -> JobRead:
        """Decide where the job runs, record it and hand it to that backend. `base_weights` (a state_dict .npz,
        e.g. a round's result) stands in for `base_model_version`; `round_id` links a round's burst step."""
        from federated.burst.spec import estimate_cost
        from federated.tasks import get_task

        try:
            task = get_task(data.task)
        except (LookupError, ValueError, ImportError) as exc:
            raise InvalidInput(str(exc)) from None
        self.check(data)
        if base_weights is not None and not base_weights.is_file():
            raise InvalidInput(f"no weights to start from at {base_weights}")
        if data.base_model_version is not None:
            model = self.models.get(data.base_model_version)
            base_weights = self.pipeline.weights_of(model.version)
            if not base_weights.is_file():
                raise InvalidInput(f"model {data.base_model_version} has no stored weights to start from")
        with Session(self.engine) as session:
            record = JobRecord(kind=data.kind, task=data.task, spec={}, resources=msgspec.to_builtins(
                data.resources), placement=Placement.LOCAL, placement_reason="", out_dir="", deploy=data.deploy,
                round_id=round_id, created_at=utcnow())
            session.add(record)
            session.flush()
            assert record.id is not None
            job_id = record.id
            spec = {"job_id": str(job_id), "kind": str(data.kind), "task": data.task,
                    "base_weights": None if base_weights is None else str(base_weights),
                    "epochs": data.epochs, "lr": data.learning_rate, "batch_size": data.batch_size,
                    "time_budget_s": data.time_budget_s, "seed": job_id, "checkpoint_every_steps": 50,
                    "device": "auto", "teacher_hidden": 512}
            cost = estimate_cost(task, msgspec.convert(spec, _spec_type()))
            placement, reason = decide_placement(data, cost, self._budgets(session))
            out_dir = self.data_dir / f"job-{job_id}"
            record.spec = {**spec, "build": data.build, "pending_timeout_s": data.pending_timeout_s, "cost": cost}
            record.placement, record.placement_reason, record.out_dir = placement, reason, str(out_dir)
            session.add(record)
            session.commit()
        log.info("job.submitted", job_id=job_id, kind=str(data.kind), placement=placement, reason=reason)
        if placement is Placement.BURST:
            # Reaching the cluster can take seconds (the local head starts on the first burst job): answer now;
            # the job is queued, and a launch failure lands on it with the reason.
            threading.Thread(target=self._launch, args=(job_id,), name=f"job-{job_id}-launch", daemon=True).start()
        else:
            self._launch(job_id)
        return self.get(job_id)

    def check(self, data: JobCreate) -> None:
        """Refuse what cannot run here whatever the fleet: accelerators without a burst backend, or locally."""
        accelerators = bool(data.resources.gpus or data.resources.tpus)
        if data.placement is Placement.LOCAL and accelerators:
            decide_placement(data, {}, {})  # raises, naming what was asked
        if (accelerators or data.placement is Placement.BURST) and "burst" not in self.backends:
            raise InvalidInput("the job needs the burst backend (Ray), which is not installed here: "
                               "pip install 'edgefleet[burst]'")

    def get(self, job_id: int) -> JobRead:
        with Session(self.engine) as session:
            record = session.get(JobRecord, job_id)
            if record is None:
                raise NotFound(f"no job {job_id}")
            return self._read(record)

    def list_all(self, limit: int = 100) -> list[JobRead]:
        with Session(self.engine) as session:
            rows = session.exec(select(JobRecord).order_by(col(JobRecord.id).desc()).limit(limit))
            return [self._read(r) for r in rows]

    def wait(self, job_id: int, timeout: float | None = None, poll_s: float = 0.5) -> JobRead:
        """Block until the job has ended (its own pending timeout and time budget bound this) or `timeout`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if job.status not in _ACTIVE:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job.status} after {timeout:.0f} s")
            if self._stop.wait(poll_s):
                raise JobServiceStopped(f"stopped while waiting on job {job_id}")

    def cancel(self, job_id: int) -> JobRead:
        with Session(self.engine) as session:
            record = session.get(JobRecord, job_id)
            if record is None:
                raise NotFound(f"no job {job_id}")
            if record.status not in _ACTIVE:
                raise Conflict(f"job {job_id} is already {record.status}")
            backend_id = record.backend_job_id
            backend = self.backends.get(record.placement)
        if backend_id and backend is not None:
            backend.stop(backend_id)
        self._finish(job_id, JobStatus.CANCELLED, "cancelled by an operator")
        return self.get(job_id)

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self, interval_s: float = 1.0) -> None:
        """Re-attach jobs a previous control plane left running (or re-submit them: the worker resumes from its
        last checkpoint), then follow every active job."""
        with Session(self.engine) as session:
            active = list(session.exec(select(JobRecord).where(col(JobRecord.status).in_(_ACTIVE))))
        for record in active:
            assert record.id is not None
            backend = self.backends.get(record.placement)
            state = "FAILED"
            if record.backend_job_id and backend is not None:
                try:
                    state = backend.status(record.backend_job_id)
                except Exception:  # noqa: BLE001 - a backend that forgot the job: re-submit below
                    state = "FAILED"
            if state in ("PENDING", "RUNNING"):
                log.info("job.reattached", job_id=record.id)
            else:
                log.info("job.resubmitted_after_restart", job_id=record.id)
                self._launch(record.id, note="re-submitted after a control-plane restart")

        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.step()
                except Exception:
                    log.exception("jobs.step_failed")

        self._thread = threading.Thread(target=loop, name="jobs", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for backend in self.backends.values():
            close = getattr(backend, "close", None)
            if close is not None:
                close()

    def _launch(self, job_id: int, note: str | None = None) -> None:
        with Session(self.engine) as session:
            record = session.get(JobRecord, job_id)
            assert record is not None
            out_dir, placement, resources = Path(record.out_dir), record.placement, dict(record.resources)
            out_dir.mkdir(parents=True, exist_ok=True)
            spec_path = out_dir / "spec.json"
            spec_path.write_text(json.dumps({k: v for k, v in record.spec.items()
                                             if k not in ("build", "pending_timeout_s", "cost")}))
        backend = self.backends.get(placement)
        backend_id, failure = None, None
        if backend is None:
            failure = f"no {placement} backend (install edgefleet[burst])"
        else:
            try:
                backend_id = backend.submit(job_id, spec_path, out_dir, resources)
            except Exception as exc:  # noqa: BLE001 - reported on the job
                if self._stop.is_set():
                    return  # shutting down: still queued without a backend id, so the next start submits it
                failure = f"submission failed: {exc}"
        with Session(self.engine) as session:
            record = session.get(JobRecord, job_id)
            assert record is not None
            record.backend_job_id = backend_id
            if record.status not in _ACTIVE:  # cancelled while it was being submitted
                if backend is not None and backend_id is not None:
                    backend.stop(backend_id)
            elif failure is not None:
                record.status, record.reason, record.finished_at = JobStatus.FAILED, failure, utcnow()
            else:
                record.status, record.reason = JobStatus.QUEUED, note
                self._queued_since[job_id] = time.monotonic()
            session.add(record)
            session.commit()

    def step(self) -> None:
        with Session(self.engine) as session:
            active = list(session.exec(select(JobRecord).where(col(JobRecord.status).in_(_ACTIVE))))
        for record in active:
            self._follow(record)

    def _follow(self, record: JobRecord) -> None:
        assert record.id is not None
        backend = self.backends.get(record.placement)
        if backend is None or record.backend_job_id is None:
            return
        state = backend.status(record.backend_job_id)
        # Followed every second: only the end of the log matters (the latest progress, the tail shown to users).
        logs = backend.logs(record.backend_job_id, final=state in _ENDED)[-LOG_WINDOW:]
        progress = _last_progress(logs)
        now = time.monotonic()
        with Session(self.engine) as session:
            row = session.get(JobRecord, record.id)
            assert row is not None
            if row.status not in _ACTIVE:
                return
            row.logs_tail = logs[-4000:]
            if progress:
                row.progress = progress
            if state == "RUNNING" and row.status is JobStatus.QUEUED:
                row.status, row.started_at = JobStatus.RUNNING, utcnow()
            session.add(row)
            session.commit()
        if state == "PENDING":
            waited = now - self._queued_since.setdefault(record.id, now)
            limit = float(record.spec.get("pending_timeout_s", 60.0))
            if waited > limit:
                backend.stop(record.backend_job_id)
                asked = ", ".join(f"{k}={v:g}" for k, v in record.resources.items())
                self._finish(record.id, JobStatus.TIMED_OUT, f"no node could take the job within {limit:.0f} s "
                                                     f"(asked {asked}): the cluster lacks these resources")
            return
        started = as_utc(record.started_at)
        budget = float(record.spec.get("time_budget_s", 600)) + 120.0
        if state == "RUNNING" and started is not None and (utcnow() - started).total_seconds() > budget:
            backend.stop(record.backend_job_id)
            self._finish(record.id, JobStatus.TIMED_OUT, f"still running {budget:.0f} s after it started")
            return
        if state in _ENDED:
            self._complete(record, state, logs)

    def _complete(self, record: JobRecord, state: str, logs: str) -> None:
        assert record.id is not None
        out_dir = Path(record.out_dir)
        try:
            result: dict[str, Any] = json.loads((out_dir / "result.json").read_text())
        except (OSError, ValueError):
            tail = logs.strip().splitlines()[-1:] or ["no output"]
            self._finish(record.id, JobStatus.FAILED, f"the worker ended ({state}) without a result: {tail[0][:300]}")
            return
        status = str(result.get("status", JobStatus.FAILED))
        with Session(self.engine) as session:
            row = session.get(JobRecord, record.id)
            assert row is not None
            # One flat dict: the model's metrics (accuracy, loss, ...) beside how it ran (device, dtype, steps).
            trained = result.get("metrics")
            row.metrics = {**{k: v for k, v in result.items() if k not in ("status", "metrics")},
                           **(trained if isinstance(trained, dict) else {})}
            session.add(row)
            session.commit()
        if status != JobStatus.SUCCEEDED:
            ended = JobStatus(status) if status in (JobStatus.TIMED_OUT, JobStatus.CANCELLED) else JobStatus.FAILED
            self._finish(record.id, ended,
                         str(result.get("reason") or f"worker status {status}"))
            return
        version = None
        if record.spec.get("build", True):
            try:
                version = self.pipeline.publish(
                    weights=out_dir / "weights.npz", task=record.task,
                    name=burst_version(record.id, record.kind, record.round_id),
                    source=ModelSource.BURST, source_id=str(record.id), deploy=record.deploy)
            except Exception as exc:
                log.exception("job.build_failed", job_id=record.id)
                self._finish(record.id, JobStatus.FAILED, f"build failed: {exc}")
                return
        self._finish(record.id, JobStatus.SUCCEEDED, None, model_version=version)

    def _finish(self, job_id: int, status: JobStatus, reason: str | None, model_version: str | None = None) -> None:
        with Session(self.engine) as session:
            row = session.get(JobRecord, job_id)
            assert row is not None
            row.status, row.reason, row.finished_at = status, reason, utcnow()
            if model_version is not None:
                row.model_version = model_version
            session.add(row)
            session.commit()
        self._queued_since.pop(job_id, None)
        log.info("job.finished", job_id=job_id, status=status, reason=reason, model_version=model_version)

    @staticmethod
    def _budgets(session: Session) -> dict[str, Any]:
        """The largest training budget among the device classes enrolled (what could train on-device)."""
        ram, samples = 0, 0
        for name in set(session.exec(select(Device.profile))):
            try:
                profile = get_profile(name)
            except ProfileError:
                continue
            if profile.training.allowed:
                ram, samples = max(ram, profile.training.ram_budget_mb), max(samples, profile.training.max_samples)
        return {"ram_budget_mb": ram, "max_samples": samples}

    @staticmethod
    def _read(record: JobRecord) -> JobRead:
        assert record.id is not None
        return JobRead(id=record.id, kind=record.kind, task=record.task, status=record.status, reason=record.reason,
                       placement=Placement(record.placement), placement_reason=record.placement_reason,
                       resources=record.resources, progress=record.progress, metrics=record.metrics,
                       logs_tail=record.logs_tail, model_version=record.model_version, round_id=record.round_id,
                       backend_job_id=record.backend_job_id, created_at=as_utc(record.created_at) or utcnow(),
                       started_at=as_utc(record.started_at), finished_at=as_utc(record.finished_at))


def _last_progress(logs: str) -> dict[str, Any]:
    """The newest progress line, on top of the newest one that says where training is (epoch, step, loss)."""
    events = []
    for line in logs.splitlines():
        if line.startswith(PROGRESS_PREFIX):
            try:
                value = json.loads(line[len(PROGRESS_PREFIX):])
            except ValueError:
                continue
            if isinstance(value, dict):
                events.append(value)
    if not events:
        return {}
    training = next((e for e in reversed(events) if "epoch" in e), {})
    return {**training, **events[-1]}


def _spec_type() -> Any:
    from federated.burst.spec import JobSpec

    return JobSpec
