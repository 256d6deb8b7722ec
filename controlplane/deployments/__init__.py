"""Rollouts of model versions to devices, wave by wave."""

from controlplane.deployments.controller import DeploymentController
from controlplane.deployments.service import DeploymentService, choose_variant

__all__ = ["DeploymentController", "DeploymentService", "choose_variant"]
