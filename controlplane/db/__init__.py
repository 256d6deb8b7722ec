"""Persistence: SQLModel tables, engine, migrations."""

from controlplane.db._engine import create_db_engine, migrate
from controlplane.db._models import (
    ApiToken,
    CommandRecord,
    Device,
    DeviceTag,
    IngestCounter,
    TelemetryRecord,
    utcnow,
)

__all__ = [
    "ApiToken",
    "CommandRecord",
    "Device",
    "DeviceTag",
    "IngestCounter",
    "TelemetryRecord",
    "create_db_engine",
    "migrate",
    "utcnow",
]
