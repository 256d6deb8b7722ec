"""API shapes of deployments (rollouts of a model version to devices, wave by wave)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import msgspec

from controlplane._bounds import NAME_PATTERN, Name
from controlplane.devices.schemas import TAG_PATTERN
from controlplane.statuses import DeploymentStatus, TargetStatus

__all__ = ["DeploymentCreate", "DeploymentRead", "TargetRead", "Targets"]

Percent = Annotated[float, msgspec.Meta(gt=0, le=100)]


class Targets(msgspec.Struct, forbid_unknown_fields=True):
    """Devices matching ANY of these (an empty selector matches nothing)."""

    profiles: Annotated[list[Name], msgspec.Meta(max_length=1000)] = msgspec.field(default_factory=list)
    tags: Annotated[list[Annotated[str, msgspec.Meta(pattern=TAG_PATTERN, max_length=64)]],
                    msgspec.Meta(max_length=1000)] = msgspec.field(default_factory=list)
    device_ids: Annotated[list[Annotated[str, msgspec.Meta(pattern=NAME_PATTERN, max_length=64)]],
                          msgspec.Meta(max_length=100_000)] = msgspec.field(default_factory=list)
    all: bool = False


class DeploymentCreate(msgspec.Struct, forbid_unknown_fields=True):
    model_version: Name
    targets: Targets
    # Cumulative percentages of the targets per wave, e.g. [10, 50, 100]; the last must be 100.
    waves: Annotated[list[Percent], msgspec.Meta(min_length=1, max_length=20)] = msgspec.field(
        default_factory=lambda: [100.0])
    # Fraction of a wave's devices that may fail before the rollout halts (0: any failure halts it).
    failure_threshold: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.0
    # How long an online device may take to answer its command before it counts as failed. (An offline device
    # is not failed: its target stays pending, or sent, until it comes back or the deadline passes.)
    wave_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=86_400)] = 600.0
    # Give up on devices that have not answered by then (seconds from now, or a time; not both): their targets
    # become timed_out, which is not counted as a failure. Without one the deployment waits for them until it
    # is cancelled or a newer deployment supersedes it.
    deadline_s: Annotated[float, msgspec.Meta(gt=0, le=90 * 86_400)] | None = None
    deadline: Annotated[datetime, msgspec.Meta(extra_json_schema={"format": "date-time", "maxLength": 64})] | None = None
    # Needed to deploy a version whose release is lower than one already deployed; devices accept such a
    # release only when it is signed as a rollback.
    rollback: bool = False


class TargetRead(msgspec.Struct):
    device_id: str
    wave: int
    variant: str | None
    status: TargetStatus
    reason: str | None
    command_id: str | None
    previous_model: str | None  # what the device ran before: what a rollback re-deploys


class DeploymentRead(msgspec.Struct):
    id: int
    model_version: str
    release: int
    rollback: bool
    status: DeploymentStatus
    reason: str | None
    rollback_of: int | None
    deadline: datetime | None
    waves: list[float]
    current_wave: int
    failure_threshold: float
    created_at: datetime
    updated_at: datetime
    counts: dict[str, int]
    targets: list[TargetRead]
