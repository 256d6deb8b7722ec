"""The web console: server-rendered pages (Jinja2 templates, htmx for the live parts) served by the control plane
under ``/console`` (``/`` redirects there). It reads the same services the API uses — no second source of truth —
and authenticates with the same tokens and roles (``_auth``).

Pages live in ``pages_fleet`` (login, fleet, device) and ``pages_ops`` (rounds and schedules, models,
deployments, jobs); the vendored JavaScript and its licences in ``static/``.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlencode

from litestar import Request, Response, Router, get
from litestar.config.csrf import CSRFConfig
from litestar.datastructures import ResponseHeader
from litestar.exceptions import HTTPException
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.response import Redirect, Template
from litestar.static_files import create_static_files_router
from litestar.template import TemplateConfig

from controlplane._errors import ControlPlaneError
from controlplane.console import pages_fleet, pages_ops
from controlplane.console._auth import COOKIE, PREFIX, LoginRequired
from controlplane.console._queries_fleet import FleetFilter, filtered_total, fleet_counts

__all__ = [
    "CONSOLE_PUBLIC",
    "COOKIE",
    "FleetFilter",
    "console_csrf",
    "console_errors",
    "console_router",
    "console_templates",
    "filtered_total",
    "fleet_counts",
    "root",
]

_HERE: Final = Path(__file__).parent
# Paths the API's bearer-token middleware leaves alone: the console authenticates with its cookie (_auth).
CONSOLE_PUBLIC: Final = ["^/$", f"^{PREFIX}(/|$)"]


@get("/", include_in_schema=False, sync_to_thread=False)
def root() -> Redirect:
    return Redirect(f"{PREFIX}/")


def _login_required(request: Request[Any, Any, Any], exc: LoginRequired) -> Response[Any]:
    target = f"{PREFIX}/login?{urlencode({'next': exc.next_path})}"  # the next path's own & stays inside it
    if request.headers.get("hx-request"):
        return Response(content=None, status_code=401, headers={"HX-Redirect": target})
    return Redirect(target)


def _http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    """A console error is a page (or, for htmx, a fragment) naming what was wrong, with its status code."""
    if isinstance(exc, LoginRequired):
        return _login_required(request, exc)
    return Template(template_name="error.html", status_code=exc.status_code,
                    context={"status_code": exc.status_code, "detail": exc.detail, "user": request.scope.get("user")})


def _service_error(request: Request[Any, Any, Any], exc: ControlPlaneError) -> Response[Any]:
    """A service's refusal (404, 409, 400, 503 ...) as a console page, with the service's reason."""
    return _http_error(request, HTTPException(status_code=exc.status_code, detail=str(exc) or type(exc).__name__))


# Scripts and style sheets come from the console's own static files only: no inline script runs, whatever a device
# id, tag or reason contains; no inline style either (progress bars are <progress> elements).
CSP: Final = ("default-src 'self'; script-src 'self'; style-src 'self'; "
              "img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
              "frame-ancestors 'none'")


def console_errors(api_handlers: dict[type[Exception], Any]) -> dict[type[Exception], Any]:
    """The app's exception handlers, with an HTTP error under ``/console`` that no console route caught (an
    address that matches no page, a CSRF refusal) answered as a console page too, not the API's JSON."""
    api_http_error = api_handlers[HTTPException]

    def http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
        if request.url.path == PREFIX or request.url.path.startswith(f"{PREFIX}/"):
            return _http_error(request, exc)
        return api_http_error(request, exc)  # type: ignore[no-any-return]

    return {**api_handlers, HTTPException: http_error}


def console_router() -> Router:
    return Router(
        path=PREFIX,
        route_handlers=[*pages_fleet.HANDLERS, *pages_ops.HANDLERS,
                        create_static_files_router("/static", directories=[_HERE / "static"],
                                                   include_in_schema=False)],
        exception_handlers={HTTPException: _http_error, ControlPlaneError: _service_error},
        response_headers=[ResponseHeader(name="Content-Security-Policy", value=CSP),
                          ResponseHeader(name="X-Content-Type-Options", value="nosniff"),
                          ResponseHeader(name="Referrer-Policy", value="same-origin")],
        include_in_schema=False,
    )


def console_templates() -> TemplateConfig[JinjaTemplateEngine]:
    return TemplateConfig(directory=_HERE / "templates", engine=JinjaTemplateEngine)


def console_csrf(secure: bool) -> CSRFConfig:
    """Double-submit CSRF tokens on the console's forms only (the API is bearer-token and needs none). The secret
    is per process: after a restart a form is reloaded once."""
    return CSRFConfig(secret=secrets.token_hex(32), cookie_name="edgefleet_csrf", cookie_path=PREFIX,
                      cookie_samesite="strict", cookie_secure=secure,
                      exclude=["^/$", "^/(api|schema|healthz|metrics)(/|$)"])

