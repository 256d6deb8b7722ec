"""The model pipeline: weights → build → gate → sign → register → (deploy), for rounds and burst jobs alike.

Model versions are named here and only here (:func:`round_version`, :func:`burst_version`); the weights a version
was built from stay beside its build, where warm-started rounds and burst jobs find them (:meth:`weights_of`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import Engine
from sqlmodel import Session, select

from agent.manifest import ModelSource as ManifestSource
from controlplane.db import Device
from controlplane.deployments.schemas import DeploymentCreate, Targets
from controlplane.deployments.service import DeploymentService
from controlplane.models.service import ModelService
from controlplane.statuses import ModelSource, ModelVersionStatus
from federated.signing import Signer
from firmware_profiles import ModelVariant, ProfileError, get_profile

__all__ = ["ModelPipeline", "burst_version", "round_version"]

log = structlog.get_logger("edgefleet.build")


def round_version(round_id: int) -> str:
    """The model version a federated round publishes."""
    return f"round-{round_id}"


def burst_version(job_id: int, kind: str, round_id: int | None = None) -> str:
    """The model version a burst job publishes: a round's burst step is named after the round it refines."""
    return f"round-{round_id}-{kind}" if round_id is not None else f"job-{job_id}-{kind}"


class ModelPipeline:
    def __init__(self, engine: Engine, models: ModelService, deployments: DeploymentService, signer: Signer,
                 build_dir: Path) -> None:
        self.engine = engine
        self.models = models
        self.deployments = deployments
        self.signer = signer
        self.build_dir = build_dir

    def weights_of(self, version: str) -> Path:
        """Where the weights model `version` was built from are kept (the file may not exist)."""
        return self.build_dir / version / "weights.npz"

    def fleet_variants(self) -> set[ModelVariant]:
        """Every variant some enrolled device class may run (fp32, the gate's reference, is always built)."""
        variants = {ModelVariant.FP32}
        with Session(self.engine) as session:
            for profile_name in set(session.exec(select(Device.profile))):
                try:
                    variants.update(get_profile(profile_name).variants)
                except ProfileError:
                    continue
        return variants

    def publish(self, *, weights: Path, task: str, name: str, source: ModelSource, source_id: str,
                deploy: bool = False) -> str:
        """Build, gate, sign and register `weights` (a state_dict .npz of `task`'s model) as model version `name`;
        with `deploy`, roll it out to every device once at least one variant passed the gate. Returns the version
        (its status says whether it is ready); raises when the build itself fails (the version is then failed)."""
        import numpy as np
        import torch

        from federated.build import build_variants
        from federated.tasks import get_task

        task_spec = get_task(task)
        with np.load(weights) as arrays:
            state_dict = {key: torch.from_numpy(arrays[key].copy()) for key in arrays.files}
        self.models.start_version(name, task, source, source_id)
        # Kept beside the build: burst jobs and warm-started rounds may start from this version.
        self.weights_of(name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(weights, self.weights_of(name))
        try:
            result = build_variants(task_spec, state_dict, variants=sorted(self.fleet_variants()),
                                    out_dir=self.build_dir / name, model_version=name,
                                    source=ManifestSource(kind=source.value, id=source_id), signer=self.signer)
        except Exception as exc:
            self.models.fail_version(name, f"build failed: {exc}")
            raise
        published = [(a.signed, a.path) for a in result.published if a.signed is not None and a.path is not None]
        rejected = {a.variant.value: a.reason or "rejected" for a in result.rejected}
        metrics: dict[str, Any] = {"accuracy": result.reference_accuracy, "timings_s": result.timings,
                                   "variants": {a.variant.value: a.accuracy for a in result.artifacts}}
        model = self.models.register_build(name, published, rejected, metrics)
        log.info("model.built", model_version=name, status=model.status,
                 published=[a.variant.value for a in result.published], rejected=rejected)
        if deploy and model.status is ModelVersionStatus.READY:
            self.deployments.create(DeploymentCreate(model_version=name, targets=Targets(all=True)))
        return name
