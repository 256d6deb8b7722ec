"""Persistence: SQLModel tables, engine, migrations."""

from controlplane.db._engine import create_db_engine, migrate
from controlplane.db._models import (
    ApiToken,
    CommandRecord,
    DeploymentRecord,
    DeploymentReleaseRecord,
    DeploymentTargetRecord,
    Device,
    DeviceTag,
    IngestCounter,
    JobRecord,
    ModelArtifactRecord,
    ModelVersionRecord,
    ProvisioningTokenRecord,
    RoundRecord,
    ScheduleRecord,
    TelemetryRecord,
    as_utc,
    utcnow,
)

__all__ = [
    "ApiToken",
    "CommandRecord",
    "DeploymentRecord",
    "DeploymentReleaseRecord",
    "DeploymentTargetRecord",
    "Device",
    "DeviceTag",
    "IngestCounter",
    "JobRecord",
    "ModelArtifactRecord",
    "ModelVersionRecord",
    "ProvisioningTokenRecord",
    "RoundRecord",
    "ScheduleRecord",
    "TelemetryRecord",
    "as_utc",
    "create_db_engine",
    "migrate",
    "utcnow",
]
