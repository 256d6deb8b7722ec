"""Prometheus metrics of the control plane: `GET /metrics` (viewer token), API request latency, and the fleet's
figures computed at scrape time with aggregate queries. Labels are bounded: never a device id, never free text.
The list of metrics is in deploy/prometheus/README.md."""

from controlplane.metrics._endpoint import AppMetrics, metrics_endpoint
from controlplane.metrics._fleet import FleetCollector
from controlplane.metrics._http import RequestMetricsMiddleware

__all__ = ["AppMetrics", "FleetCollector", "RequestMetricsMiddleware", "metrics_endpoint"]
