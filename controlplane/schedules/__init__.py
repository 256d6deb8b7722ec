"""Round schedules: recurring federated rounds (cron or interval) that survive control-plane restarts."""

from controlplane.schedules.controller import ScheduleController
from controlplane.schedules.schemas import ScheduleCreate, ScheduleRead
from controlplane.schedules.service import ScheduleService

__all__ = ["ScheduleController", "ScheduleCreate", "ScheduleRead", "ScheduleService"]
