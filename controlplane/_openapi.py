"""What the OpenAPI document says each operation can answer, and who may call it — derived from the routes.

:class:`ApiContract` is a Litestar plugin: as each route is registered it completes the route handlers' OpenAPI
``responses`` and ``security`` from what the handler is, so that no handler repeats them and none can forget one:

=====  ==========================================================================================================
code   listed on
=====  ==========================================================================================================
400    operations with a path, query or body parameter (validation; :class:`~controlplane._http.ErrorBody` with
       ``extra`` naming the fields)
401    protected operations: behind the bearer-token middleware, or declaring their own ``security`` (downloads,
       device enrolment)
403    operations whose :class:`~controlplane.auth._guards.Requires` guard needs more than the lowest role
404    operations with a path parameter (an unknown id)
413    operations that take a body (``request_max_body_size``)
503    every operation: the database (and, for some, the broker) can be unavailable
=====  ==========================================================================================================

Request bodies are described by msgspec's own JSON Schema of the body type (what the server validates them with:
nested constraints, ``additionalProperties: false`` for ``forbid_unknown_fields``), not Litestar's rendering of it,
which drops the constraints of list items and some bounds. The document is completed when it is first rendered.

Anything else an operation can answer (409, a 404 for an id in its body, 202, 206 ...) is declared on its
handler with ``responses=`` (:func:`errors` for error answers); what a handler declares wins. ``security`` is the
handler's own when it declares one, else ``bearer`` behind the middleware, else ``[]``: public.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from http import HTTPStatus
from typing import Any, Final

import msgspec
from litestar import MediaType, Request, Response
from litestar.config.app import AppConfig
from litestar.handlers import HTTPRouteHandler
from litestar.middleware import AbstractAuthenticationMiddleware, DefineMiddleware
from litestar.openapi import OpenAPIConfig
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import OpenAPI, Operation
from litestar.plugins import InitPluginProtocol, ReceiveRoutePlugin
from litestar.routes import BaseRoute, HTTPRoute
from litestar.status_codes import HTTP_204_NO_CONTENT

from controlplane._http import ErrorBody
from controlplane.auth._guards import Requires

__all__ = ["BEARER", "ApiContract", "errors"]

BEARER: Final = "bearer"
# Keyword arguments Litestar fills itself: not client input.
_RESERVED: Final = frozenset({"request", "state", "scope", "headers", "cookies", "query", "body", "socket"})
_DESCRIPTIONS: Final = {
    400: "Invalid input: `detail` says why, `extra` names the fields",
    401: "Missing, invalid or revoked token",
    403: "The token's role is not enough",
    404: "No such resource",
    409: "Conflicts with the resource's current state: `detail` says why",
    413: "Request body too large",
    503: "The database or the broker is unavailable",
}


def errors(*codes: int) -> dict[int, ResponseSpec]:
    """``responses=`` for the error answers a handler adds to the derived ones, e.g. ``errors(409)``."""
    return {code: _error(code) for code in codes}


def _error(code: int) -> ResponseSpec:
    return ResponseSpec(ErrorBody, description=_DESCRIPTIONS.get(code, HTTPStatus(code).phrase),
                        generate_examples=False)


@dataclass
class _PublicOperation(Operation):
    """An operation that needs no credentials: ``security: []`` overrides the document's default (bearer)."""

    def __post_init__(self) -> None:
        if self.security is None:
            self.security = []


@dataclass(frozen=True)
class _AuthCoverage:
    """Which paths and handlers the bearer-token middleware checks."""

    exclude: tuple[re.Pattern[str], ...] = ()
    opt_key: str = "exclude_from_auth"
    present: bool = False

    def covers(self, handler: HTTPRouteHandler, path: str) -> bool:
        return (self.present and not handler.opt.get(self.opt_key)
                and not any(p.search(path) for p in self.exclude))


class _CompletedOpenAPI(OpenAPI):
    """The document, with the request bodies as msgspec describes them."""

    _bodies: dict[tuple[str, str], Any]

    def to_schema(self) -> dict[str, Any]:
        document = super().to_schema()
        _describe_bodies(document, self._bodies)
        return document


class _CompletingConfig(OpenAPIConfig):
    _bodies: dict[tuple[str, str], Any]

    def to_openapi_schema(self) -> OpenAPI:
        base = super().to_openapi_schema()
        document = _CompletedOpenAPI(**{f.name: getattr(base, f.name) for f in fields(base)})
        document._bodies = self._bodies
        return document


def _describe_bodies(document: dict[str, Any], bodies: dict[tuple[str, str], Any]) -> None:
    components = document.setdefault("components", {}).setdefault("schemas", {})
    for (path, method), body_type in sorted(bodies.items(), key=str):
        operation = document.get("paths", {}).get(path, {}).get(method)
        content = (operation or {}).get("requestBody", {}).get("content", {})
        if "application/json" not in content:
            continue
        (schema,), defined = msgspec.json.schema_components([body_type],
                                                            ref_template="#/components/schemas/{name}")
        content["application/json"]["schema"] = schema
        components.update(defined)


def _allow_every_method(route: HTTPRoute) -> None:
    """OPTIONS answers ``Allow`` with every method of the path. Litestar 2's own OPTIONS handler lists those of the
    first handler registered on the path only (litestar#4169, fixed in 3): a path whose GET and POST are separate
    handlers answered ``Allow: OPTIONS, POST``. This route, registered last, has them all."""
    options = route.route_handler_map.get("OPTIONS")
    if options is None or options[0].resolve_include_in_schema():
        return  # no automatic OPTIONS handler here
    allow = ", ".join(sorted(route.methods))

    async def answer(_: Request[Any, Any, Any]) -> Response[None]:
        return Response(None, status_code=HTTP_204_NO_CONTENT, headers={"Allow": allow}, media_type=MediaType.TEXT)

    options[0].before_request = answer


class ApiContract(InitPluginProtocol, ReceiveRoutePlugin):
    """Completes each API operation's OpenAPI responses and security as its route is registered, and its request
    body when the document is rendered (see the module docstring for the rules)."""

    __slots__ = ("_auth", "_bodies")

    def __init__(self) -> None:
        self._auth = _AuthCoverage()
        self._bodies: dict[tuple[str, str], Any] = {}

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        if (config := app_config.openapi_config) is not None:
            # Deprecated fields that __post_init__ derives (passing them back would warn): derived again.
            derived = ("root_schema_site", "enabled_endpoints")
            completing = _CompletingConfig(**{f.name: getattr(config, f.name) for f in fields(config)
                                              if f.init and f.name not in derived})
            completing._bodies = self._bodies
            app_config.openapi_config = completing
        for middleware in app_config.middleware:
            if (isinstance(middleware, DefineMiddleware) and isinstance(middleware.middleware, type)
                    and issubclass(middleware.middleware, AbstractAuthenticationMiddleware)):
                exclude = middleware.kwargs.get("exclude") or ()
                patterns = [exclude] if isinstance(exclude, str) else list(exclude)
                self._auth = _AuthCoverage(tuple(re.compile(p) for p in patterns),
                                           middleware.kwargs.get("exclude_opt_key", "exclude_from_auth"), True)
        return app_config

    def receive_route(self, route: BaseRoute) -> None:
        if not isinstance(route, HTTPRoute):
            return
        for handler in route.route_handlers:
            if handler.resolve_include_in_schema():
                self._complete(handler, route)
        _allow_every_method(route)

    def _complete(self, handler: HTTPRouteHandler, route: HTTPRoute) -> None:
        parameters = handler.parsed_fn_signature.parameters
        dependencies = handler.resolve_dependencies()
        inputs = [name for name in parameters if name not in _RESERVED and name not in dependencies]
        # The layers' own, not resolve_*(): those cache, and the handler is changed below.
        layers = handler.ownership_layers
        guards = [g for layer in layers for g in (layer.guards or [])]
        security: list[dict[str, list[str]]] = [s for layer in layers for s in (layer.security or [])]
        if not security and self._auth.covers(handler, route.path):
            security = handler.security = [{BEARER: []}]
        codes = {503}
        if inputs or route.path_parameters:
            codes.add(400)
        if security:
            codes.add(401)
        if any(isinstance(g, Requires) and g.can_refuse_a_token for g in guards):
            codes.add(403)
        if route.path_parameters:
            codes.add(404)
        if "data" in parameters:
            codes.add(413)
            for method in handler.http_methods:
                self._bodies[(route.path_format, method.lower())] = parameters["data"].annotation
        declared: dict[int, Any] = dict(handler.responses or {})
        handler.responses = {**{code: _error(code) for code in sorted(codes)}, **declared}
        if not security:
            handler.operation_class = _PublicOperation
