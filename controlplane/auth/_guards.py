"""Bearer-token authentication middleware and role guards for Litestar."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult

from controlplane.auth._tokens import Role, TokenInfo, verify_token

__all__ = ["BearerTokenMiddleware", "requires"]


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


def requires(role: Role) -> Callable[[ASGIConnection[Any, Any, Any, Any], BaseRouteHandler], None]:
    """A guard letting through tokens whose role is at least `role`."""

    def guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
        user = connection.scope.get("user")
        if not isinstance(user, TokenInfo):
            raise NotAuthorizedException("missing bearer token")
        if not user.role.allows(role):
            raise PermissionDeniedException(f"this needs the {role} role; the token has {user.role}")

    return guard
