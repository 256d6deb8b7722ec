"""deploy/prometheus and deploy/grafana against the real tools: promtool checks the scrape config and the alert
rules (and runs their unit tests), a real Prometheus scrapes a served control plane, and the dashboard and the
rules use only metrics that /metrics exposes.

Prometheus and promtool come from Debian's `prometheus` package (.ci/run installs it): missing, these tests skip
locally and fail in CI.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from litestar.testing import TestClient
from prometheus_client.parser import text_string_to_metric_families

from agent import protocol as wire
from agent.mqtt import MqttProtocol, make_client, parse_broker_url
from controlplane.app import create_app
from controlplane.auth import Role, create_token
from controlplane.devices.schemas import DeviceCreate
from controlplane.ingest import read_stats
from controlplane.wiring import Fleet
from tests._services import fleet_settings, free_port, fx_fleet, service_missing, stop_process, wait_for  # noqa: F401

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "edgefleet.json"
_METRIC = re.compile(r"\bedgefleet_[a-z0-9_]+")
# The dashboard's variables, as Grafana substitutes them for "All".
_VARIABLES = {"$__rate_interval": "1m", "$job": ".*", "$profile": ".*"}


def tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if path is None:
        service_missing(f"{name} (Debian package prometheus)")
    assert path is not None
    return path


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("promtool"), *args], capture_output=True, text=True, timeout=60, check=False)


def rule_exprs() -> list[str]:
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs


def exposed_names(body: str) -> set[str]:
    """Every series name a /metrics answer can carry, from its families' types: a counter's `_total`, a
    histogram's `_bucket`, `_count` and `_sum`."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    names: set[str] = set()
    for family in text_string_to_metric_families(body):
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


# -- promtool --------------------------------------------------------------------------------------------------------
def test_alert_rules_pass_promtool_and_their_unit_tests() -> None:
    # Execute
    checked = promtool("check", "rules", str(PROMETHEUS_DIR / "alerts.yml"))
    tested = promtool("test", "rules", str(PROMETHEUS_DIR / "alerts_test.yml"))
    # Assert
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 13 rules found" in checked.stdout
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_scrape_config_passes_promtool(tmp_path: Path) -> None:
    # Prepare: the shipped file names files of the Prometheus host; a copy names files that exist here
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    job = config["scrape_configs"][0]
    (tmp_path / "viewer.token").write_text("ef_example\n")
    (tmp_path / "ca.pem").write_text("")
    job["authorization"]["credentials_file"] = str(tmp_path / "viewer.token")
    job["tls_config"]["ca_file"] = str(tmp_path / "ca.pem")
    config["rule_files"] = [str(PROMETHEUS_DIR / "alerts.yml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    # Execute
    syntax = promtool("check", "config", "--syntax-only", str(PROMETHEUS_DIR / "prometheus.yml"))
    full = promtool("check", "config", str(tmp_path / "prometheus.yml"))
    # Assert
    assert syntax.returncode == 0, syntax.stdout + syntax.stderr
    assert full.returncode == 0, full.stdout + full.stderr
    assert job["metrics_path"] == "/metrics" and job["authorization"]["type"] == "Bearer"


# -- the names the dashboard and the rules use -----------------------------------------------------------------------
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_dashboard_and_alerts_use_only_exposed_metrics(fleet: Fleet) -> None:
    # Prepare
    _, secret = create_token(fleet.engine, Role.VIEWER, "prometheus")
    with TestClient(app=create_app(fleet=fleet)) as client:
        client.get("/healthz")
        # Execute
        body = client.get("/metrics", headers={"Authorization": f"Bearer {secret}"}).text
    exposed = exposed_names(body)
    used = {name for expr in [*rule_exprs(), *dashboard_exprs()] for name in _METRIC.findall(expr)}
    # Assert
    assert len(used) >= 30, sorted(used)
    assert used - exposed == set()
    assert all(_METRIC.search(e) or e.startswith("up{") for e in dashboard_exprs() + rule_exprs())


# -- a real Prometheus -------------------------------------------------------------------------------------------
@contextmanager
def served(app: Any) -> Iterator[int]:
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name=f"metrics-uvicorn-{port}", daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started or not thread.is_alive(), 20, "the control plane's HTTP server")
        assert server.started, "the control plane's HTTP server did not start"
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextmanager
def prometheus(tmp_path: Path, target_port: int, token: str) -> Iterator[str]:
    """A Prometheus scraping 127.0.0.1:`target_port` every second with the shipped job and rules; its URL."""
    binary = tool("prometheus")
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(PROMETHEUS_DIR / "alerts.yml")]
    job = config["scrape_configs"][0]
    job.update(scheme="http", scrape_timeout="1s", static_configs=[{"targets": [f"127.0.0.1:{target_port}"]}])
    job.pop("tls_config")
    tmp_path.mkdir(parents=True, exist_ok=True)
    token_file = tmp_path / "viewer.token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    job["authorization"]["credentials_file"] = str(token_file)
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            assert process.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
            try:
                return httpx.get(f"{url}/-/ready", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, 20, "Prometheus ready")
        yield url
    finally:
        stop_process(process)
        log.close()


def query(url: str, expr: str) -> list[dict[str, Any]]:
    answer = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=5).json()
    assert answer["status"] == "success", (expr, answer)
    return list(answer["data"]["result"])


def scalar(url: str, expr: str) -> float | None:
    result = query(url, expr)
    return float(result[0]["value"][1]) if result else None


@pytest.mark.slow
def test_a_real_prometheus_scrapes_the_control_plane(mosquitto_url: str, tmp_path: Path) -> None:
    # Prepare: a served control plane with 3 devices over 2 profiles (2 online, all sending telemetry)
    fleet = Fleet(fleet_settings(mosquitto_url, tmp_path / "cp", f"sqlite:///{tmp_path / 'cp.db'}")).start()
    address = parse_broker_url(mosquitto_url)
    device = make_client(address, f"test-prom-{uuid.uuid4().hex[:6]}", protocol=MqttProtocol.V5)
    device.connect(address.host, address.port)
    device.loop_start()
    try:
        devices = {f"dev-{uuid.uuid4().hex[:8]}": p for p in ("raspberry-pi-5", "raspberry-pi-5", "x86-gateway")}
        for device_id, profile in devices.items():
            fleet.devices.enroll(DeviceCreate(device_id=device_id, profile=profile))
        _, viewer = create_token(fleet.engine, Role.VIEWER, "prometheus")
        with served(create_app(fleet=fleet)) as port, prometheus(tmp_path / "prom", port, viewer) as url:
            # Execute
            for device_id in list(devices)[1:]:
                state = wire.State(device_id=device_id, online=True, ts=time.time(), profile=devices[device_id])
                device.publish(wire.topic(device_id, wire.Channel.STATE), wire.encode(state), qos=1).wait_for_publish(5)
            for device_id in devices:
                payload = wire.encode(wire.Telemetry(
                    device_id=device_id, seq=1, ts=time.time(),
                    system=wire.SystemStats(cpu_percent=1.0, mem_used_mb=1.0, mem_total_mb=2.0, disk_used_percent=1.0),
                    power=wire.PowerStats(source="simulated", power_source="mains"),
                    network=wire.NetworkStats(source="simulated")))
                device.publish(wire.topic(device_id, wire.Channel.TELEMETRY), payload, qos=1).wait_for_publish(5)
            wait_for(lambda: read_stats(fleet.engine)["stored"] == 3, 15, "telemetry stored")
            api = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {viewer}"})
            for _ in range(3):
                assert api.get("/api/v1/devices").status_code == 200
            api.close()
            # Assert: the series, through Prometheus' HTTP API
            wait_for(lambda: scalar(url, 'edgefleet_ingest_stored_total{job="edgefleet"}') == 3, 15,
                     "Prometheus to scrape 3 stored telemetry records")
            assert scalar(url, 'up{job="edgefleet"}') == 1
            assert scalar(url, 'edgefleet_devices_online{profile="raspberry-pi-5"}') == 1
            assert scalar(url, 'edgefleet_devices_online{profile="x86-gateway"}') == 1
            assert scalar(url, 'edgefleet_devices_enrolled{profile="raspberry-pi-5"}') == 2
            assert scalar(url, 'edgefleet_device_telemetry_age_seconds_count{online="true", profile="x86-gateway"}') == 1
            assert (scalar(url, 'edgefleet_ingest_received_total') or 0) >= 5
            wait_for(lambda: scalar(url, 'sum(edgefleet_http_request_duration_seconds_count{route="/api/v1/devices", '
                                         'method="GET", status="2xx"})') == 3, 10, "3 API requests counted")
            wait_for(lambda: scalar(url, 'sum(edgefleet_http_request_duration_seconds_count{route="/metrics"})'), 10,
                     "the scrapes themselves counted (from the second one)")
            assert (scalar(url, 'edgefleet_ingest_lag_seconds_count') or 0) >= 5
            # Assert: every dashboard query is valid PromQL on real data, and every alert rule evaluates
            for expr in dashboard_exprs():
                if expr.startswith("label_values("):
                    continue
                for variable, value in _VARIABLES.items():
                    expr = expr.replace(variable, value)
                query(url, expr)

            def rules_evaluated() -> list[dict[str, Any]] | None:
                groups = httpx.get(f"{url}/api/v1/rules", timeout=5).json()["data"]["groups"]
                rules = [rule for group in groups for rule in group["rules"]]
                return rules if rules and all(r["health"] != "unknown" for r in rules) else None

            wait_for(rules_evaluated, 15, "the alert rules evaluated")
            rules = rules_evaluated() or []
            assert len(rules) == 13
            assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []
    finally:
        device.disconnect()
        device.loop_stop()
        fleet.stop()
