"""Every status the control plane stores, compares or reports, one :class:`enum.StrEnum` per lifecycle.

A leaf module (standard library only) so that tables, schemas, services, controllers and the CLI all import the
same names. The values are the strings already stored in the database and sent over the API: a StrEnum member
equals its string, SQL columns stay ``VARCHAR`` and msgspec encodes and decodes members as their values.
``tests/controlplane/test_statuses.py`` fails when a status literal is compared or stored outside its enum.
"""

from __future__ import annotations

import enum

__all__ = [
    "CommandStatus",
    "DeploymentStatus",
    "JobStatus",
    "ModelSource",
    "ModelVersionStatus",
    "RoundStatus",
    "TargetStatus",
]


class RoundStatus(enum.StrEnum):
    """A federated round (``fl_round.status``)."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        return self in (RoundStatus.SUCCEEDED, RoundStatus.FAILED)


class JobStatus(enum.StrEnum):
    """A burst training job (``burst_job.status``)."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"

    @property
    def finished(self) -> bool:
        return self not in (JobStatus.QUEUED, JobStatus.RUNNING)


class CommandStatus(enum.StrEnum):
    """A command sent to a device (``command.status``): waiting for its ack, or acked ok / error."""

    PENDING = "pending"
    OK = "ok"
    ERROR = "error"


class ModelVersionStatus(enum.StrEnum):
    """A model version (``model_version.status``): ready once at least one variant passed the gate."""

    BUILDING = "building"
    READY = "ready"
    FAILED = "failed"


class ModelSource(enum.StrEnum):
    """What produced a model version (``model_version.source_kind``)."""

    ROUND = "round"
    BURST = "burst"
    STARTER = "starter"


class DeploymentStatus(enum.StrEnum):
    """A rollout (``deployment.status``)."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    HALTED = "halted"
    FAILED = "failed"


class TargetStatus(enum.StrEnum):
    """One device of a rollout (``deployment_target.status``)."""

    WAITING = "waiting"
    SENT = "sent"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
