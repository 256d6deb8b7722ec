"""Who is looking at the console: the operator's API token, kept in an HttpOnly, SameSite=Strict cookie.

The console authenticates with the same tokens and roles as the API (``controlplane.auth``): a page or action
guarded by :func:`console_requires` lets through exactly the tokens the API would. Without a valid cookie a page
answers with a redirect to the login page (an htmx request gets ``HX-Redirect``); with a role too low, 403.
Forms are CSRF-protected by Litestar's ``CSRFConfig`` (double-submit cookie), wired in the app factory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final
from urllib.parse import quote

from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler

from controlplane.auth import Role, TokenInfo, verify_token

__all__ = ["COOKIE", "PREFIX", "LoginRequired", "console_requires", "console_user", "safe_next"]

PREFIX: Final = "/console"
COOKIE: Final = "edgefleet_console"


class LoginRequired(NotAuthorizedException):
    """No valid console cookie: the console's exception handler answers with the login page's address."""

    def __init__(self, next_path: str) -> None:
        super().__init__("log in with an API token")
        self.next_path = next_path


def console_user(connection: ASGIConnection[Any, Any, Any, Any]) -> TokenInfo | None:
    """The token in the console cookie, if it is one the API would accept now (a revoked token logs out)."""
    secret = connection.cookies.get(COOKIE, "")
    if not secret or len(secret) > 200:
        return None
    return verify_token(connection.app.state.engine, secret)


def console_requires(role: Role) -> Callable[[ASGIConnection[Any, Any, Any, Any], BaseRouteHandler], None]:
    """A guard for console pages and actions: a logged-in token whose role is at least ``role``. The token found
    is left in ``connection.scope["user"]`` (a :class:`TokenInfo`), as the API's middleware leaves it."""

    def guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
        user = console_user(connection)
        if user is None:
            path = connection.url.path
            query = connection.url.query
            raise LoginRequired(safe_next(f"{path}?{query}" if query else path))
        connection.scope["user"] = user
        if not user.role.allows(role):
            raise PermissionDeniedException(f"this needs the {role} role; you are logged in as {user.role}")

    return guard


def safe_next(target: str | None) -> str:
    """Where to go after logging in: a console path only (never another site: no open redirect)."""
    if not target or not target.startswith(PREFIX) or target.startswith("//") or "\\" in target:
        return f"{PREFIX}/"
    return quote(target, safe="/?=&%-_.~")
