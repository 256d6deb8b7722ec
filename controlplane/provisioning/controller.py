"""HTTP API of provisioning: operators manage tokens; devices enrol themselves with one."""

from __future__ import annotations

from typing import Any, ClassVar, Final

from litestar import Controller, Request, delete, get, post
from litestar.connection import ASGIConnection
from litestar.di import NamedDependency
from litestar.exceptions import NotAuthorizedException
from litestar.handlers.base import BaseRouteHandler
from litestar.params import JSONBody
from litestar.status_codes import HTTP_204_NO_CONTENT

from controlplane._bounds import RowId
from controlplane._openapi import errors
from controlplane.auth import Role, TokenInfo
from controlplane.auth._guards import requires
from controlplane.provisioning.schemas import (
    Enrolled,
    EnrollRequest,
    ProvisioningTokenCreate,
    ProvisioningTokenCreated,
    ProvisioningTokenRead,
)
from controlplane.provisioning.service import PROVISIONING_PREFIX, ProvisioningService, token_known

__all__ = ["EnrollController", "ProvisioningController"]

# An enrolment body is a device id, a CSR (<= 16 KiB), a public key and a version: far below the app's 1 MiB.
_ENROLL_MAX_BODY: Final = 64 * 1024


def _bearer(connection: ASGIConnection[Any, Any, Any, Any]) -> str:
    scheme, _, secret = connection.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise NotAuthorizedException("missing provisioning token (Authorization: Bearer <provisioning token>)")
    return secret.strip()


def provisioning_token_guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Let through provisioning tokens issued here, before the body is read; operator tokens cannot enrol."""
    secret = _bearer(connection)
    if not secret.startswith(PROVISIONING_PREFIX):
        raise NotAuthorizedException("only a provisioning token can enrol a device (edgefleet provisioning "
                                     "create); operator API tokens cannot")
    if not token_known(connection.app.state.engine, secret):
        raise NotAuthorizedException("unknown provisioning token")


class ProvisioningController(Controller):
    path = "/api/v1/provisioning-tokens"
    tags: ClassVar[list[str]] = ["provisioning"]  # type: ignore[misc]

    @post("/", guards=[requires(Role.ADMIN)], sync_to_thread=True, summary="Create a provisioning token")
    def create(self, request: Request[TokenInfo, Any, Any], data: JSONBody[ProvisioningTokenCreate],
               provisioning_service: NamedDependency[ProvisioningService]) -> ProvisioningTokenCreated:
        """Returns the token once (only its hash is kept), with the fleet CA devices verify this server with."""
        return provisioning_service.create(data, created_by=request.user.name)

    @get("/", guards=[requires(Role.ADMIN)], sync_to_thread=True, summary="List provisioning tokens")
    def list_tokens(self, provisioning_service: NamedDependency[ProvisioningService]) -> list[ProvisioningTokenRead]:
        return provisioning_service.find()

    @delete("/{token_id:int}", guards=[requires(Role.ADMIN)], sync_to_thread=True,
            status_code=HTTP_204_NO_CONTENT, summary="Revoke a provisioning token")
    def revoke(self, token_id: RowId, provisioning_service: NamedDependency[ProvisioningService]) -> None:
        provisioning_service.revoke(token_id)


class EnrollController(Controller):
    path = "/api/v1/enroll"
    tags: ClassVar[list[str]] = ["provisioning"]  # type: ignore[misc]

    # Not behind the operator-token middleware: a provisioning token authenticates this route, and only this one.
    @post("/", guards=[provisioning_token_guard], exclude_from_auth=True, sync_to_thread=True,
          request_max_body_size=_ENROLL_MAX_BODY, security=[{"provisioning": []}], responses=errors(409),
          summary="Enrol this device with a provisioning token")
    def enroll(self, request: Request[Any, Any, Any], data: JSONBody[EnrollRequest],
               provisioning_service: NamedDependency[ProvisioningService]) -> Enrolled:
        """Enrols the device with the token's profile and tags; returns its broker credentials, its client
        certificate (when a CSR was sent), the fleet CA and the model-signing key — once."""
        controlplane_url = f"{request.url.scheme}://{request.url.netloc}"
        return provisioning_service.enroll(_bearer(request), data, controlplane_url)
