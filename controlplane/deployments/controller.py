"""HTTP API of deployments."""

from __future__ import annotations

from typing import ClassVar

from litestar import Controller, get, post

from controlplane._bounds import RowId
from controlplane.auth import Role
from controlplane.auth._guards import requires
from controlplane.deployments.schemas import DeploymentCreate, DeploymentRead
from controlplane.deployments.service import DeploymentService

__all__ = ["DeploymentController"]


class DeploymentController(Controller):
    path = "/api/v1/deployments"
    tags: ClassVar[list[str]] = ["deployments"]  # type: ignore[misc]

    @post("/", guards=[requires(Role.OPERATOR)], sync_to_thread=True, summary="Roll a model version out")
    def create(self, data: DeploymentCreate, deployment_service: DeploymentService) -> DeploymentRead:
        """Sets the desired model per target device and sends `deploy_model` wave by wave."""
        return deployment_service.create(data)

    @get("/", guards=[requires(Role.VIEWER)], sync_to_thread=True)
    def list_deployments(self, deployment_service: DeploymentService) -> list[DeploymentRead]:
        return deployment_service.list_all()

    @get("/{deployment_id:int}", guards=[requires(Role.VIEWER)], sync_to_thread=True)
    def get_deployment(self, deployment_id: RowId, deployment_service: DeploymentService) -> DeploymentRead:
        """Per-device progress."""
        return deployment_service.get(deployment_id)
