"""Bearer-token authentication middleware and role guards for Litestar."""

from __future__ import annotations

from typing import Any

from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult

from controlplane.auth._tokens import Role, TokenInfo, verify_token

__all__ = ["BearerTokenMiddleware", "Requires", "requires"]


class BearerTokenMiddleware(AbstractAuthenticationMiddleware):
    async def authenticate_request(self, connection: ASGIConnection[Any, Any, Any, Any]) -> AuthenticationResult:
        header = connection.headers.get("authorization", "")
        scheme, _, secret = header.partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise NotAuthorizedException("missing bearer token (Authorization: Bearer <token>)")
        engine = connection.app.state.engine
        info = verify_token(engine, secret.strip())
        if info is None:
            raise NotAuthorizedException("invalid or revoked API token")
        return AuthenticationResult(user=info, auth=secret)


class Requires:
    """A guard letting through tokens whose role is at least `role`. A class, not a closure, so that the OpenAPI
    document can read the role off the route (controlplane._openapi: 403 where a lower role exists)."""

    __slots__ = ("role",)

    def __init__(self, role: Role) -> None:
        self.role = role

    def __call__(self, connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
        user = connection.scope.get("user")
        if not isinstance(user, TokenInfo):
            raise NotAuthorizedException("missing bearer token")
        if not user.role.allows(self.role):
            raise PermissionDeniedException(f"this needs the {self.role} role; the token has {user.role}")

    @property
    def can_refuse_a_token(self) -> bool:
        """Whether a valid API token can be refused here (403): some role ranks below the one needed."""
        return any(not other.allows(self.role) for other in Role)

    def __repr__(self) -> str:
        return f"requires({self.role})"


def requires(role: Role) -> Requires:
    """A guard letting through tokens whose role is at least `role`."""
    return Requires(role)
