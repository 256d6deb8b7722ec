"""The API under hostile input from a token holder (issue 8, findings 4 and 7).

* A task name only selects a registered task: no request, stored schedule or run config imports code.
* Bad input is a 4xx naming what was wrong, never a 5xx; a 4xx is logged as one line, without a traceback.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import structlog
from litestar import Litestar
from litestar.testing import TestClient
from sqlmodel import Session, select

from controlplane.app import create_app
from controlplane.auth import Role, create_token
from controlplane.db import RoundRecord
from controlplane.wiring import Fleet
from tests._services import fleet_settings, free_port, fx_fleet, port_open, wait_for  # noqa: F401 - fx_fleet
from tests.federated.test_tasks import CANARY, CANARY_ENV, fx_canary  # noqa: F401 - fx_canary

pytestmark = pytest.mark.integration

ROW_ID_MAX = 2**31 - 1  # rounds, jobs and deployments have PostgreSQL integer ids


@pytest.fixture(name="client")
def fx_client(fleet: Fleet) -> Iterator[TestClient[Litestar]]:
    with TestClient(app=create_app(fleet=fleet), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(name="admin")
def fx_admin(fleet: Fleet) -> dict[str, str]:
    _, secret = create_token(fleet.engine, Role.ADMIN, "hostile-admin")
    return {"Authorization": f"Bearer {secret}"}


# ------------------------------------------------------------------------------------------ finding 4: tasks

TASK_BODIES = [
    ("/api/v1/rounds", {"task": CANARY}),
    ("/api/v1/schedules", {"interval_s": 3600, "round": {"task": CANARY}}),
    ("/api/v1/jobs", {"kind": "finetune", "task": CANARY, "placement": "local"}),
    ("/api/v1/rounds", {"task": CANARY, "burst": {"kind": "qat"}, "min_clients": 1, "rounds": 1}),
]


@pytest.mark.parametrize(("path", "body"), TASK_BODIES, ids=["rounds", "schedules", "jobs", "round-with-burst"])
def test_a_task_name_never_imports_code_in_the_control_plane(client: TestClient[Litestar], admin: dict[str, str],
                                                             canary: Path, path: str, body: dict[str, Any]) -> None:
    # Execute: {"task": "os:abort"} killed the control plane; the canary only writes a file
    response = client.post(path, json=body, headers=admin)

    # Assert
    assert response.status_code == 400, response.text
    assert f"unknown task '{CANARY}': known tasks are digits" in response.json()["detail"]
    assert not canary.exists(), canary.read_text()
    assert "tests.federated._canary" not in sys.modules


def test_an_allow_listed_task_is_selected_by_name(client: TestClient[Litestar], admin: dict[str, str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the operator's allow-list, as `controlplane serve --task` / EDGEFLEET_TASKS give it
    monkeypatch.setenv("EDGEFLEET_TASKS", "tiny=tests.federated.test_tasks:TinyTask")

    # Execute
    started = client.post("/api/v1/rounds", json={"task": "tiny", "min_clients": 1}, headers=admin)
    unknown = client.post("/api/v1/rounds", json={"task": "vibration"}, headers=admin)

    # Assert: accepted (it then fails for want of devices, which is the record's business)
    assert started.status_code == 201, started.text
    assert started.json()["task"] == "tiny" and started.json()["reason"] == "0 eligible device(s), min_clients is 1"
    assert unknown.status_code == 400
    assert "known tasks are digits, tiny" in unknown.json()["detail"]


def test_a_stored_schedule_with_an_unknown_task_fails_its_run_with_the_reason(fleet: Fleet, canary: Path) -> None:
    # Prepare: a schedule whose stored round names a task this control plane does not register (stored before
    # the registry, or the allow-list changed since): the job as the database holds it, due now
    from controlplane.schedules.service import fire

    stored = json.dumps({"task": CANARY, "min_clients": 1})
    out_of_bounds = json.dumps({"rounds": 10**6})

    # Execute
    def round_of(schedule_id: str) -> RoundRecord | None:
        with Session(fleet.engine) as session:
            return session.exec(select(RoundRecord).where(RoundRecord.schedule_id == schedule_id)).first()

    with structlog.testing.capture_logs() as logs:
        for schedule_id, round_json in (("legacy", stored), ("unbounded", out_of_bounds)):
            fleet.schedules._scheduler.add_job(fire, "date", run_date=datetime.now(UTC), id=schedule_id,
                                               args=[schedule_id, round_json])
        wait_for(lambda: round_of("legacy"), timeout=20, what="the schedule's round record")
        wait_for(lambda: any(e["event"] == "schedule.invalid_round" for e in logs), timeout=20,
                 what="the invalid stored round logged")

    # Assert
    record = round_of("legacy")
    assert record is not None and record.status == "failed" and record.finished_at is not None
    assert record.reason is not None and record.reason.startswith(f"unknown task '{CANARY}': known tasks are digits")
    assert not canary.exists()
    assert round_of("unbounded") is None
    (invalid,) = [e for e in logs if e["event"] == "schedule.invalid_round"]
    assert invalid["schedule_id"] == "unbounded" and "Expected `int` <= 1000 - at `$.rounds`" in invalid["reason"]


# ------------------------------------------------------------------------------------ finding 7: bounds, 5xx

BIG = 2**63


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", f"/api/v1/rounds/{BIG}"),
        ("get", f"/api/v1/jobs/{BIG}"),
        ("post", f"/api/v1/jobs/{BIG}/cancel"),
        ("get", f"/api/v1/deployments/{BIG}"),
        ("get", f"/api/v1/rounds/{10**30}"),
        ("get", f"/api/v1/deployments/{ROW_ID_MAX + 1}"),
        ("get", "/api/v1/rounds/0"),
        ("get", "/api/v1/rounds/-1"),
        ("get", f"/api/v1/devices?offset={BIG}"),
        ("get", "/api/v1/devices?offset=" + "9" * 20),  # issue 11: a 20-digit offset was a 500
        ("get", "/api/v1/deployments/" + "1" * 26),  # issue 11: a 26-digit id was a 500
        ("get", "/api/v1/devices/pi-1/telemetry?since=2026-02-30"),
        ("get", "/api/v1/devices?offset=-1"),
        ("get", "/api/v1/devices?limit=0"),
        ("get", "/api/v1/devices?limit=5001"),
        ("get", f"/api/v1/rounds?limit={BIG}"),
        ("get", "/api/v1/jobs?limit=-5"),
        ("get", "/api/v1/devices/pi-1/telemetry?limit=10001"),
        ("get", "/api/v1/devices/pi-1/telemetry?since=1e999"),
        ("get", "/api/v1/devices/pi-1/telemetry?until=nan"),
        ("get", "/api/v1/devices?profile=" + "p" * 300),
        ("get", "/api/v1/devices?tag=%00"),
        ("get", "/api/v1/devices/" + "d" * 300),
        ("get", "/api/v1/devices/%00"),
        ("get", "/api/v1/models/" + "v" * 300),
        ("get", "/api/v1/schedules/" + "s" * 300),
        ("delete", "/api/v1/schedules/%00"),
    ],
)
def test_out_of_range_paths_and_queries_are_400(client: TestClient[Litestar], admin: dict[str, str],
                                                method: str, path: str) -> None:
    # Execute
    response = getattr(client, method)(path, headers=admin)

    # Assert
    assert response.status_code == 400, response.text
    assert response.json()["status_code"] == 400


def test_the_largest_row_id_is_a_plain_404(client: TestClient[Litestar], admin: dict[str, str]) -> None:
    for path in (f"/api/v1/rounds/{ROW_ID_MAX}", f"/api/v1/jobs/{ROW_ID_MAX}", f"/api/v1/deployments/{ROW_ID_MAX}"):
        response = client.get(path, headers=admin)
        assert response.status_code == 404, (path, response.text)


@pytest.mark.parametrize("value", [0, -1, 1001, "x", None, 1.5, BIG, [3], {"n": 3}])
def test_any_invalid_rounds_value_is_400_naming_the_field(client: TestClient[Litestar], admin: dict[str, str],
                                                          value: object) -> None:
    # Execute: the body field `rounds` used to clash with the dependency of the same name (→ 500)
    response = client.post("/api/v1/rounds", json={"rounds": value}, headers=admin)

    # Assert
    assert response.status_code == 400, response.text
    assert response.json()["extra"][0]["key"] == "rounds"


@pytest.mark.parametrize(
    ("path", "body", "key"),
    [
        ("/api/v1/schedules", {"interval_s": 1e308}, "interval_s"),
        ("/api/v1/schedules", {"interval_s": 1e300, "round": {}}, "interval_s"),
        ("/api/v1/schedules", {"cron": "0 2 * * *", "max_runs": BIG}, "max_runs"),
        ("/api/v1/schedules", {"cron": "* " * 5000}, "cron"),
        ("/api/v1/schedules", {"cron": "0 2 * * *", "round": {"min_clients": BIG}}, "round.min_clients"),
        ("/api/v1/rounds", {"min_clients": 2**70}, "min_clients"),
        ("/api/v1/rounds", {"deploy": 0}, "deploy"),  # a body is decoded as its JSON types say, not leniently
        ("/api/v1/rounds", {"rounds": "3"}, "rounds"),
        ("/api/v1/schedules", {"cron": "0 2 * * *", "round": {"build": "true"}}, "round.build"),
        ("/api/v1/rounds", {"max_clients": 10**9}, "max_clients"),
        ("/api/v1/rounds", {"proximal_mu": 1e308}, "proximal_mu"),
        ("/api/v1/rounds", {"learning_rate": -1}, "learning_rate"),
        ("/api/v1/rounds", {"task": "t" * 65}, "task"),
        ("/api/v1/rounds", {"task": "digits\u0000"}, "task"),
        ("/api/v1/rounds", {"eligibility": {"min_battery_percent": 1e308}}, "eligibility.min_battery_percent"),
        ("/api/v1/rounds", {"burst": {"epochs": BIG}}, "burst.epochs"),
        ("/api/v1/jobs", {"kind": "qat", "epochs": BIG}, "epochs"),
        ("/api/v1/jobs", {"kind": "qat", "base_model_version": "v" * 1000}, "base_model_version"),
        ("/api/v1/jobs", {"kind": "qat", "resources": {"gpus": -1}}, "resources.gpus"),
        ("/api/v1/devices", {"device_id": "ok", "profile": "x" * 300}, "profile"),
        ("/api/v1/devices", {"device_id": "ok", "profile": "raspberry-pi-5", "tags": ["t"] * 33}, "tags"),
        ("/api/v1/deployments", {"model_version": "v" * 1000, "targets": {"all": True}}, "model_version"),
        ("/api/v1/deployments", {"model_version": "v1", "targets": {"device_ids": ["d"] * 100_001}},
         "targets.device_ids"),
        ("/api/v1/deployments", {"model_version": "v1", "targets": {"profiles": ["p" * 300]}}, "targets.profiles"),
        ("/api/v1/deployments", {"model_version": "v1", "targets": {"all": True}, "wave_timeout_s": -1},
         "wave_timeout_s"),
    ],
)
def test_out_of_range_bodies_are_400_naming_the_field(client: TestClient[Litestar], admin: dict[str, str],
                                                      path: str, body: dict[str, Any], key: str) -> None:
    # Execute
    response = client.post(path, json=body, headers=admin)

    # Assert
    assert response.status_code == 400, response.text
    keys = [e.get("key", "") for e in response.json().get("extra", [])]
    assert any(k.startswith(key) for k in keys), (keys, response.text)


def test_device_commands_and_updates_are_bounded(client: TestClient[Litestar], admin: dict[str, str]) -> None:
    # Prepare
    assert client.post("/api/v1/devices", json={"device_id": "pi-1", "profile": "raspberry-pi-5"},
                       headers=admin).status_code == 201

    # Execute
    huge_kind = client.post("/api/v1/devices/pi-1/commands", json={"kind": "k" * 65, "wait_s": 0}, headers=admin)
    nul_kind = client.post("/api/v1/devices/pi-1/commands", json={"kind": "p\u0000", "wait_s": 0}, headers=admin)
    deep_args = client.post("/api/v1/devices/pi-1/commands",
                            json={"kind": "ping", "wait_s": 0, "args": _nested(40)}, headers=admin)
    bad_profile = client.patch("/api/v1/devices/pi-1", json={"profile": "../../etc/passwd"}, headers=admin)
    long_profile = client.patch("/api/v1/devices/pi-1", json={"profile": "x" * 300}, headers=admin)

    # Assert
    for response in (huge_kind, nul_kind, deep_args, bad_profile, long_profile):
        assert response.status_code == 400, response.text


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    return value


@pytest.mark.parametrize("depth", [100_000, 1000, 65])
def test_deeply_nested_json_is_400(client: TestClient[Litestar], admin: dict[str, str], depth: int) -> None:
    # Execute
    body = "[" * depth + "]" * depth
    as_object = '{"task": ' * depth + "1" + "}" * depth
    responses = [client.post(p, content=b, headers={**admin, "Content-Type": "application/json"})
                 for p in ("/api/v1/rounds", "/api/v1/devices") for b in (body, as_object)]

    # Assert
    for response in responses:
        assert response.status_code == 400, response.text
        assert "nested deeper than" in response.json()["detail"]


def test_strings_that_look_like_nesting_are_not_counted(client: TestClient[Litestar], admin: dict[str, str]) -> None:
    # Execute: brackets and escaped quotes inside JSON strings are not nesting (and a NUL in a JSON argument is
    # stored as JSON text, on PostgreSQL too)
    note = "[" * 5000 + '\\"{' * 100 + "\\" + "{" * 100
    body = json.dumps({"kind": "ping", "wait_s": 0, "args": {"note": note, "[[[[": ["{{{{"], "nul": "a\u0000b"}})
    client.post("/api/v1/devices", json={"device_id": "pi-1", "profile": "raspberry-pi-5"}, headers=admin)
    response = client.post("/api/v1/devices/pi-1/commands", content=body,
                           headers={**admin, "Content-Type": "application/json"})

    # Assert
    assert response.status_code == 202, response.text


def test_an_oversized_body_is_413(client: TestClient[Litestar], admin: dict[str, str]) -> None:
    # Execute
    response = client.post("/api/v1/rounds", content=b'{"task": "' + b"x" * (2 * 1024 * 1024) + b'"}',
                           headers={**admin, "Content-Type": "application/json"})

    # Assert
    assert response.status_code == 413, response.text


def test_no_dependency_shadows_a_request_field(client: TestClient[Litestar]) -> None:
    # Prepare: every name a client can send (bodies' properties at any depth, query and path parameters)
    schema = client.get("/schema/openapi.json").json()
    names: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            names.update(node.get("properties", {}))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema["components"]["schemas"])
    for operations in schema["paths"].values():
        for operation in operations.values():
            names.update(p["name"] for p in operation.get("parameters", []))

    # Execute
    dependencies = set(client.app.dependencies)

    # Assert
    assert {"rounds", "task", "limit"} <= names
    assert not dependencies & names, dependencies & names


# --------------------------------------------------------------------------------------------- finding 7: logs


@pytest.mark.slow
def test_client_errors_are_one_log_line_without_a_traceback(tmp_path: Path) -> None:
    # Prepare: `edgefleet controlplane serve` (embedded broker, SQLite) as deployed, its log on stderr
    data_dir, port, broker_port = tmp_path / "cp", free_port(), free_port()
    cli = [sys.executable, "-m", "controlplane._entry"]
    token = subprocess.run([*cli, "tokens", "create", "--role", "admin", "--data-dir", str(data_dir), "--create"],
                           capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log_file:
        server = subprocess.Popen([*cli, "controlplane", "serve", "--port", str(port), "--data-dir", str(data_dir),
                                   "--embedded-broker-port", str(broker_port),
                                   "--task", "tiny=tests.federated.test_tasks:TinyTask"],
                                  stdout=log_file, stderr=log_file)
    try:
        wait_for(lambda: port_open("127.0.0.1", port), timeout=60, what="control plane up")
        import httpx

        base, auth = f"http://127.0.0.1:{port}/api/v1", {"Authorization": f"Bearer {token}"}
        before = log_path.read_text().count("\n")
        requests: list[tuple[str, str, dict[str, Any]]] = [
            ("GET", "/devices", {}),  # 401: no token
            ("GET", "/devices", {"headers": {"Authorization": "Bearer ef_nope"}}),  # 401
            ("GET", "/devices/nope", {"headers": auth}),  # 404
            ("POST", "/rounds", {"headers": auth, "json": {"rounds": "x"}}),  # 400
            ("POST", "/rounds", {"headers": auth, "json": {"task": "os:abort"}}),  # 400
            ("GET", f"/rounds/{BIG}", {"headers": auth}),  # 400
            ("POST", "/devices", {"headers": auth, "content": "[" * 100_000}),  # 400
        ]

        # Execute
        statuses = [httpx.request(method, base + path, timeout=30, **kw).status_code for method, path, kw in requests]
        registered = httpx.post(base + "/rounds", json={"task": "tiny", "min_clients": 1}, headers=auth, timeout=30)
        time.sleep(0.5)
    finally:
        server.terminate()
        server.wait(30)

    # Assert
    assert statuses == [401, 401, 404, 400, 400, 400, 400]
    assert registered.status_code == 201, registered.text  # the --task allow-list
    assert "tasks digits, tiny" in log_path.read_text()
    lines = log_path.read_text().splitlines()[before:]
    errors = [json.loads(line) for line in lines if '"api.client_error"' in line]
    assert "Traceback" not in "\n".join(lines), "\n".join(lines)
    assert [e["status"] for e in errors] == statuses
    assert all(e["level"] == "info" and "exception" not in e for e in errors)
    assert errors[0]["method"] == "GET" and errors[0]["path"] == "/api/v1/devices" and "token" in errors[0]["detail"]


def test_serve_refuses_a_malformed_task_allow_list(tmp_path: Path) -> None:
    # Execute
    result = subprocess.run([sys.executable, "-m", "controlplane._entry", "controlplane", "serve", "--data-dir",
                             str(tmp_path), "--port", str(free_port()), "--task", "vibration=os.path"],
                            capture_output=True, text=True, timeout=60, check=False)

    # Assert: one clear line before anything starts
    assert result.returncode == 2
    assert "error: EDGEFLEET_TASKS: 'vibration=os.path': the target must be 'package.module:Class'" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_server_fault_is_a_500_logged_with_its_traceback_once() -> None:
    # Prepare: a handler that fails as a bug would, in an app with the control plane's error mapping
    from litestar import get

    from controlplane._http import exception_handlers, limit_json_nesting

    @get("/boom", sync_to_thread=False)
    def boom() -> None:
        raise RuntimeError("a bug")

    app = Litestar([boom], exception_handlers=exception_handlers(),  # type: ignore[arg-type]
                   before_request=limit_json_nesting, logging_config=None)

    # Execute
    with structlog.testing.capture_logs() as logs, TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/boom")
        missing = client.get("/nowhere")

    # Assert
    assert response.status_code == 500 and response.json() == {"status_code": 500, "detail": "Internal Server Error"}
    assert missing.status_code == 404
    fault, not_found = logs
    assert fault["event"] == "api.server_error" and fault["log_level"] == "error" and fault["status"] == 500
    assert isinstance(fault["exc_info"], RuntimeError) and str(fault["exc_info"]) == "a bug"
    assert not_found["event"] == "api.client_error" and not_found["log_level"] == "info" and "exc_info" not in not_found


# ------------------------------------------------------------------------------------- finding 7: every endpoint

# Valid input to these does real work that outlasts the run: a burst job trains (and may start a Ray head), a
# command waits up to `wait_s` for the device's ack. They get invalid input only.
_POSITIVE_EXCLUDED = ("ApiV1JobsSubmit", "ApiV1DevicesDeviceIdCommandsSendCommand")

# Rules JSON Schema cannot state, checked by the services with a 400 naming the reason: a schema-valid body can
# still be refused for them, so positive_data_acceptance accepts a 400 on these operations (and on no other).
_SEMANTIC_400 = {
    "ApiV1DevicesEnroll": "the profile must be a known firmware profile; ids reserved for the control plane",
    "ApiV1DevicesDeviceIdUpdateDevice": "the profile must be a known firmware profile",
    "ApiV1DeploymentsCreate": "waves increasing to 100; the model ready; the targets must match enrolled devices",
    "ApiV1RoundsStart": "the task must be registered; max_clients >= min_clients; burst needs a burst backend",
    "ApiV1SchedulesCreate": "exactly one of cron and interval_s; cron syntax; the round's rules as above",
    "ApiV1ProvisioningTokensCreate": "the profile must be a known firmware profile that runs the Python agent",
    "ApiV1DevicesDeviceIdTelemetryTelemetry": "since/until may name 29 February, a date in leap years only",
}


def _seed(fleet: Fleet, tmp_path: Path) -> None:
    """A fleet with something behind every id the API serves: devices with telemetry and a command, a model with
    published variants, a deployment, a round record, a burst job, a schedule and a provisioning token."""
    from controlplane.db import CommandRecord, JobRecord, TelemetryRecord
    from controlplane.deployments.schemas import DeploymentCreate, Targets
    from controlplane.devices.schemas import DeviceCreate
    from controlplane.provisioning.schemas import ProvisioningTokenCreate
    from controlplane.schedules.schemas import ScheduleCreate
    from controlplane.statuses import JobStatus, RoundStatus
    from federated.burst.spec import JobKind
    from federated.flower.config import Strategy
    from tests.controlplane.test_models_deployments import register_starter

    for i in range(3):
        fleet.devices.enroll(DeviceCreate(device_id=f"st-{i}", profile="raspberry-pi-5", tags=["lab"]))
    register_starter(fleet, "st-v1", {"fp32": 0.95, "full-int8": 0.94})
    fleet.deployments.create(DeploymentCreate(model_version="st-v1", targets=Targets(device_ids=["st-0"])))
    fleet.schedules.create(ScheduleCreate(id="nightly", cron="0 2 * * *"))
    from controlplane.provisioning.service import ProvisioningService

    ProvisioningService(fleet.engine, fleet.devices, fleet.pki).create(
        ProvisioningTokenCreate(profile="raspberry-pi-5"), created_by="st")
    now = datetime.now(UTC)
    with Session(fleet.engine) as session:
        session.add_all(TelemetryRecord(device_id="st-0", seq=seq, ts=1_795_300_000.0 + seq, received_at=now,
                                        payload=json.dumps({"cpu_percent": 12.5})) for seq in range(5))
        session.add(CommandRecord(command_id="c0ffee", device_id="st-0", kind="ping", created_at=now))
        session.add(RoundRecord(task="digits", strategy=Strategy.FEDAVG, status=RoundStatus.SUCCEEDED,
                                created_at=now, finished_at=now))
        session.add(JobRecord(kind=JobKind.QAT, task="digits", status=JobStatus.SUCCEEDED, placement="local",
                              placement_reason="seeded", out_dir=str(tmp_path / "job"), created_at=now))
        session.commit()


@pytest.mark.slow
def test_the_api_keeps_its_contract_under_generated_input(fleet: Fleet, admin: dict[str, str],
                                                          tmp_path: Path) -> None:
    # Prepare: the served API (uvicorn over real HTTP) on a seeded fleet and its OpenAPI document; schemathesis
    # generates requests from it (examples, boundary values, fuzzed valid and invalid input, stateful sequences
    # over the links it infers) with an admin token and runs every check: no 5xx, only documented status codes,
    # content types and headers, bodies that match their schemas, invalid input refused and valid input accepted,
    # what is deleted is gone, what is created can be read, and no token is refused (401) or ignored.
    pytest.importorskip("schemathesis")
    from controlplane.demo import AppServer

    _seed(fleet, tmp_path)
    config = tmp_path / "schemathesis.toml"
    config.write_text("".join(
        f'[[operations]]\ninclude-operation-id = "{op}"\n'
        f'checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "409"]\n\n'
        for op in _SEMANTIC_400))
    port = free_port()
    base = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run",
            f"http://127.0.0.1:{port}/schema/openapi.json",
            "--header", f"Authorization:{admin['Authorization']}", "--checks", "all",
            "--seed", "1", "--workers", "1", "--no-color", "--generation-database", "none",
            "--request-timeout", "30", "--max-examples", "25"]
    runs = {
        "all": [*base, "--mode", "all", *(a for op in _POSITIVE_EXCLUDED for a in ("--exclude-operation-id", op))],
        "negative": [*base, "--mode", "negative", "--phases", "examples,coverage,fuzzing",
                     *(a for op in _POSITIVE_EXCLUDED for a in ("--include-operation-id", op))],
    }

    # Execute
    with AppServer(create_app(fleet=fleet), port):
        results = {name: subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                                        check=False) for name, command in runs.items()}

    # Assert
    for name, result in results.items():
        assert result.returncode == 0, f"{name}:\n{result.stdout[-8000:]}\n{result.stderr[-2000:]}"
        # "N failed" counts failing cases; a warning such as "Authentication failed: 1 operation returned only
        # 401/403" (POST /enroll takes a provisioning token, not this admin token) is not one.
        summary = result.stdout.split("SUMMARY")[-1]
        assert " passed" in result.stdout and not re.search(r"\b\d+ failed\b", summary), result.stdout
