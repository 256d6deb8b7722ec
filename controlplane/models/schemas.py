"""API shapes of the model registry."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

from controlplane.statuses import ModelVersionStatus

__all__ = ["ArtifactRead", "ModelRead"]


class ArtifactRead(msgspec.Struct):
    variant: str
    published: bool
    reason: str | None
    size_bytes: int | None
    sha256: str | None
    accuracy: float | None
    manifest_url: str | None
    artifact_url: str | None


class ModelRead(msgspec.Struct):
    version: str
    release: int  # assigned at registration, strictly increasing across versions; signed into its releases
    task: str
    source_kind: str  # round | burst | starter (a ModelSource)
    source_id: str
    status: ModelVersionStatus
    reason: str | None
    created_at: datetime
    metrics: dict[str, Any]
    variants: list[ArtifactRead]
