"""Console pages: rounds and schedules, models, deployments, jobs."""

from __future__ import annotations

from typing import Any, Final

__all__ = ["HANDLERS"]

HANDLERS: Final[list[Any]] = []
