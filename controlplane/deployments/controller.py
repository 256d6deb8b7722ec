"""HTTP API of deployments."""

from __future__ import annotations

from typing import ClassVar

from litestar import Controller, get, post
from litestar.di import NamedDependency
from litestar.params import JSONBody

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
    def create(self, data: JSONBody[DeploymentCreate], deployment_service: NamedDependency[DeploymentService]) -> DeploymentRead:
        """Sets the desired model per target device and sends `deploy_model` wave by wave."""
        return deployment_service.create(data)

    @get("/", guards=[requires(Role.VIEWER)], sync_to_thread=True)
    def list_deployments(self, deployment_service: NamedDependency[DeploymentService]) -> list[DeploymentRead]:
        return deployment_service.list_all()

    @get("/{deployment_id:int}", guards=[requires(Role.VIEWER)], sync_to_thread=True)
    def get_deployment(self, deployment_id: RowId, deployment_service: NamedDependency[DeploymentService]) -> DeploymentRead:
        """Per-device progress."""
        return deployment_service.get(deployment_id)

    @post("/{deployment_id:int}/pause", guards=[requires(Role.OPERATOR)], sync_to_thread=True, status_code=200)
    def pause(self, deployment_id: RowId, deployment_service: NamedDependency[DeploymentService]) -> DeploymentRead:
        """Send nothing new; devices already sent to may finish. 409 unless running."""
        return deployment_service.pause(deployment_id)

    @post("/{deployment_id:int}/resume", guards=[requires(Role.OPERATOR)], sync_to_thread=True, status_code=200)
    def resume(self, deployment_id: RowId, deployment_service: NamedDependency[DeploymentService]) -> DeploymentRead:
        """Go on where a pause stopped. 409 unless paused."""
        return deployment_service.resume(deployment_id)

    @post("/{deployment_id:int}/cancel", guards=[requires(Role.OPERATOR)], sync_to_thread=True, status_code=200)
    def cancel(self, deployment_id: RowId, deployment_service: NamedDependency[DeploymentService]) -> DeploymentRead:
        """Cancel unfinished targets and close every download token. 409 unless running or paused."""
        return deployment_service.cancel(deployment_id)

    @post("/{deployment_id:int}/rollback", guards=[requires(Role.OPERATOR)], sync_to_thread=True, status_code=201)
    def rollback(self, deployment_id: RowId, deployment_service: NamedDependency[DeploymentService]) -> list[DeploymentRead]:
        """Re-deploy to the devices that installed this deployment's model the model each ran before, signed as a
        rollback: the new deployments (one per previous model). Cancels this one first if it still runs. 409 when
        no device can be rolled back (the reason names each)."""
        return deployment_service.rollback(deployment_id)
