"""The fleet's figures, computed at scrape time: a few aggregate queries (GROUP BY, never a row per device) and
this process's ingest workers.

Counts that live in the database (devices, rounds, deployments...) are gauges of the current state: every control
plane process sharing the database reports the same figures, so aggregate them with `max` (not `sum`) across
instances. Only the ingest workers' own figures (connection, restarts, lag) are per process.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Connection, Engine, Float, and_, case, cast, func, literal, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.sql.elements import ColumnElement

from agent import __version__
from agent import protocol as wire
from controlplane.db import (
    CommandRecord,
    DeploymentRecord,
    DeploymentTargetRecord,
    Device,
    JobRecord,
    RoundRecord,
    as_utc,
)
from controlplane.ingest import read_stats
from controlplane.ingest.lag import LAG_BUCKETS, LagSnapshot
from controlplane.statuses import DeploymentStatus, JobStatus, RoundStatus

if TYPE_CHECKING:
    from controlplane.ingest import IngestWorker

__all__ = ["AGE_BUCKETS", "DEAD_LETTER_REASONS", "ROUND_BUCKETS", "FleetCollector"]

log = structlog.get_logger("edgefleet.metrics")

# Seconds since a device's latest telemetry.
AGE_BUCKETS: tuple[float, ...] = (15, 30, 60, 120, 300, 600, 1800, 3600, 21600, 86400)
# Seconds from a round's creation to its end.
ROUND_BUCKETS: tuple[float, ...] = (15, 30, 60, 120, 300, 600, 1800, 3600, 7200)
# The reasons controlplane.ingest files dead letters under (always exposed, at 0 until one happens, so that
# rate() sees the first one); a name outside this list is counted as `other`.
DEAD_LETTER_REASONS = ("bad_topic", "db_rejected", "device_mismatch", "error", "invalid", "malformed", "oversized",
                       "unknown_command", "unknown_device", "unsupported_version")
_AGE_CAP = 10 * 365 * 86400.0  # a device clock far off: clamped, so sums stay finite
_COMMAND_KINDS = frozenset(k.value for k in wire.CommandKind)
_ACTIVE_DEPLOYMENT = (DeploymentStatus.RUNNING.value, DeploymentStatus.PAUSED.value)

_DEVICE = Device.__table__  # type: ignore[attr-defined]
_COMMAND = CommandRecord.__table__  # type: ignore[attr-defined]
_ROUND = RoundRecord.__table__  # type: ignore[attr-defined]
_DEPLOYMENT = DeploymentRecord.__table__  # type: ignore[attr-defined]
_TARGET = DeploymentTargetRecord.__table__  # type: ignore[attr-defined]
_JOB = JobRecord.__table__  # type: ignore[attr-defined]


class FleetCollector(Collector):
    """A prometheus_client collector over a fleet's database and ingest workers (callables: a control plane's
    fleet is started after its app is built)."""

    def __init__(self, engine: Callable[[], Engine], workers: Callable[[], Sequence[IngestWorker]]) -> None:
        self._engine = engine
        self._workers = workers

    def describe(self) -> Iterable[Metric]:
        return []  # no query when the registry registers this collector (the database may not exist yet)

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("edgefleet_build_info", "The control plane's version (always 1)", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        yield from _workers(self._workers())
        started = time.perf_counter()
        families: list[Metric] = []
        try:
            engine = self._engine()
            families.extend(_ingest_counters(read_stats(engine)))
            with engine.connect() as conn:
                for query in (_devices, _commands, _rounds, _deployments, _jobs):
                    families.extend(query(conn))
            up = 1
        except SQLAlchemyError as exc:  # the database is away: say so, and keep answering
            first_line = (str(exc).splitlines() or [""])[0][:300]
            log.warning("metrics.database_failed", error_type=type(exc).__name__, error=first_line)
            families, up = [], 0
        yield from families
        yield GaugeMetricFamily("edgefleet_database_up",
                                "Whether this scrape could read the database (1) or not (0: the fleet figures are "
                                "missing)", value=up)
        yield GaugeMetricFamily("edgefleet_metrics_collect_seconds",
                                "Seconds this scrape spent on its database queries",
                                value=time.perf_counter() - started)


# -- ingest -------------------------------------------------------------------------------------------------------
def _ingest_counters(stats: dict[str, Any]) -> Iterator[Metric]:
    for name, text in (
        ("received", "MQTT messages the ingest workers took from the broker (all channels)"),
        ("stored", "Telemetry records stored"),
        ("duplicates", "Telemetry records dropped as already stored (same device and seq)"),
        ("states", "State (presence) messages applied"),
        ("acks", "Command acks applied"),
    ):
        yield CounterMetricFamily(f"edgefleet_ingest_{name}", text, value=int(stats[name]))
    dead = CounterMetricFamily("edgefleet_ingest_dead_letters", "Messages refused by ingest, by reason",
                               labels=["reason"])
    counts = dict.fromkeys(DEAD_LETTER_REASONS, 0)
    for reason, n in dict(stats["dead_letters"]).items():
        key = reason if reason in counts else "other"
        counts[key] = counts.get(key, 0) + int(n)
    for reason, n in sorted(counts.items()):
        dead.add_metric([reason], n)
    yield dead


def _workers(workers: Sequence[IngestWorker]) -> Iterator[Metric]:
    statuses = [w.status() for w in workers]
    yield GaugeMetricFamily("edgefleet_ingest_workers", "Ingest workers this process runs", value=len(statuses))
    yield GaugeMetricFamily("edgefleet_ingest_workers_alive", "Ingest workers whose thread runs",
                            value=sum(1 for s in statuses if s["alive"]))
    yield GaugeMetricFamily("edgefleet_ingest_workers_connected", "Ingest workers connected to the broker",
                            value=sum(1 for s in statuses if s["connected"]))
    yield GaugeMetricFamily("edgefleet_ingest_workers_healthy",
                            "Ingest workers that store what they receive (what /healthz checks)",
                            value=sum(1 for w in workers if w.health() is None))
    connected = GaugeMetricFamily("edgefleet_ingest_worker_connected",
                                  "1 while this ingest worker is connected to the broker", labels=["worker"])
    restarts = CounterMetricFamily("edgefleet_ingest_worker_restarts",
                                   "Restarts of an ingest worker's loop after an unexpected error", labels=["worker"])
    db_errors = CounterMetricFamily("edgefleet_ingest_worker_db_errors",
                                    "Batches an ingest worker could not write (database unavailable; retried)",
                                    labels=["worker"])
    for s in statuses:
        connected.add_metric([s["name"]], 1 if s["connected"] else 0)
        restarts.add_metric([s["name"]], s["restarts"])
        db_errors.add_metric([s["name"]], s["db_errors"])
    yield from (connected, restarts, db_errors)
    snapshots = [w.lag.snapshot() for w in workers]
    yield _lag_histogram("edgefleet_ingest_lag_seconds",
                         "Seconds from a message's receipt from the broker to the commit of its batch (sampled: at "
                         "most 32 messages per batch)", [s[0] for s in snapshots])
    yield _lag_histogram("edgefleet_ingest_telemetry_delay_seconds",
                         "Seconds from a telemetry message's device timestamp to its commit: time in the broker's "
                         "queue included, and the device clock's error (sampled)", [s[1] for s in snapshots])


def _lag_histogram(name: str, text: str, snapshots: Sequence[LagSnapshot]) -> HistogramMetricFamily:
    counts = [0] * (len(LAG_BUCKETS) + 1)
    total = 0.0
    for snap in snapshots:
        counts = [a + b for a, b in zip(counts, snap.counts, strict=True)]
        total += snap.total
    return HistogramMetricFamily(name, text, buckets=_cumulative(LAG_BUCKETS, counts), sum_value=total)


def _cumulative(bounds: Sequence[float], counts: Sequence[int]) -> list[tuple[str, float]]:
    """[(le, cumulative count)] from per-bucket counts (the last one +Inf)."""
    out: list[tuple[str, float]] = []
    running = 0
    for bound, n in zip([*bounds, float("inf")], counts, strict=True):
        running += n
        out.append(("+Inf" if bound == float("inf") else _le(bound), running))
    return out


def _le(bound: float) -> str:
    return repr(float(bound))  # as prometheus_client writes its own buckets: "15.0", "0.01"


# -- the database ---------------------------------------------------------------------------------------------------
def _devices(conn: Connection) -> Iterator[Metric]:
    """Enrolled and online devices by profile, and the age of each device's latest telemetry as a histogram by
    profile and presence, in one GROUP BY (the age is the telemetry's own timestamp: a retained state replayed
    on an ingest reconnect does not make a silent device look fresh)."""
    # The JSON is read once per device: a materialized CTE (else the planners inline the expression into each of
    # the bucket sums below and parse every device's telemetry a dozen times: 1.9 s instead of 60 ms on
    # PostgreSQL at 10,000 devices).
    raw = (literal(time.time(), Float) - _DEVICE.c.last_telemetry["ts"].as_float()).label("raw")
    ages = select(_DEVICE.c.profile, _DEVICE.c.online, raw).cte("device_age")
    if _materialized_cte(conn):
        ages = ages.prefix_with("MATERIALIZED")
    age = case((ages.c.raw < 0, 0.0), (ages.c.raw > _AGE_CAP, _AGE_CAP), else_=ages.c.raw)
    buckets = [func.sum(case((age <= b, 1), else_=0)) for b in AGE_BUCKETS]
    rows = conn.execute(
        select(ages.c.profile, ages.c.online, func.count(), func.count(ages.c.raw), func.sum(age), *buckets)
        .group_by(ages.c.profile, ages.c.online)
    ).all()
    enrolled = GaugeMetricFamily("edgefleet_devices_enrolled", "Enrolled devices by profile", labels=["profile"])
    online = GaugeMetricFamily("edgefleet_devices_online", "Devices online (their latest state) by profile",
                               labels=["profile"])
    histogram = HistogramMetricFamily(
        "edgefleet_device_telemetry_age_seconds",
        "Devices by seconds since their latest telemetry's timestamp, by profile and presence (devices that never "
        "sent telemetry are not counted)", labels=["profile", "online"])
    by_profile: dict[str, list[int]] = {}
    for profile, is_online, count, with_telemetry, total, *cumulative in rows:
        tally = by_profile.setdefault(profile, [0, 0])
        tally[0] += count
        tally[1] += count if is_online else 0
        points = [(_le(b), float(c or 0)) for b, c in zip(AGE_BUCKETS, cumulative, strict=True)]
        points.append(("+Inf", float(with_telemetry)))
        histogram.add_metric([profile, "true" if is_online else "false"], points, float(total or 0.0))
    for profile, (n_enrolled, n_online) in sorted(by_profile.items()):
        enrolled.add_metric([profile], n_enrolled)
        online.add_metric([profile], n_online)
    yield from (enrolled, online, histogram)


def _materialized_cte(conn: Connection) -> bool:
    """`WITH .. AS MATERIALIZED`: PostgreSQL 12+, SQLite 3.35+."""
    info = conn.dialect.server_version_info or ()
    if conn.dialect.name == "postgresql":
        return info >= (12,)
    return conn.dialect.name == "sqlite" and info >= (3, 35)


def _commands(conn: Connection) -> Iterator[Metric]:
    rows = conn.execute(
        select(_COMMAND.c.kind, _COMMAND.c.status, func.count()).group_by(_COMMAND.c.kind, _COMMAND.c.status)
    ).all()
    counts: dict[tuple[str, str], int] = {}
    for kind, status, n in rows:
        key = (kind if kind in _COMMAND_KINDS else "other", str(status))  # an operator's own kinds: not labels
        counts[key] = counts.get(key, 0) + n
    family = GaugeMetricFamily("edgefleet_commands", "Commands sent to devices, by kind and status",
                               labels=["kind", "status"])
    for (kind, status), n in sorted(counts.items()):
        family.add_metric([kind, status], n)
    yield family


def _seconds_between(conn: Connection, start: Any, end: Any) -> ColumnElement[float]:
    if conn.dialect.name == "sqlite":
        return cast((func.julianday(end) - func.julianday(start)) * 86400.0, Float)
    return cast(func.extract("epoch", end - start), Float)


def _rounds(conn: Connection) -> Iterator[Metric]:
    rows = conn.execute(
        select(_ROUND.c.task, _ROUND.c.status, func.count()).group_by(_ROUND.c.task, _ROUND.c.status)
    ).all()
    family = GaugeMetricFamily("edgefleet_rounds", "Federated rounds by task and status", labels=["task", "status"])
    for task, status, n in sorted(rows, key=lambda r: (r[0], str(r[1]))):
        family.add_metric([task, str(status)], n)
    yield family

    finished = (RoundStatus.SUCCEEDED.value, RoundStatus.FAILED.value)
    duration = _seconds_between(conn, _ROUND.c.created_at, _ROUND.c.finished_at)
    clamped = case((duration < 0, 0.0), else_=duration).label("duration")
    inner = (select(_ROUND.c.task, _ROUND.c.status, clamped)
             .where(_ROUND.c.status.in_(finished), _ROUND.c.finished_at.is_not(None)).subquery())
    buckets = [func.sum(case((inner.c.duration <= b, 1), else_=0)) for b in ROUND_BUCKETS]
    rows = conn.execute(
        select(inner.c.task, inner.c.status, func.count(), func.sum(inner.c.duration), *buckets)
        .group_by(inner.c.task, inner.c.status)
    ).all()
    histogram = HistogramMetricFamily(
        "edgefleet_round_duration_seconds",
        "Finished rounds by seconds from creation to end, by task and outcome (its _count by status=\"failed\" "
        "counts failed rounds)", labels=["task", "status"])
    for task, status, count, total, *cumulative in sorted(rows, key=lambda r: (r[0], str(r[1]))):
        points = [(_le(b), float(c or 0)) for b, c in zip(ROUND_BUCKETS, cumulative, strict=True)]
        points.append(("+Inf", float(count)))
        histogram.add_metric([task, str(status)], points, float(total or 0.0))
    yield histogram

    latest = (select(_ROUND.c.task, func.max(_ROUND.c.id).label("id"))
              .where(_ROUND.c.status == RoundStatus.SUCCEEDED.value).group_by(_ROUND.c.task).subquery())
    rows = conn.execute(
        select(_ROUND.c.task, _ROUND.c.metrics, _ROUND.c.finished_at)
        .join(latest, and_(_ROUND.c.id == latest.c.id))
    ).all()
    accuracy = GaugeMetricFamily("edgefleet_round_last_accuracy",
                                 "Global model accuracy of the latest successful round's last Flower round, by task",
                                 labels=["task"])
    finished_at = GaugeMetricFamily("edgefleet_round_last_success_timestamp_seconds",
                                    "When the latest successful round of a task ended (Unix time)", labels=["task"])
    for task, metrics, ended in sorted(rows, key=lambda r: r[0]):
        value = _last_accuracy(metrics)
        if value is not None:
            accuracy.add_metric([task], value)
        when = _timestamp(ended)
        if when is not None:
            finished_at.add_metric([task], when)
    yield from (accuracy, finished_at)


def _last_accuracy(metrics: Any) -> float | None:
    """The accuracy of the highest Flower round that reported one."""
    if not isinstance(metrics, list):
        return None
    best: tuple[int, float] | None = None
    for entry in metrics:
        if not isinstance(entry, dict):
            continue
        number, value = entry.get("round"), entry.get("accuracy")
        if not isinstance(number, int) or not isinstance(value, int | float) or isinstance(value, bool):
            continue
        if best is None or number >= best[0]:
            best = (number, float(value))
    return None if best is None else best[1]


def _timestamp(value: Any) -> float | None:
    if isinstance(value, datetime):
        return as_utc(value).timestamp()
    return None


def _deployments(conn: Connection) -> Iterator[Metric]:
    rows = conn.execute(select(_DEPLOYMENT.c.status, func.count()).group_by(_DEPLOYMENT.c.status)).all()
    family = GaugeMetricFamily("edgefleet_deployments", "Deployments (rollouts) by status", labels=["status"])
    counts = {str(s): 0 for s in DeploymentStatus if s is not DeploymentStatus.FAILED}
    for status, n in rows:
        counts[str(status)] = counts.get(str(status), 0) + n
    for status, n in sorted(counts.items()):
        family.add_metric([status], n)
    yield family

    active = _DEPLOYMENT.c.status.in_(_ACTIVE_DEPLOYMENT)
    rows = conn.execute(
        select(active.label("active"), _TARGET.c.status, func.count())
        .select_from(_TARGET.join(_DEPLOYMENT, _TARGET.c.deployment_id == _DEPLOYMENT.c.id))
        .group_by(active, _TARGET.c.status)
    ).all()
    targets = GaugeMetricFamily(
        "edgefleet_deployment_targets",
        "Per-device outcomes of deployments, by status; active=\"true\": of running or paused deployments",
        labels=["active", "status"])
    for is_active, status, n in sorted(rows, key=lambda r: (bool(r[0]), str(r[1]))):
        targets.add_metric(["true" if is_active else "false", str(status)], n)
    yield targets


def _jobs(conn: Connection) -> Iterator[Metric]:
    rows = conn.execute(
        select(_JOB.c.kind, _JOB.c.placement, _JOB.c.status, func.count())
        .group_by(_JOB.c.kind, _JOB.c.placement, _JOB.c.status)
    ).all()
    family = GaugeMetricFamily("edgefleet_jobs", "Burst training jobs by kind, placement and status",
                               labels=["kind", "placement", "status"])
    for kind, placement, status, n in sorted(rows, key=lambda r: (str(r[0]), r[1], str(r[2]))):
        family.add_metric([str(kind), placement, str(status)], n)
    yield family

    waiting = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)
    started = func.coalesce(_JOB.c.started_at, _JOB.c.created_at)
    rows = conn.execute(
        select(_JOB.c.status, func.min(_JOB.c.created_at), func.min(started))
        .where(_JOB.c.status.in_(waiting)).group_by(_JOB.c.status)
    ).all()
    oldest = GaugeMetricFamily(
        "edgefleet_job_oldest_seconds",
        "Seconds the oldest job in a status has been in it: queued since creation, running since its start "
        "(0 when there is none)", labels=["status"])
    ages = dict.fromkeys(waiting, 0.0)
    now = time.time()
    for status, created, began in rows:
        since = _timestamp(began if str(status) == JobStatus.RUNNING.value else created)
        if since is not None:
            ages[str(status)] = max(0.0, now - since)
    for status, age in sorted(ages.items()):
        oldest.add_metric([status], age)
    yield oldest
