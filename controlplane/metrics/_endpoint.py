"""`GET /metrics`: the app's registry in Prometheus' text format (or OpenMetrics, when the scraper asks for it)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from litestar import Request, Response, get
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.openmetrics import exposition as openmetrics

from controlplane.auth import Role
from controlplane.auth._guards import requires
from controlplane.metrics._fleet import FleetCollector
from controlplane.metrics._http import RequestMetricsMiddleware, request_histogram

if TYPE_CHECKING:
    from controlplane.wiring import Fleet

__all__ = ["AppMetrics", "metrics_endpoint"]

_TEXT = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class AppMetrics:
    """One app's metrics: its own registry (never prometheus_client's global one: a process may build many apps,
    as the tests do), the request histogram, and the fleet collector."""

    fleet: Fleet
    registry: CollectorRegistry = field(init=False)
    requests: Histogram = field(init=False)

    def __post_init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = request_histogram(self.registry)
        fleet = self.fleet
        self.registry.register(FleetCollector(lambda: fleet.engine, lambda: _workers(fleet)))

    @property
    def middleware(self) -> RequestMetricsMiddleware:
        return RequestMetricsMiddleware(self.requests)


def _workers(fleet: Fleet) -> Sequence[Any]:
    return list(fleet.workers)  # a copy: the fleet may clear its list while stopping


@get("/metrics", guards=[requires(Role.VIEWER)], sync_to_thread=True, include_in_schema=False)
def metrics_endpoint(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Prometheus scrape target (a viewer token: `authorization: {credentials_file: ...}` in the scrape config)."""
    metrics: AppMetrics = request.app.state.metrics
    # OpenMetrics when asked (as Prometheus does), else the classic text format; the answer's type is ours, never
    # echoed from the request.
    if "application/openmetrics-text" in request.headers.get("accept", ""):
        body = openmetrics.generate_latest(metrics.registry)  # type: ignore[no-untyped-call]
        return Response(body, media_type=openmetrics.CONTENT_TYPE_LATEST)
    return Response(generate_latest(metrics.registry), media_type=_TEXT)
