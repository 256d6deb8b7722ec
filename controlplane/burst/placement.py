"""Where a burst job may run (a leaf module: the CLI imports it without the API's dependencies)."""

from __future__ import annotations

import enum

__all__ = ["Placement"]


class Placement(enum.StrEnum):
    AUTO = "auto"  # burst when it asks for accelerators or exceeds what devices may train
    BURST = "burst"
    LOCAL = "local"
