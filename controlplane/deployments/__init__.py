"""Rollouts of model versions to devices, wave by wave."""

from controlplane.deployments.controller import DeploymentController, ReleaseDownloadController
from controlplane.deployments.service import DeploymentService, choose_variant

__all__ = ["DeploymentController", "DeploymentService", "ReleaseDownloadController", "choose_variant"]
