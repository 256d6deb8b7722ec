"""HTTP API of rounds and schedules."""

from __future__ import annotations

from typing import Annotated, ClassVar

from litestar import Controller, delete, get, post
from litestar.params import Parameter
from litestar.status_codes import HTTP_201_CREATED, HTTP_204_NO_CONTENT

from controlplane._bounds import NameParam, RowId
from controlplane.auth import Role
from controlplane.auth._guards import requires
from controlplane.rounds.scheduler import RoundScheduler
from controlplane.rounds.schemas import RoundCreate, RoundRead, ScheduleCreate, ScheduleRead
from controlplane.rounds.service import RoundService

__all__ = ["RoundController", "ScheduleController"]


class RoundController(Controller):
    path = "/api/v1/rounds"
    tags: ClassVar[list[str]] = ["rounds"]  # type: ignore[misc]

    @post("/", guards=[requires(Role.OPERATOR)], sync_to_thread=True, status_code=HTTP_201_CREATED,
          summary="Start a federated round now")
    def start(self, data: RoundCreate, round_service: RoundService) -> RoundRead:
        """Invites the devices eligible now; the record says who was invited and why the others were not."""
        return round_service.start(data)

    @get("/", guards=[requires(Role.VIEWER)], sync_to_thread=True)
    def list_rounds(self, round_service: RoundService,
                    limit: Annotated[int, Parameter(ge=1, le=1000)] = 100) -> list[RoundRead]:
        return round_service.list_all(limit)

    @get("/{round_id:int}", guards=[requires(Role.VIEWER)], sync_to_thread=True)
    def get_round(self, round_id: RowId, round_service: RoundService) -> RoundRead:
        """Status, participants, per-round metrics, and which devices were skipped and why."""
        return round_service.get(round_id)


class ScheduleController(Controller):
    path = "/api/v1/schedules"
    tags: ClassVar[list[str]] = ["rounds"]  # type: ignore[misc]

    @post("/", guards=[requires(Role.OPERATOR)], sync_to_thread=True, status_code=HTTP_201_CREATED)
    def create(self, data: ScheduleCreate, round_scheduler: RoundScheduler) -> ScheduleRead:
        """A recurring round: `cron` (UTC crontab) or `interval_s`; survives control-plane restarts."""
        return round_scheduler.create(data)

    @get("/", guards=[requires(Role.VIEWER)], sync_to_thread=True)
    def list_schedules(self, round_scheduler: RoundScheduler) -> list[ScheduleRead]:
        return round_scheduler.list_all()

    @get("/{schedule_id:str}", guards=[requires(Role.VIEWER)], sync_to_thread=True)
    def get_schedule(self, schedule_id: NameParam, round_scheduler: RoundScheduler) -> ScheduleRead:
        return round_scheduler.get(schedule_id)

    @delete("/{schedule_id:str}", guards=[requires(Role.OPERATOR)], sync_to_thread=True,
            status_code=HTTP_204_NO_CONTENT)
    def delete_schedule(self, schedule_id: NameParam, round_scheduler: RoundScheduler) -> None:
        round_scheduler.delete(schedule_id)
