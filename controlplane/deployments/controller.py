"""HTTP API of deployments."""

from __future__ import annotations

from typing import Any, ClassVar

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.exceptions import NotAuthorizedException
from litestar.params import JSONBody

from controlplane._bounds import NameParam, RowId
from controlplane._openapi import BEARER, errors
from controlplane.auth import Role
from controlplane.auth._guards import requires
from controlplane.deployments.schemas import DeploymentCreate, DeploymentRead
from controlplane.deployments.service import DeploymentService, download_authorized
from controlplane.models.controller import ARTIFACT_RESPONSES, bearer_secret, serve_artifact
from controlplane.models.service import ModelService

__all__ = ["DeploymentController", "ReleaseDownloadController"]


class DeploymentController(Controller):
    path = "/api/v1/deployments"
    tags: ClassVar[list[str]] = ["deployments"]  # type: ignore[misc]

    @post("/", guards=[requires(Role.OPERATOR)], sync_to_thread=True, summary="Roll a model version out",
          responses=errors(404))
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

    @post("/{deployment_id:int}/pause", guards=[requires(Role.OPERATOR)], sync_to_thread=True, status_code=200,
          responses=errors(409))
    def pause(self, deployment_id: RowId, deployment_service: NamedDependency[DeploymentService]) -> DeploymentRead:
        """Send nothing new; devices already sent to may finish. 409 unless running."""
        return deployment_service.pause(deployment_id)

    @post("/{deployment_id:int}/resume", guards=[requires(Role.OPERATOR)], sync_to_thread=True, status_code=200,
          responses=errors(409))
    def resume(self, deployment_id: RowId, deployment_service: NamedDependency[DeploymentService]) -> DeploymentRead:
        """Go on where a pause stopped. 409 unless paused."""
        return deployment_service.resume(deployment_id)

    @post("/{deployment_id:int}/cancel", guards=[requires(Role.OPERATOR)], sync_to_thread=True, status_code=200,
          responses=errors(409))
    def cancel(self, deployment_id: RowId, deployment_service: NamedDependency[DeploymentService]) -> DeploymentRead:
        """Cancel unfinished targets and close every download token. 409 unless running or paused."""
        return deployment_service.cancel(deployment_id)

    @post("/{deployment_id:int}/rollback", guards=[requires(Role.OPERATOR)], sync_to_thread=True, status_code=201,
          responses=errors(409))
    def rollback(self, deployment_id: RowId, deployment_service: NamedDependency[DeploymentService]) -> list[DeploymentRead]:
        """Re-deploy to the devices that installed this deployment's model the model each ran before, signed as a
        rollback: the new deployments (one per previous model). Cancels this one first if it still runs. 409 when
        no device can be rolled back (the reason names each)."""
        return deployment_service.rollback(deployment_id)


class ReleaseDownloadController(Controller):
    """What a deployment sends, ``/deployments/{id}/variants/{variant}/...``: its signed release and the artifact,
    for the download token of that deployment and variant (sent to each device in its command, withdrawn when the
    device's command is cancelled or superseded) or an API token."""

    path = "/api/v1/deployments"
    tags: ClassVar[list[str]] = ["deployments"]  # type: ignore[misc]
    security: ClassVar[list[dict[str, list[str]]]] = [{BEARER: []}, {"download": []}]  # type: ignore[misc]

    @get("/{deployment_id:int}/variants/{variant:str}/manifest", sync_to_thread=True, exclude_from_auth=True)
    def release(self, request: Request[Any, Any, Any], deployment_id: RowId, variant: NameParam,
                deployment_service: NamedDependency[DeploymentService]) -> Response[Any]:
        _authorize(request, deployment_id, variant)
        signed = deployment_service.signed_release(deployment_id, variant)
        return Response(msgspec.json.encode(signed), media_type="application/json")

    @get("/{deployment_id:int}/variants/{variant:str}/artifact", sync_to_thread=True, exclude_from_auth=True,
         media_type="application/octet-stream", responses=ARTIFACT_RESPONSES)
    def release_artifact(self, request: Request[Any, Any, Any], deployment_id: RowId, variant: NameParam,
                         deployment_service: NamedDependency[DeploymentService],
                         model_service: NamedDependency[ModelService]) -> Response[Any]:
        _authorize(request, deployment_id, variant)
        deployment_service.signed_release(deployment_id, variant)  # 404 unless the deployment sends this variant
        version = deployment_service.model_version_of(deployment_id)
        return serve_artifact(request, model_service.artifact(version, variant))


def _authorize(request: Request[Any, Any, Any], deployment_id: int, variant: str) -> None:
    """An API token of any role, or the download token of this deployment and variant while it is valid."""
    from controlplane.auth import verify_token

    secret = bearer_secret(request)
    engine = request.app.state.engine
    if verify_token(engine, secret) is not None:
        return
    why = download_authorized(engine, deployment_id, variant, secret)
    if why is not None:
        raise NotAuthorizedException(f"download token refused for deployment {deployment_id} variant {variant}: {why}")
