"""HTTP API of rounds."""

from __future__ import annotations

from typing import Annotated, ClassVar

from litestar import Controller, get, post
from litestar.di import NamedDependency
from litestar.params import JSONBody, Parameter
from litestar.status_codes import HTTP_201_CREATED

from controlplane._bounds import RowId
from controlplane.auth import Role
from controlplane.auth._guards import requires
from controlplane.rounds.schemas import RoundCreate, RoundRead
from controlplane.rounds.service import RoundService

__all__ = ["RoundController"]


class RoundController(Controller):
    path = "/api/v1/rounds"
    tags: ClassVar[list[str]] = ["rounds"]  # type: ignore[misc]

    @post("/", guards=[requires(Role.OPERATOR)], sync_to_thread=True, status_code=HTTP_201_CREATED,
          summary="Start a federated round now")
    def start(self, data: JSONBody[RoundCreate], round_service: NamedDependency[RoundService]) -> RoundRead:
        """Invites the devices eligible now; the record says who was invited and why the others were not."""
        return round_service.start(data)

    @get("/", guards=[requires(Role.VIEWER)], sync_to_thread=True)
    def list_rounds(self, round_service: NamedDependency[RoundService],
                    limit: Annotated[int, Parameter(ge=1, le=1000)] = 100) -> list[RoundRead]:
        return round_service.list_all(limit)

    @get("/{round_id:int}", guards=[requires(Role.VIEWER)], sync_to_thread=True)
    def get_round(self, round_id: RowId, round_service: NamedDependency[RoundService]) -> RoundRead:
        """Status, participants, per-round metrics, and which devices were skipped and why."""
        return round_service.get(round_id)
