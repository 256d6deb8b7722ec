"""API shapes of round schedules."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Final

import msgspec

from controlplane._bounds import Name
from controlplane.rounds.schemas import RoundCreate

__all__ = ["MAX_INTERVAL_S", "ScheduleCreate", "ScheduleRead"]

MAX_INTERVAL_S: Final = 366 * 86_400  # a schedule fires at least once a year


class ScheduleCreate(msgspec.Struct, forbid_unknown_fields=True):
    """A recurring round: exactly one of `cron` (crontab, 5 fields, UTC) or `interval_s`."""

    round: RoundCreate = msgspec.field(default_factory=RoundCreate)
    id: Name | None = None
    cron: Annotated[str, msgspec.Meta(pattern=r"^[ -~]{1,128}$", max_length=128)] | None = None  # printable ASCII
    interval_s: Annotated[float, msgspec.Meta(ge=1, le=MAX_INTERVAL_S)] | None = None
    max_runs: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] | None = None  # stop after this many firings


class ScheduleRead(msgspec.Struct):
    id: str
    cron: str | None
    interval_s: float | None
    max_runs: int | None
    runs: int
    next_run_time: datetime | None
    round: dict[str, Any]
    created_at: datetime
