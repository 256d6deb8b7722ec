"""Read-only, paginated queries behind the console's rounds, models, deployments and jobs pages.

They read the tables the services write (no second source of truth) and aggregate in SQL: a list page costs one
query for its rows and one or two GROUP BYs, whatever the fleet's size — never a round's invitation lists or a
deployment's ten thousand targets in Python. A single record's page reads it through its service (bounded).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Generic, NamedTuple, TypeVar

from sqlalchemy import Connection, Engine, and_, case, func, literal_column, select
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import Session, col
from sqlmodel import select as select_records

from controlplane.db import (
    DeploymentRecord,
    DeploymentTargetRecord,
    JobRecord,
    ModelArtifactRecord,
    ModelVersionRecord,
    RoundRecord,
    as_utc,
)
from controlplane.statuses import DeploymentStatus, JobStatus, RoundStatus, TargetStatus

__all__ = [
    "PAGE_SIZE",
    "TARGETS_PAGE_SIZE",
    "DeploymentDetail",
    "DeploymentRow",
    "FinishedRounds",
    "JobRow",
    "ModelRow",
    "Page",
    "RoundCounts",
    "RoundRow",
    "WaveRow",
    "deployment_detail",
    "deployments_of_model",
    "deployments_page",
    "jobs_page",
    "models_page",
    "round_initial_model",
    "rounds_page",
    "target_page",
    "version_of_release",
]

_ROUND: Final[Any] = RoundRecord.__table__  # type: ignore[attr-defined]
_MODEL: Final[Any] = ModelVersionRecord.__table__  # type: ignore[attr-defined]
_ARTIFACT: Final[Any] = ModelArtifactRecord.__table__  # type: ignore[attr-defined]
_DEPLOYMENT: Final[Any] = DeploymentRecord.__table__  # type: ignore[attr-defined]
_TARGET: Final[Any] = DeploymentTargetRecord.__table__  # type: ignore[attr-defined]
_JOB: Final[Any] = JobRecord.__table__  # type: ignore[attr-defined]

PAGE_SIZE: Final = 25
TARGETS_PAGE_SIZE: Final = 100

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a list: its rows, how many there are in all, where it starts."""

    items: list[T]
    total: int
    offset: int
    limit: int

    @property
    def first(self) -> int:
        return self.offset + 1 if self.items else 0

    @property
    def last(self) -> int:
        return self.offset + len(self.items)

    @property
    def prev_offset(self) -> int | None:
        return max(0, self.offset - self.limit) if self.offset > 0 else None

    @property
    def next_offset(self) -> int | None:
        return self.offset + self.limit if self.offset + self.limit < self.total else None


# -- rounds ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RoundRow:
    id: int
    schedule_id: str | None
    task: str
    strategy: str
    status: RoundStatus
    reason: str | None
    invited: int
    participants: int
    skipped: int
    accuracy: float | None
    model_version: str | None
    job_id: int | None
    created_at: datetime
    finished_at: datetime | None


def _round_aggregates(engine: Engine) -> tuple[ColumnElement[Any], ...]:
    """invited, participants and skipped counts and the last Flower round's accuracy, computed by the database
    from the JSON columns (each dialect has its own JSON functions)."""
    if engine.dialect.name == "postgresql":
        return (literal_column("json_array_length(fl_round.invited)"),
                literal_column("json_array_length(fl_round.participants)"),
                literal_column("(SELECT count(*) FROM json_object_keys(fl_round.skipped))"),
                literal_column("CAST(fl_round.metrics -> -1 ->> 'accuracy' AS double precision)"))
    return (literal_column("json_array_length(fl_round.invited)"),
            literal_column("json_array_length(fl_round.participants)"),
            literal_column("(SELECT count(*) FROM json_each(fl_round.skipped))"),
            literal_column("json_extract(fl_round.metrics, '$[#-1].accuracy')"))


def _count(conn: Connection, table: Any, *where: Any) -> int:
    return int(conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one())


class RoundCounts(NamedTuple):
    invited: int
    participants: int
    skipped: int
    accuracy: float | None  # the last Flower round's


class FinishedRounds:
    """The counts of finished rounds, which never change again, kept per app (bounded, least recently used out):
    the JSON columns of a page's rounds are parsed by the database once, not at every view. (On PostgreSQL, 25
    rounds that each invited 5,000 of 10,000 devices cost ~275 ms to aggregate; SQLite ~20 ms.)"""

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._counts: OrderedDict[int, RoundCounts] = OrderedDict()

    def get(self, round_id: int) -> RoundCounts | None:
        with self._lock:
            counts = self._counts.get(round_id)
            if counts is not None:
                self._counts.move_to_end(round_id)
            return counts

    def put(self, round_id: int, counts: RoundCounts) -> None:
        with self._lock:
            self._counts[round_id] = counts
            self._counts.move_to_end(round_id)
            while len(self._counts) > self._size:
                self._counts.popitem(last=False)


def rounds_page(engine: Engine, offset: int, limit: int = PAGE_SIZE,
                finished: FinishedRounds | None = None) -> Page[RoundRow]:
    r = _ROUND.c
    with engine.connect() as conn:
        total = _count(conn, _ROUND)
        rows = conn.execute(select(r.id, r.schedule_id, r.task, r.strategy, r.status, r.reason, r.model_version,
                                   r.job_id, r.created_at, r.finished_at)
                            .order_by(r.id.desc()).offset(offset).limit(limit)).all()
        counts = {row[0]: c for row in rows if finished is not None and (c := finished.get(row[0])) is not None}
        missing = [row[0] for row in rows if row[0] not in counts]
        if missing:
            for found in conn.execute(select(r.id, *_round_aggregates(engine)).where(r.id.in_(missing))).all():
                counts[found[0]] = RoundCounts(invited=int(found[1] or 0), participants=int(found[2] or 0),
                                               skipped=int(found[3] or 0), accuracy=_float(found[4]))
    items = []
    for row in rows:
        status = RoundStatus(row[4])
        c = counts.get(row[0], RoundCounts(0, 0, 0, None))
        if finished is not None and status.finished and row[0] in missing:
            finished.put(row[0], c)
        items.append(RoundRow(id=row[0], schedule_id=row[1], task=row[2], strategy=str(row[3]), status=status,
                              reason=row[5], invited=c.invited, participants=c.participants, skipped=c.skipped,
                              accuracy=c.accuracy, model_version=row[6], job_id=row[7], created_at=as_utc(row[8]),
                              finished_at=as_utc(row[9])))
    return Page(items=items, total=total, offset=offset, limit=limit)


def round_initial_model(engine: Engine, round_id: int) -> str | None:
    """The model version a round started from (its config's initial_model), without reading its lists."""
    with engine.connect() as conn:
        config = conn.execute(select(_ROUND.c.config).where(_ROUND.c.id == round_id)).scalar_one_or_none()
    value = config.get("initial_model") if isinstance(config, dict) else None
    return value if isinstance(value, str) else None


# -- models ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ModelRow:
    version: str
    release: int
    task: str
    source_kind: str
    source_id: str
    status: str
    reason: str | None
    created_at: datetime
    published: int
    rejected: int
    best_accuracy: float | None
    smallest_bytes: int | None
    deployments: int


def models_page(engine: Engine, offset: int, limit: int = PAGE_SIZE) -> Page[ModelRow]:
    m, a, d = _MODEL.c, _ARTIFACT.c, _DEPLOYMENT.c
    published = a.published.is_(True)
    with engine.connect() as conn:
        total = _count(conn, _MODEL)
        versions = conn.execute(select(m.version, m.release, m.task, m.source_kind, m.source_id, m.status, m.reason,
                                       m.created_at)
                                .order_by(m.release.desc(), m.version).offset(offset).limit(limit)).all()
        names = [v[0] for v in versions]
        variants: dict[str, Sequence[Any]] = {row[0]: row[1:] for row in conn.execute(
            select(a.model_version, func.sum(case((published, 1), else_=0)), func.sum(case((published, 0), else_=1)),
                   func.max(case((published, a.accuracy), else_=None)),
                   func.min(case((published, a.size_bytes), else_=None)))
            .where(a.model_version.in_(names)).group_by(a.model_version)).all()} if names else {}
        deployed: dict[str, int] = {row[0]: int(row[1]) for row in conn.execute(
            select(d.model_version, func.count()).where(d.model_version.in_(names))
            .group_by(d.model_version)).all()} if names else {}
    items = []
    for v in versions:
        agg = variants.get(v[0], (0, 0, None, None))
        items.append(ModelRow(version=v[0], release=v[1], task=v[2], source_kind=v[3], source_id=v[4],
                              status=str(v[5]), reason=v[6], created_at=as_utc(v[7]), published=int(agg[0] or 0),
                              rejected=int(agg[1] or 0), best_accuracy=_float(agg[2]),
                              smallest_bytes=None if agg[3] is None else int(agg[3]),
                              deployments=deployed.get(v[0], 0)))
    return Page(items=items, total=total, offset=offset, limit=limit)


def version_of_release(engine: Engine, release: int) -> str | None:
    """The model version registered with this release number, if any."""
    with engine.connect() as conn:
        found = conn.execute(select(_MODEL.c.version).where(_MODEL.c.release == release)).scalar_one_or_none()
    return None if found is None else str(found)


# -- deployments ----------------------------------------------------------------------------------------------
@dataclass(slots=True)
class DeploymentRow:
    id: int
    model_version: str
    release: int | None
    status: DeploymentStatus
    reason: str | None
    rollback: bool
    rollback_of: int | None
    waves: list[float]
    current_wave: int
    created_at: datetime
    updated_at: datetime
    deadline_at: datetime | None
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def done(self) -> int:
        """Targets that will not change any more."""
        return sum(n for s, n in self.counts.items() if not TargetStatus(s).unfinished)

    @property
    def percent_done(self) -> int:
        return round(100 * self.done / self.total) if self.total else 100

    @property
    def live(self) -> bool:
        return self.status.active


@dataclass(slots=True)
class WaveRow:
    wave: int  # 0-based
    percent: float  # cumulative share of the targets this wave reaches
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def done(self) -> int:
        return sum(n for s, n in self.counts.items() if not TargetStatus(s).unfinished)


@dataclass(slots=True)
class DeploymentDetail:
    deployment: DeploymentRow
    waves: list[WaveRow]
    failure_threshold: float
    wave_timeout_s: float
    targets_selector: dict[str, Any]


def _deployment_row(r: Sequence[Any]) -> DeploymentRow:
    return DeploymentRow(id=r[0], model_version=r[1], release=r[2], status=DeploymentStatus(r[3]), reason=r[4],
                         rollback=bool(r[5]), rollback_of=r[6], waves=[float(w) for w in r[7] or []],
                         current_wave=int(r[8]), created_at=as_utc(r[9]), updated_at=as_utc(r[10]),
                         deadline_at=as_utc(r[11]))


def _deployment_query(*more: Any) -> Any:
    d, m = _DEPLOYMENT.c, _MODEL.c
    return select(d.id, d.model_version, m.release, d.status, d.reason, d.rollback, d.rollback_of, d.waves,
                  d.current_wave, d.created_at, d.updated_at, d.deadline_at, *more).select_from(
        _DEPLOYMENT.join(_MODEL, m.version == d.model_version, isouter=True))


def deployments_page(engine: Engine, offset: int, limit: int = PAGE_SIZE) -> Page[DeploymentRow]:
    t = _TARGET.c
    with engine.connect() as conn:
        total = _count(conn, _DEPLOYMENT)
        rows = [_deployment_row(r) for r in conn.execute(
            _deployment_query().order_by(_DEPLOYMENT.c.id.desc()).offset(offset).limit(limit)).all()]
        by_id = {d.id: d for d in rows}
        if by_id:
            for deployment_id, status, count in conn.execute(
                    select(t.deployment_id, t.status, func.count()).where(t.deployment_id.in_(list(by_id)))
                    .group_by(t.deployment_id, t.status)).all():
                by_id[deployment_id].counts[str(status)] = int(count)
    return Page(items=rows, total=total, offset=offset, limit=limit)


def deployments_of_model(engine: Engine, version: str, limit: int = 20) -> list[DeploymentRow]:
    with engine.connect() as conn:
        return [_deployment_row(r) for r in conn.execute(
            _deployment_query().where(_DEPLOYMENT.c.model_version == version)
            .order_by(_DEPLOYMENT.c.id.desc()).limit(limit)).all()]


def deployment_detail(engine: Engine, deployment_id: int) -> DeploymentDetail | None:
    """A deployment's header and its progress wave by wave (status counts per wave, from one GROUP BY)."""
    d, t = _DEPLOYMENT.c, _TARGET.c
    with engine.connect() as conn:
        row = conn.execute(_deployment_query(d.failure_threshold, d.wave_timeout_s, d.targets)
                           .where(d.id == deployment_id)).first()
        if row is None:
            return None
        deployment = _deployment_row(row)
        waves = {i: WaveRow(wave=i, percent=p) for i, p in enumerate(deployment.waves)}
        for wave, status, count in conn.execute(
                select(t.wave, t.status, func.count()).where(t.deployment_id == deployment_id)
                .group_by(t.wave, t.status)).all():
            entry = waves.setdefault(int(wave), WaveRow(wave=int(wave), percent=0.0))
            entry.counts[str(status)] = int(count)
            deployment.counts[str(status)] = deployment.counts.get(str(status), 0) + int(count)
    return DeploymentDetail(deployment=deployment, waves=[waves[i] for i in sorted(waves)],
                            failure_threshold=float(row[12]), wave_timeout_s=float(row[13]),
                            targets_selector=dict(row[14] or {}))


def target_page(engine: Engine, deployment_id: int, offset: int, status: TargetStatus | None = None,
                limit: int = TARGETS_PAGE_SIZE) -> Page[DeploymentTargetRecord]:
    """Per-device rows of a deployment, wave by wave, optionally of one status."""
    where = [col(DeploymentTargetRecord.deployment_id) == deployment_id]
    if status is not None:
        where.append(col(DeploymentTargetRecord.status) == status)
    with engine.connect() as conn:
        total = _count(conn, _TARGET, *where)
    with Session(engine, expire_on_commit=False) as session:
        items = list(session.exec(select_records(DeploymentTargetRecord).where(and_(*where))
                                  .order_by(col(DeploymentTargetRecord.wave), col(DeploymentTargetRecord.device_id))
                                  .offset(offset).limit(limit)))
        session.expunge_all()
    return Page(items=items, total=total, offset=offset, limit=limit)


# -- jobs -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class JobRow:
    id: int
    kind: str
    task: str
    status: JobStatus
    reason: str | None
    placement: str
    placement_reason: str
    progress: dict[str, Any]
    model_version: str | None
    round_id: int | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


def jobs_page(engine: Engine, offset: int, limit: int = PAGE_SIZE) -> Page[JobRow]:
    """Jobs without their logs (the job's own page shows the tail)."""
    j = _JOB.c
    with engine.connect() as conn:
        total = _count(conn, _JOB)
        rows = conn.execute(
            select(j.id, j.kind, j.task, j.status, j.reason, j.placement, j.placement_reason, j.progress,
                   j.model_version, j.round_id, j.created_at, j.started_at, j.finished_at)
            .order_by(j.id.desc()).offset(offset).limit(limit)).all()
    items = [JobRow(id=r[0], kind=str(r[1]), task=r[2], status=JobStatus(r[3]), reason=r[4], placement=r[5],
                    placement_reason=r[6], progress=dict(r[7] or {}), model_version=r[8], round_id=r[9],
                    created_at=as_utc(r[10]), started_at=as_utc(r[11]), finished_at=as_utc(r[12]))
             for r in rows]
    return Page(items=items, total=total, offset=offset, limit=limit)


def _float(value: Any) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
