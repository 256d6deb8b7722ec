"""`GET /metrics` as Prometheus reads it: a viewer token, a valid exposition, the figures of known actions, and
labels that never carry a device id."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import timedelta

import paho.mqtt.client as mqtt
import pytest
from litestar.testing import TestClient
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from sqlalchemy import Engine
from sqlmodel import Session

from agent import protocol as wire
from agent.mqtt import MqttProtocol, make_client, parse_broker_url
from controlplane.app import create_app
from controlplane.auth import Role, create_token
from controlplane.db import (
    CommandRecord,
    DeploymentRecord,
    DeploymentTargetRecord,
    JobRecord,
    ModelVersionRecord,
    RoundRecord,
    create_db_engine,
    utcnow,
)
from controlplane.devices.schemas import DeviceCreate
from controlplane.ingest import read_stats
from controlplane.metrics import FleetCollector
from controlplane.statuses import CommandStatus, DeploymentStatus, JobStatus, RoundStatus, TargetStatus
from controlplane.wiring import Fleet
from federated.burst.spec import JobKind
from federated.flower.config import Strategy
from tests._services import fx_engine, fx_fleet, wait_for  # noqa: F401 - fixtures

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(name="client")
def fx_client(fleet: Fleet) -> Iterator[TestClient]:  # type: ignore[type-arg]
    with TestClient(app=create_app(fleet=fleet)) as client:
        yield client


@pytest.fixture(name="viewer")
def fx_viewer(fleet: Fleet) -> dict[str, str]:
    _, secret = create_token(fleet.engine, Role.VIEWER, "prometheus")
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture(name="publisher")
def fx_publisher(mosquitto_url: str) -> Iterator[mqtt.Client]:
    address = parse_broker_url(mosquitto_url)
    client = make_client(address, f"test-metrics-{uuid.uuid4().hex[:6]}", protocol=MqttProtocol.V5)
    client.connect(address.host, address.port)
    client.loop_start()
    yield client
    client.disconnect()
    client.loop_stop()


def scrape(client: TestClient, headers: dict[str, str]) -> tuple[str, Samples]:  # type: ignore[type-arg]
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return response.text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of `name` over every label set that includes `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def telemetry(device_id: str, seq: int, age_s: float = 0.0) -> bytes:
    return wire.encode(wire.Telemetry(
        device_id=device_id, seq=seq, ts=time.time() - age_s,
        system=wire.SystemStats(cpu_percent=1.0, mem_used_mb=10.0, mem_total_mb=100.0, disk_used_percent=5.0),
        power=wire.PowerStats(source="simulated", power_source="mains"),
        network=wire.NetworkStats(source="simulated"),
    ))


def publish(client: mqtt.Client, topic: str, payload: bytes) -> None:
    client.publish(topic, payload, qos=1).wait_for_publish(10)


def test_metrics_need_a_viewer_token(client: TestClient, fleet: Fleet,  # type: ignore[type-arg]
                                     viewer: dict[str, str]) -> None:
    # Execute
    missing = client.get("/metrics")
    wrong = client.get("/metrics", headers={"Authorization": "Bearer ef_nope"})
    allowed = client.get("/metrics", headers=viewer)
    schema = client.get("/schema/openapi.json").json()
    # Assert
    assert missing.status_code == 401 and "token" in missing.json()["detail"]
    assert wrong.status_code == 401
    assert allowed.status_code == 200
    assert "/metrics" not in schema["paths"]  # a scrape target, not an API operation


def test_known_actions_show_in_the_figures_and_no_device_id_does(
    client: TestClient, fleet: Fleet, viewer: dict[str, str], publisher: mqtt.Client,  # type: ignore[type-arg]
) -> None:
    # Prepare: 3 devices over 2 profiles; 2 say they are online; each sends telemetry, one a message twice
    devices = {f"dev-{uuid.uuid4().hex[:8]}": profile for profile in ("raspberry-pi-5", "raspberry-pi-5", "x86-gateway")}
    for device_id, profile in devices.items():
        fleet.devices.enroll(DeviceCreate(device_id=device_id, profile=profile))
    online = list(devices)[1:]
    # Execute
    for device_id in online:
        state = wire.State(device_id=device_id, online=True, ts=time.time(), profile=devices[device_id])
        publish(publisher, wire.topic(device_id, wire.Channel.STATE), wire.encode(state))
    for n, device_id in enumerate(devices):
        publish(publisher, wire.topic(device_id, wire.Channel.TELEMETRY), telemetry(device_id, 1, age_s=100 * n))
    first = next(iter(devices))
    publish(publisher, wire.topic(first, wire.Channel.TELEMETRY), telemetry(first, 1))  # a redelivery
    publish(publisher, wire.topic(first, wire.Channel.TELEMETRY), b"{not json")
    wait_for(lambda: read_stats(fleet.engine)["stored"] == 3 and read_stats(fleet.engine)["duplicates"] == 1
             and len(fleet.devices.find(online=True)) == 2, what="telemetry and states ingested")
    for device_id in devices:  # requests whose raw paths carry device ids
        assert client.get(f"/api/v1/devices/{device_id}", headers=viewer).status_code == 200
    body, samples = scrape(client, viewer)
    # Assert: devices
    assert value(samples, "edgefleet_devices_enrolled", profile="raspberry-pi-5") == 2
    assert value(samples, "edgefleet_devices_enrolled", profile="x86-gateway") == 1
    assert value(samples, "edgefleet_devices_online", profile="raspberry-pi-5") == 1
    assert value(samples, "edgefleet_devices_online", profile="x86-gateway") == 1
    age = "edgefleet_device_telemetry_age_seconds"
    assert total(samples, f"{age}_count") == 3
    assert value(samples, f"{age}_bucket", profile="raspberry-pi-5", online="false", le="60.0") == 1  # ~0 s old
    assert value(samples, f"{age}_bucket", profile="raspberry-pi-5", online="true", le="60.0") == 0  # ~100 s old
    assert value(samples, f"{age}_bucket", profile="raspberry-pi-5", online="true", le="120.0") == 1
    assert value(samples, f"{age}_bucket", profile="x86-gateway", online="true", le="300.0") == 1  # ~200 s old
    assert 290 <= total(samples, f"{age}_sum") <= 400
    # Assert: ingest (the shared broker may carry other tests' traffic: at least what we sent)
    assert value(samples, "edgefleet_ingest_stored_total") == 3
    assert value(samples, "edgefleet_ingest_duplicates_total") == 1
    assert value(samples, "edgefleet_ingest_received_total") >= 7
    assert value(samples, "edgefleet_ingest_dead_letters_total", reason="malformed") >= 1
    assert ("edgefleet_ingest_dead_letters_total", frozenset({("reason", "db_rejected")})) in samples  # before any
    assert value(samples, "edgefleet_ingest_lag_seconds_count") >= 6
    assert value(samples, "edgefleet_ingest_telemetry_delay_seconds_count") >= 4
    assert value(samples, "edgefleet_ingest_telemetry_delay_seconds_bucket", le="+Inf") >= 4
    assert value(samples, "edgefleet_ingest_workers_connected") == 1
    assert value(samples, "edgefleet_database_up") == 1
    # Assert: API latency by route template, never the raw path
    assert value(samples, "edgefleet_http_request_duration_seconds_count", method="GET",
                 route="/api/v1/devices/{device_id}", status="2xx") == 3
    # Assert: bounded labels
    for device_id in devices:
        assert device_id not in body


def test_api_latency_counts_refusals_by_status_class(client: TestClient,  # type: ignore[type-arg]
                                                     viewer: dict[str, str]) -> None:
    # Execute
    client.get("/api/v1/devices")  # no token: refused by the auth middleware
    client.post("/api/v1/devices", json={"device_id": "x", "profile": "raspberry-pi-5"}, headers=viewer)  # 403
    client.get("/api/v1/devices/no-such-device", headers=viewer)  # 404 from the handler
    _, samples = scrape(client, viewer)
    # Assert
    count = "edgefleet_http_request_duration_seconds_count"
    assert value(samples, count, method="GET", route="/api/v1/devices", status="4xx") == 1
    assert value(samples, count, method="POST", route="/api/v1/devices", status="4xx") == 1
    assert value(samples, count, method="GET", route="/api/v1/devices/{device_id}", status="4xx") == 1


def collect(engine: Engine) -> tuple[str, Samples]:
    """What the fleet collector alone exposes (no services running that would move the records on)."""
    registry = CollectorRegistry()
    registry.register(FleetCollector(lambda: engine, list))
    body = generate_latest(registry).decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return body, samples


def test_rounds_deployments_jobs_and_commands_are_counted(engine: Engine) -> None:
    # Prepare: records as the services leave them
    now = utcnow()
    with Session(engine) as session:
        session.add(RoundRecord(task="digits", strategy=Strategy.FEDAVG, status=RoundStatus.SUCCEEDED,
                                created_at=now - timedelta(seconds=90), finished_at=now - timedelta(seconds=50),
                                metrics=[{"round": 1, "accuracy": 0.5}, {"round": 2, "accuracy": 0.875},
                                         {"round": 0, "accuracy": 0.1}]))
        session.add(RoundRecord(task="digits", strategy=Strategy.FEDAVG, status=RoundStatus.FAILED,
                                created_at=now - timedelta(seconds=690), finished_at=now - timedelta(seconds=100)))
        session.add(RoundRecord(task="digits", strategy=Strategy.FEDAVG, status=RoundStatus.RUNNING, created_at=now))
        session.add(ModelVersionRecord(version="m-metrics", release=987_654, task="digits", source_kind="round",
                                       source_id="1", created_at=now))
        session.flush()
        deployment = DeploymentRecord(model_version="m-metrics", status=DeploymentStatus.RUNNING,
                                      created_at=now, updated_at=now)
        done = DeploymentRecord(model_version="m-metrics", status=DeploymentStatus.HALTED, created_at=now,
                                updated_at=now)
        session.add(deployment)
        session.add(done)
        session.flush()
        assert deployment.id is not None and done.id is not None
        for n, status in enumerate([TargetStatus.SUCCEEDED, TargetStatus.SUCCEEDED, TargetStatus.FAILED,
                                    TargetStatus.PENDING]):
            session.add(DeploymentTargetRecord(deployment_id=deployment.id, device_id=f"t-{n}", wave=0,
                                               status=status))
        session.add(DeploymentTargetRecord(deployment_id=done.id, device_id="t-0", wave=0, status=TargetStatus.FAILED))
        session.add(JobRecord(kind=JobKind.FINETUNE, task="digits", placement="burst", placement_reason="gpu",
                              out_dir="/tmp/x", status=JobStatus.QUEUED, created_at=now - timedelta(seconds=600)))
        session.add(JobRecord(kind=JobKind.QAT, task="digits", placement="local", placement_reason="small",
                              out_dir="/tmp/y", status=JobStatus.SUCCEEDED, created_at=now))
        for n, (kind, acked) in enumerate([("deploy_model", CommandStatus.OK), ("deploy_model", CommandStatus.ERROR),
                                           ("join_round", CommandStatus.PENDING), ("my-own-kind", CommandStatus.OK)]):
            session.add(CommandRecord(command_id=f"c-{n}", device_id="t-0", kind=kind, status=acked, created_at=now))
        session.commit()
    # Execute
    body, samples = collect(engine)
    # Assert: rounds
    assert value(samples, "edgefleet_rounds", task="digits", status="succeeded") == 1
    assert value(samples, "edgefleet_rounds", task="digits", status="running") == 1
    assert value(samples, "edgefleet_round_last_accuracy", task="digits") == 0.875
    duration = "edgefleet_round_duration_seconds"
    assert value(samples, f"{duration}_count", task="digits", status="failed") == 1
    assert value(samples, f"{duration}_bucket", task="digits", status="succeeded", le="30.0") == 0
    assert value(samples, f"{duration}_bucket", task="digits", status="succeeded", le="60.0") == 1
    assert value(samples, f"{duration}_bucket", task="digits", status="failed", le="600.0") == 1
    assert value(samples, f"{duration}_sum", task="digits", status="failed") == pytest.approx(590, abs=1)
    assert value(samples, "edgefleet_round_last_success_timestamp_seconds", task="digits") == pytest.approx(
        (now - timedelta(seconds=50)).timestamp(), abs=1)
    # Assert: deployments and their devices
    assert value(samples, "edgefleet_deployments", status="running") == 1
    assert value(samples, "edgefleet_deployments", status="halted") == 1
    assert value(samples, "edgefleet_deployments", status="cancelled") == 0
    assert value(samples, "edgefleet_deployment_targets", active="true", status="succeeded") == 2
    assert value(samples, "edgefleet_deployment_targets", active="true", status="failed") == 1
    assert value(samples, "edgefleet_deployment_targets", active="false", status="failed") == 1
    # Assert: jobs
    assert value(samples, "edgefleet_jobs", kind="finetune", placement="burst", status="queued") == 1
    assert value(samples, "edgefleet_jobs", kind="qat", placement="local", status="succeeded") == 1
    assert 590 <= value(samples, "edgefleet_job_oldest_seconds", status="queued") <= 700
    assert value(samples, "edgefleet_job_oldest_seconds", status="running") == 0
    # Assert: commands (an operator's own kind folds into "other")
    assert value(samples, "edgefleet_commands", kind="deploy_model", status="ok") == 1
    assert value(samples, "edgefleet_commands", kind="deploy_model", status="error") == 1
    assert value(samples, "edgefleet_commands", kind="join_round", status="pending") == 1
    assert value(samples, "edgefleet_commands", kind="other", status="ok") == 1
    assert "my-own-kind" not in body


def test_openmetrics_when_asked(client: TestClient, viewer: dict[str, str]) -> None:  # type: ignore[type-arg]
    # Execute
    response = client.get("/metrics", headers={**viewer, "Accept": "application/openmetrics-text; version=1.0.0"})
    odd = client.get("/metrics", headers={**viewer, "Accept": "application/openmetrics-text; version=999; x=\"y\""})
    # Assert
    assert response.headers["content-type"] == "application/openmetrics-text; version=1.0.0; charset=utf-8"
    assert odd.status_code == 200 and "999" not in odd.headers["content-type"]
    names = {f.name for f in parse_openmetrics(response.text)}
    assert {"edgefleet_ingest_received", "edgefleet_devices_enrolled", "edgefleet_http_request_duration_seconds"} <= names


def test_database_away_is_a_figure_not_an_error() -> None:
    # Prepare: nothing listens on port 1
    engine = create_db_engine("postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=2")
    collector = FleetCollector(lambda: engine, list)
    # Execute
    samples: list[Sample] = [s for family in collector.collect() for s in family.samples]
    # Assert
    figures = {s.name: s.value for s in samples}
    assert figures["edgefleet_database_up"] == 0
    assert figures["edgefleet_ingest_workers"] == 0
    assert "edgefleet_devices_enrolled" not in figures
