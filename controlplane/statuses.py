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
    """A rollout (``deployment.status``); see docs/architecture.md "Rollouts" for the transitions."""

    RUNNING = "running"  # sending wave by wave to devices as they are reachable
    PAUSED = "paused"  # sends nothing new; devices already sent to may finish (their download tokens still open)
    SUCCEEDED = "succeeded"  # every target that can run the model reported it installed
    SUSPECT = "suspect"  # succeeded, then devices predict garbage with the new model (see deployments._quality)
    HALTED = "halted"  # more devices failed than the failure threshold allows, among the devices that answered
    FAILED = "failed"  # not set any more; older rows may carry it
    TIMED_OUT = "timed_out"  # the deadline passed with targets still offline or unanswered (not failures)
    CANCELLED = "cancelled"  # by an operator: unfinished targets cancelled, download tokens closed
    SUPERSEDED = "superseded"  # newer deployments took over every target that had not finished

    @property
    def active(self) -> bool:
        """Commands may still be sent (running) or finish (paused); download tokens open."""
        return self in (DeploymentStatus.RUNNING, DeploymentStatus.PAUSED)


class TargetStatus(enum.StrEnum):
    """One device of a rollout (``deployment_target.status``)."""

    PENDING = "pending"  # not sent yet: waiting for its wave, or for the device to come online
    SENT = "sent"  # deploy_model sent; waiting for the device's ack or its reported state
    SUCCEEDED = "succeeded"  # the device acked, or reports the model active
    SUSPECT = "suspect"  # succeeded, then predicted garbage with the new model
    FAILED = "failed"  # the device reported a failure (or answered nothing within the wave timeout while online)
    TIMED_OUT = "timed_out"  # the deadline passed while pending or sent (offline): not a failure of the model
    CANCELLED = "cancelled"  # its deployment was cancelled before the device finished
    SUPERSEDED = "superseded"  # a newer deployment to this device took over
    SKIPPED = "skipped"  # no published variant this device can run

    @property
    def unfinished(self) -> bool:
        return self in (TargetStatus.PENDING, TargetStatus.SENT)

    @property
    def answered(self) -> bool:
        """The device told us how it went (counted for the failure threshold)."""
        return self in (TargetStatus.SUCCEEDED, TargetStatus.SUSPECT, TargetStatus.FAILED)
