"""Model registry: built, gated and signed TFLite variants of each model version, and their files."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import msgspec
from sqlalchemy import Engine, func
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from agent.manifest import SignedManifest, decode_signed
from controlplane._errors import Conflict, NotFound
from controlplane.db import ModelArtifactRecord, ModelVersionRecord, as_utc, utcnow
from controlplane.models.schemas import ArtifactRead, ModelRead
from controlplane.statuses import ModelVersionStatus

__all__ = ["ModelService", "artifact_url", "manifest_url"]


def manifest_url(version: str, variant: str) -> str:
    return f"/api/v1/models/{version}/variants/{variant}/manifest"


def artifact_url(version: str, variant: str) -> str:
    return f"/api/v1/models/{version}/variants/{variant}/artifact"


class ModelService:
    def __init__(self, engine: Engine, artifacts_dir: Path) -> None:
        self.engine = engine
        self.artifacts_dir = artifacts_dir
        artifacts_dir.mkdir(parents=True, exist_ok=True)

    def start_version(self, version: str, task: str, source_kind: str, source_id: str) -> int:
        """Register a version; returns its release number (one above every registered version's)."""
        for _ in range(10):
            with Session(self.engine) as session:
                if session.get(ModelVersionRecord, version) is not None:
                    raise Conflict(f"model version '{version}' exists")
                highest = session.exec(select(func.max(ModelVersionRecord.release))).one() or 0
                session.add(ModelVersionRecord(version=version, release=highest + 1, task=task,
                                               source_kind=source_kind, source_id=source_id, created_at=utcnow()))
                try:
                    session.commit()
                except IntegrityError:  # another version took this release number (or this name) meanwhile
                    session.rollback()
                    continue
                return highest + 1
        raise Conflict(f"could not assign a release number to model version '{version}': retry")

    def register_build(self, version: str, published: list[tuple[SignedManifest, Path]],
                       rejected: dict[str, str], metrics: dict[str, Any]) -> ModelRead:
        """Record a finished build: the signed artifacts are copied into the registry's own directory."""
        target = self.artifacts_dir / version
        target.mkdir(parents=True, exist_ok=True)
        with Session(self.engine) as session:
            record = session.get(ModelVersionRecord, version)
            if record is None:
                raise NotFound(f"no model version '{version}'")
            for signed, path in published:
                manifest = signed.manifest
                stored = target / manifest.file_name
                if path.resolve() != stored.resolve():
                    shutil.copyfile(path, stored)
                session.add(ModelArtifactRecord(
                    model_version=version, variant=manifest.variant, published=True, path=str(stored),
                    size_bytes=manifest.size_bytes, sha256=manifest.sha256,
                    accuracy=manifest.metrics.get("accuracy"), signed_manifest=msgspec.to_builtins(signed),
                ))
            for variant, reason in rejected.items():
                session.add(ModelArtifactRecord(model_version=version, variant=variant, published=False,
                                                reason=reason))
            record.status = ModelVersionStatus.READY if published else ModelVersionStatus.FAILED
            record.reason = None if published else "no variant passed the accuracy gate"
            record.metrics = metrics
            session.add(record)
            session.commit()
        return self.get(version)

    def fail_version(self, version: str, reason: str) -> None:
        with Session(self.engine) as session:
            record = session.get(ModelVersionRecord, version)
            if record is not None:
                record.status, record.reason = ModelVersionStatus.FAILED, reason
                session.add(record)
                session.commit()

    def list_all(self) -> list[ModelRead]:
        with Session(self.engine) as session:
            versions = session.exec(select(ModelVersionRecord).order_by(col(ModelVersionRecord.created_at).desc()))
            return [self._read(session, v) for v in versions]

    def get(self, version: str) -> ModelRead:
        with Session(self.engine) as session:
            record = session.get(ModelVersionRecord, version)
            if record is None:
                raise NotFound(f"no model version '{version}'")
            return self._read(session, record)

    def published(self, version: str) -> dict[str, ModelArtifactRecord]:
        """Published variants of a version, by variant name."""
        with Session(self.engine) as session:
            rows = session.exec(select(ModelArtifactRecord).where(
                ModelArtifactRecord.model_version == version, col(ModelArtifactRecord.published).is_(True)))
            return {r.variant: r for r in rows}

    def artifact(self, version: str, variant: str) -> ModelArtifactRecord:
        artifact = self.published(version).get(variant)
        if artifact is None or artifact.path is None:
            raise NotFound(f"model '{version}' has no published variant '{variant}'")
        return artifact

    def signed_manifest(self, version: str, variant: str) -> SignedManifest:
        artifact = self.artifact(version, variant)
        return decode_signed(msgspec.json.encode(artifact.signed_manifest))

    @staticmethod
    def _read(session: Session, record: ModelVersionRecord) -> ModelRead:
        rows = session.exec(select(ModelArtifactRecord).where(ModelArtifactRecord.model_version == record.version)
                            .order_by(ModelArtifactRecord.variant))
        variants = [
            ArtifactRead(variant=r.variant, published=r.published, reason=r.reason, size_bytes=r.size_bytes,
                         sha256=r.sha256, accuracy=r.accuracy,
                         manifest_url=manifest_url(r.model_version, r.variant) if r.published else None,
                         artifact_url=artifact_url(r.model_version, r.variant) if r.published else None)
            for r in rows
        ]
        return ModelRead(version=record.version, release=record.release, task=record.task, source_kind=record.source_kind,
                         source_id=record.source_id, status=record.status, reason=record.reason,
                         created_at=as_utc(record.created_at), metrics=record.metrics, variants=variants)
