"""Tables of the control plane (SQLModel). Schema changes go through alembic migrations."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any, overload

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Dialect,
    Index,
    Integer,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlmodel import Field, SQLModel
from sqlmodel.sql.sqltypes import AutoString

from controlplane.statuses import (
    CommandStatus,
    DeploymentStatus,
    JobStatus,
    ModelVersionStatus,
    RoundStatus,
    TargetStatus,
)
from federated.burst.spec import JobKind
from federated.flower.config import Strategy

__all__ = [
    "ApiToken",
    "CommandRecord",
    "DeploymentRecord",
    "DeploymentReleaseRecord",
    "DeploymentTargetRecord",
    "Device",
    "DeviceTag",
    "IngestCounter",
    "JobRecord",
    "ModelArtifactRecord",
    "ModelVersionRecord",
    "ProvisioningTokenRecord",
    "RoundRecord",
    "ScheduleRecord",
    "TelemetryRecord",
    "as_utc",
    "utcnow",
]


def utcnow() -> datetime:
    return datetime.now(UTC)


@overload
def as_utc(value: datetime) -> datetime: ...
@overload
def as_utc(value: None) -> None: ...
def as_utc(value: datetime | None) -> datetime | None:
    """SQLite hands datetimes back naive; they were written in UTC."""
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


def _ts(**kw: Any) -> Any:
    return Field(sa_column=Column(DateTime(timezone=True), **kw))


class StrEnumColumn(TypeDecorator[enum.StrEnum]):
    """A StrEnum stored as its value in a plain ``VARCHAR(length)`` (no database enum type, so a new member needs
    no migration); a value outside the enum is refused on write and on read."""

    impl = AutoString
    cache_ok = True

    def __init__(self, enum_type: type[enum.StrEnum], length: int = 16) -> None:
        super().__init__(length=length)
        self.enum_type = enum_type

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        return None if value is None else self.enum_type(value).value

    def process_result_value(self, value: Any, dialect: Dialect) -> enum.StrEnum | None:
        return None if value is None else self.enum_type(value)


def _status(enum_type: type[enum.StrEnum], default: enum.StrEnum) -> Any:
    return Field(default=default, sa_type=StrEnumColumn(enum_type), nullable=False)


class Device(SQLModel, table=True):
    # Counts by profile and presence (the console, /metrics) read this index only, not the rows.
    __table_args__ = (Index("ix_device_profile_online", "profile", "online"),)

    device_id: str = Field(primary_key=True, max_length=64)
    profile: str = Field(index=True, max_length=64)
    created_at: datetime = _ts(nullable=False)
    online: bool = Field(default=False, index=True)
    last_seen: datetime | None = _ts(nullable=True)
    agent_version: str | None = None
    reported_state: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    last_telemetry: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    last_seq: int | None = Field(default=None, sa_column=Column(BigInteger))
    # A training device's Flower SuperNode public key (OpenSSH, EC P-384), sent at enrolment through a
    # provisioning token; the control plane registers it with its SuperLink.
    flower_public_key: str | None = Field(default=None, max_length=256)


class DeviceTag(SQLModel, table=True):
    __tablename__ = "device_tag"
    device_id: str = Field(primary_key=True, foreign_key="device.device_id", ondelete="CASCADE")
    tag: str = Field(primary_key=True, max_length=64, index=True)


class TelemetryRecord(SQLModel, table=True):
    __tablename__ = "telemetry"
    # Only the (device_id, seq) key: window queries walk it newest first. A second (device_id, ts) index cost
    # 1-1.7 us per ingested row (bench/ingest.py --breakdown), about 5% of ingest.
    __table_args__ = (UniqueConstraint("device_id", "seq", name="uq_telemetry_device_seq"),)
    # SQLite only auto-increments INTEGER PRIMARY KEY, PostgreSQL needs BIGINT for a telemetry table.
    id: int | None = Field(
        default=None,
        sa_column=Column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    )
    device_id: str = Field(max_length=64)
    seq: int = Field(sa_column=Column(BigInteger, nullable=False))
    ts: float
    received_at: datetime = _ts(nullable=False)
    # The validated payload as the device sent it (JSON text): stored without re-encoding.
    payload: str = Field(sa_column=Column(Text, nullable=False))


class IngestCounter(SQLModel, table=True):
    __tablename__ = "ingest_counter"
    name: str = Field(primary_key=True, max_length=96)
    count: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))


class ApiToken(SQLModel, table=True):
    __tablename__ = "api_token"
    id: int | None = Field(default=None, primary_key=True)
    name: str
    role: str = Field(max_length=16)
    token_hash: str = Field(unique=True, max_length=64)
    created_at: datetime = _ts(nullable=False)
    last_used_at: datetime | None = _ts(nullable=True)
    revoked: bool = False


class ProvisioningTokenRecord(SQLModel, table=True):
    """A token devices enrol themselves with (``POST /api/v1/enroll``); only its SHA-256 is stored."""

    __tablename__ = "provisioning_token"
    id: int | None = Field(default=None, primary_key=True)
    token_hash: str = Field(unique=True, max_length=64)
    profile: str = Field(max_length=64)
    tags: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    max_uses: int
    uses: int = 0
    expires_at: datetime = _ts(nullable=False)
    created_at: datetime = _ts(nullable=False)
    created_by: str = Field(max_length=128)  # the operator token's name
    revoked: bool = False


class CommandRecord(SQLModel, table=True):
    __tablename__ = "command"
    command_id: str = Field(primary_key=True, max_length=64)
    device_id: str = Field(index=True, max_length=64)
    kind: str = Field(max_length=64)
    args: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    status: CommandStatus = _status(CommandStatus, CommandStatus.PENDING)
    reason: str | None = None
    result: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    created_at: datetime = _ts(nullable=False)
    acked_at: datetime | None = _ts(nullable=True)


class ModelVersionRecord(SQLModel, table=True):
    """A trained model (from a round, a burst job or the starter) and its build outcome."""

    __tablename__ = "model_version"
    version: str = Field(primary_key=True, max_length=64)
    # Assigned when the version is registered: strictly increasing across versions, signed into its releases.
    # (NULL-able in SQL only: migration 0005 could not add NOT NULL on SQLite without rebuilding the table.)
    release: int = Field(sa_column=Column(Integer, nullable=True, unique=True, index=True))
    task: str = Field(max_length=64)
    source_kind: str = Field(max_length=16)  # a ModelSource (tests register versions of their own kinds)
    source_id: str = Field(max_length=64)
    created_at: datetime = _ts(nullable=False)
    status: ModelVersionStatus = _status(ModelVersionStatus, ModelVersionStatus.BUILDING)
    reason: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class ModelArtifactRecord(SQLModel, table=True):
    """One TFLite variant of a model version: published (signed, downloadable) or rejected by the gate."""

    __tablename__ = "model_artifact"
    model_version: str = Field(primary_key=True, foreign_key="model_version.version", ondelete="CASCADE")
    variant: str = Field(primary_key=True, max_length=16)
    published: bool
    reason: str | None = None
    path: str | None = None
    size_bytes: int | None = None
    sha256: str | None = Field(default=None, max_length=64)
    accuracy: float | None = None
    signed_manifest: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))


class DeploymentRecord(SQLModel, table=True):
    __tablename__ = "deployment"
    id: int | None = Field(default=None, primary_key=True)
    model_version: str = Field(foreign_key="model_version.version", max_length=64)
    targets: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    waves: list[float] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    failure_threshold: float = 0.0
    wave_timeout_s: float = 600.0
    current_wave: int = 0
    status: DeploymentStatus = _status(DeploymentStatus, DeploymentStatus.RUNNING)
    reason: str | None = None
    rollback: bool = False  # an operator's explicit rollback to a lower release
    rollback_of: int | None = None  # the deployment this one rolls back
    # Past it, targets still pending or sent become timed_out and the deployment ends (None: no deadline).
    deadline_at: datetime | None = _ts(nullable=True)
    created_at: datetime = _ts(nullable=False)
    updated_at: datetime = _ts(nullable=False)


class DeploymentReleaseRecord(SQLModel, table=True):
    """The signed release a deployment issues for one variant: what its devices download and verify."""

    __tablename__ = "deployment_release"
    deployment_id: int = Field(primary_key=True, foreign_key="deployment.id", ondelete="CASCADE")
    variant: str = Field(primary_key=True, max_length=16)
    signed_release: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    expires_at: datetime = _ts(nullable=False)


class DeploymentTargetRecord(SQLModel, table=True):
    __tablename__ = "deployment_target"
    deployment_id: int = Field(primary_key=True, foreign_key="deployment.id", ondelete="CASCADE")
    device_id: str = Field(primary_key=True, max_length=64)
    wave: int
    variant: str | None = Field(default=None, max_length=16)
    command_id: str | None = Field(default=None, max_length=64)
    # SHA-256 (hex) of the download token sent to this device with its command; the token itself is not kept.
    token_hash: str | None = Field(default=None, max_length=64, index=True)
    status: TargetStatus = _status(TargetStatus, TargetStatus.PENDING)
    reason: str | None = None
    # The model the device reported active when the deployment was created: what a rollback re-deploys.
    previous_model: str | None = Field(default=None, max_length=64)
    sent_at: datetime | None = _ts(nullable=True)
    finished_at: datetime | None = _ts(nullable=True)


class RoundRecord(SQLModel, table=True):
    """A federated run (one or more Flower rounds) and everything decided about it."""

    __tablename__ = "fl_round"
    id: int | None = Field(default=None, primary_key=True)
    schedule_id: str | None = Field(default=None, max_length=64)
    task: str = Field(max_length=64)
    strategy: Strategy = Field(sa_type=StrEnumColumn(Strategy), nullable=False)
    config: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    status: RoundStatus = _status(RoundStatus, RoundStatus.PENDING)
    reason: str | None = None
    invited: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    skipped: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    participants: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    metrics: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    model_version: str | None = Field(default=None, max_length=64)
    job_id: int | None = None  # the burst step's job
    created_at: datetime = _ts(nullable=False)
    finished_at: datetime | None = _ts(nullable=True)


class ScheduleRecord(SQLModel, table=True):
    """What an operator asked for; APScheduler keeps the trigger state in its own table (same database)."""

    __tablename__ = "fl_schedule"
    id: str = Field(primary_key=True, max_length=64)
    definition: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: datetime = _ts(nullable=False)


class JobRecord(SQLModel, table=True):
    """A burst training job (finetune / distill / qat) and where it ran."""

    __tablename__ = "burst_job"
    id: int | None = Field(default=None, primary_key=True)
    kind: JobKind = Field(sa_type=StrEnumColumn(JobKind), nullable=False)
    task: str = Field(max_length=64)
    spec: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    resources: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    status: JobStatus = _status(JobStatus, JobStatus.QUEUED)
    reason: str | None = None
    placement: str = Field(max_length=16)  # burst | local
    placement_reason: str
    backend_job_id: str | None = Field(default=None, max_length=128)
    progress: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    metrics: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    logs_tail: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    model_version: str | None = Field(default=None, max_length=64)
    out_dir: str
    deploy: bool = False
    round_id: int | None = None  # the round this job is the burst step of
    created_at: datetime = _ts(nullable=False)
    started_at: datetime | None = _ts(nullable=True)
    finished_at: datetime | None = _ts(nullable=True)
