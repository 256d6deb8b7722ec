"""HTTP API of burst jobs."""

from __future__ import annotations

from typing import Annotated, ClassVar

from litestar import Controller, get, post
from litestar.di import NamedDependency
from litestar.params import JSONBody, Parameter
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED

from controlplane._bounds import RowId
from controlplane._openapi import errors
from controlplane.auth import Role
from controlplane.auth._guards import requires
from controlplane.burst.schemas import JobCreate, JobRead
from controlplane.burst.service import JobService

__all__ = ["JobController"]


class JobController(Controller):
    path = "/api/v1/jobs"
    tags: ClassVar[list[str]] = ["jobs"]  # type: ignore[misc]

    @post("/", guards=[requires(Role.OPERATOR)], sync_to_thread=True, status_code=HTTP_201_CREATED,
          summary="Submit a burst training job", responses=errors(404))
    def submit(self, data: JSONBody[JobCreate], job_service: NamedDependency[JobService]) -> JobRead:
        """Placement (burst on Ray, or local) is decided and recorded with its reason."""
        return job_service.submit(data)

    @get("/", guards=[requires(Role.VIEWER)], sync_to_thread=True)
    def list_jobs(self, job_service: NamedDependency[JobService],
                  limit: Annotated[int, Parameter(ge=1, le=1000)] = 100) -> list[JobRead]:
        return job_service.list_all(limit)

    @get("/{job_id:int}", guards=[requires(Role.VIEWER)], sync_to_thread=True)
    def get_job(self, job_id: RowId, job_service: NamedDependency[JobService]) -> JobRead:
        """Status, placement and its reason, progress, metrics, logs tail, model_version."""
        return job_service.get(job_id)

    @post("/{job_id:int}/cancel", guards=[requires(Role.OPERATOR)], sync_to_thread=True, status_code=HTTP_200_OK,
          responses=errors(409))
    def cancel(self, job_id: RowId, job_service: NamedDependency[JobService]) -> JobRead:
        return job_service.cancel(job_id)
