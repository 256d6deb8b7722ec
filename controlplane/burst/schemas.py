"""API shapes of burst training jobs."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec

from controlplane._bounds import Name, TaskName
from controlplane.burst.placement import Placement
from controlplane.statuses import JobStatus
from federated.burst.spec import JobKind  # declared once, where the burst worker reads it too

__all__ = ["BurstStep", "JobCreate", "JobKind", "JobRead", "Placement", "Resources"]


class Resources(msgspec.Struct, forbid_unknown_fields=True):
    gpus: Annotated[float, msgspec.Meta(ge=0, le=64)] = 0.0
    tpus: Annotated[float, msgspec.Meta(ge=0, le=64)] = 0.0
    cpus: Annotated[float, msgspec.Meta(gt=0, le=256)] = 1.0
    memory_gb: Annotated[float, msgspec.Meta(gt=0, le=4096)] = 1.0


class _Training(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """How a burst job trains and where it may run."""

    kind: JobKind
    resources: Resources = msgspec.field(default_factory=Resources)
    time_budget_s: Annotated[float, msgspec.Meta(gt=0, le=7 * 86_400)] = 600.0
    epochs: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 20
    learning_rate: Annotated[float, msgspec.Meta(gt=0, le=10)] = 0.01
    batch_size: Annotated[int, msgspec.Meta(ge=1, le=65_536)] = 64
    placement: Placement = Placement.AUTO
    # How long the job may wait for its resources before it is given up as timed_out (Ray waits forever).
    pending_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=86_400)] = 60.0


class JobCreate(_Training, kw_only=True):
    task: TaskName = "digits"
    base_model_version: Name | None = None
    build: bool = True  # build, gate, sign the result as a model version
    deploy: bool = False  # and roll it out to every device that can run it


class BurstStep(_Training, kw_only=True):
    """A burst job a round runs on its federated result before the build (e.g. QAT to win back int8 accuracy)."""

    kind: JobKind = JobKind.QAT
    epochs: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 5
    learning_rate: Annotated[float, msgspec.Meta(gt=0, le=10)] = 0.005

    def job(self, task: str, *, build: bool, deploy: bool) -> JobCreate:
        return JobCreate(**msgspec.structs.asdict(self), task=task, build=build, deploy=deploy)


class JobRead(msgspec.Struct):
    id: int
    kind: JobKind
    task: str
    status: JobStatus
    reason: str | None
    placement: Placement  # burst | local, never auto
    placement_reason: str
    resources: dict[str, Any]
    progress: dict[str, Any]
    metrics: dict[str, Any]
    logs_tail: str
    model_version: str | None
    round_id: int | None  # the federated round whose burst step this is
    backend_job_id: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
