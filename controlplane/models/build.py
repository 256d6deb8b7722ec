"""Build → gate → sign → register a trained model (from a round or a burst job); optionally deploy it."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import Engine
from sqlmodel import Session, select

from agent.manifest import ModelSource
from controlplane.db import Device
from controlplane.deployments.schemas import DeploymentCreate, Targets
from controlplane.deployments.service import DeploymentService
from controlplane.models.service import ModelService
from federated.signing import Signer
from firmware_profiles import ModelVariant, ProfileError, get_profile

__all__ = ["ModelBuilder"]

log = structlog.get_logger("edgefleet.build")


class ModelBuilder:
    def __init__(self, engine: Engine, models: ModelService, deployments: DeploymentService, signer: Signer,
                 build_dir: Path) -> None:
        self.engine = engine
        self.models = models
        self.deployments = deployments
        self.signer = signer
        self.build_dir = build_dir

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

    def build(self, *, task_name: str, weights_path: Path, model_version: str, source: ModelSource,
              deploy: bool = False) -> str:
        """Returns the model version; it is `ready` when at least one variant passed the gate."""
        import numpy as np
        import torch

        from federated.build import build_variants
        from federated.tasks import get_task

        task = get_task(task_name)
        with np.load(weights_path) as arrays:
            state_dict = {name: torch.from_numpy(arrays[name].copy()) for name in arrays.files}
        self.models.start_version(model_version, task_name, source.kind, source.id)
        # Kept beside the build: burst jobs may start from this version (base_model_version).
        (self.build_dir / model_version).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(weights_path, self.build_dir / model_version / "weights.npz")
        try:
            result = build_variants(task, state_dict, variants=sorted(self.fleet_variants()),
                                    out_dir=self.build_dir / model_version, model_version=model_version,
                                    source=source, signer=self.signer)
        except Exception as exc:
            self.models.fail_version(model_version, f"build failed: {exc}")
            raise
        published = [(a.signed, a.path) for a in result.published if a.signed is not None and a.path is not None]
        rejected = {a.variant.value: a.reason or "rejected" for a in result.rejected}
        metrics: dict[str, Any] = {"accuracy": result.reference_accuracy, "timings_s": result.timings,
                                   "variants": {a.variant.value: a.accuracy for a in result.artifacts}}
        model = self.models.register_build(model_version, published, rejected, metrics)
        log.info("model.built", model_version=model_version, status=model.status,
                 published=[a.variant.value for a in result.published], rejected=rejected)
        if deploy and model.status == "ready":
            self.deployments.create(DeploymentCreate(model_version=model_version, targets=Targets(all=True)))
        return model_version
