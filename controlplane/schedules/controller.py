"""HTTP API of round schedules."""

from __future__ import annotations

from typing import ClassVar

from litestar import Controller, delete, get, post
from litestar.di import NamedDependency
from litestar.params import JSONBody
from litestar.status_codes import HTTP_201_CREATED, HTTP_204_NO_CONTENT

from controlplane._bounds import NameParam
from controlplane._openapi import errors
from controlplane.auth import Role
from controlplane.auth._guards import requires
from controlplane.schedules.schemas import ScheduleCreate, ScheduleRead
from controlplane.schedules.service import ScheduleService

__all__ = ["ScheduleController"]


class ScheduleController(Controller):
    path = "/api/v1/schedules"
    tags: ClassVar[list[str]] = ["rounds"]  # type: ignore[misc]

    @post("/", guards=[requires(Role.OPERATOR)], sync_to_thread=True, status_code=HTTP_201_CREATED,
          responses=errors(409))
    def create(self, data: JSONBody[ScheduleCreate], schedule_service: NamedDependency[ScheduleService]) -> ScheduleRead:
        """A recurring round: `cron` (UTC crontab) or `interval_s`; survives control-plane restarts."""
        return schedule_service.create(data)

    @get("/", guards=[requires(Role.VIEWER)], sync_to_thread=True)
    def list_schedules(self, schedule_service: NamedDependency[ScheduleService]) -> list[ScheduleRead]:
        return schedule_service.list_all()

    @get("/{schedule_id:str}", guards=[requires(Role.VIEWER)], sync_to_thread=True)
    def get_schedule(self, schedule_id: NameParam, schedule_service: NamedDependency[ScheduleService]) -> ScheduleRead:
        return schedule_service.get(schedule_id)

    @delete("/{schedule_id:str}", guards=[requires(Role.OPERATOR)], sync_to_thread=True,
            status_code=HTTP_204_NO_CONTENT)
    def delete_schedule(self, schedule_id: NameParam, schedule_service: NamedDependency[ScheduleService]) -> None:
        schedule_service.delete(schedule_id)
