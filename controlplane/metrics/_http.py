"""API request latency: an ASGI middleware observing every routed request into a per-app histogram."""

from __future__ import annotations

import time
from typing import Any

from litestar.enums import ScopeType
from litestar.exceptions import HTTPException
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import CollectorRegistry, Histogram

from controlplane._errors import ControlPlaneError

__all__ = ["REQUEST_BUCKETS", "RequestMetricsMiddleware", "request_histogram"]

REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def request_histogram(registry: CollectorRegistry) -> Histogram:
    return Histogram(
        "edgefleet_http_request_duration_seconds",
        "API and console requests: seconds from the request to the start of the response, by method, route "
        "template and status class (an unrouted path is not counted)",
        ["method", "route", "status"], buckets=REQUEST_BUCKETS, registry=registry,
    )


class RequestMetricsMiddleware(ASGIMiddleware):
    """Outermost app middleware: sees what the auth and CSRF middlewares refuse too. Labels stay bounded: the
    route is the matched template (`/api/v1/devices/{device_id}`), never the raw path; the method is one of
    HTTP's or `other`; the status is its class (`2xx`). Measured to the response start, so a server-sent event
    stream or a large download counts its time to first byte."""

    scopes = (ScopeType.HTTP,)

    def __init__(self, histogram: Histogram) -> None:
        self.histogram = histogram

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        started = time.perf_counter()
        status = 0
        elapsed = 0.0

        async def send_wrapper(message: Message) -> None:
            nonlocal status, elapsed
            if message["type"] == "http.response.start":
                status = message["status"]
                elapsed = time.perf_counter() - started
            await send(message)

        try:
            await next_app(scope, receive, send_wrapper)
        except Exception as exc:
            # Raised by a middleware inside this one (auth, CSRF); the app's exception handler answers it.
            if not status:
                status = _status_of(exc)
                elapsed = time.perf_counter() - started
            raise
        finally:
            if not status:  # the client went away before a response started
                status, elapsed = 499, time.perf_counter() - started
            method = scope.get("method", "")
            self.histogram.labels(
                method if method in _METHODS else "other",
                _route(scope),
                f"{status // 100}xx",
            ).observe(elapsed)


def _route(scope: Scope) -> str:
    template: Any = scope.get("path_template")
    return template if isinstance(template, str) and template else "unknown"


def _status_of(exc: Exception) -> int:
    if isinstance(exc, HTTPException | ControlPlaneError):
        return int(exc.status_code)
    return 500
