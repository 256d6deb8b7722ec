"""The HTTP API as an operator uses it: auth, enrolment, queries, errors."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import pytest
from litestar.testing import TestClient

from controlplane.app import create_app
from controlplane.auth import Role, create_token
from controlplane.wiring import Fleet
from tests._services import fleet_settings, fx_fleet  # noqa: F401 - fx_fleet

pytestmark = pytest.mark.integration


@pytest.fixture(name="client")
def fx_client(fleet: Fleet) -> Iterator[TestClient]:  # type: ignore[type-arg]
    with TestClient(app=create_app(fleet=fleet)) as client:
        yield client


def bearer(fleet: Fleet, role: Role) -> dict[str, str]:
    _, secret = create_token(fleet.engine, role, f"test-{role}")
    return {"Authorization": f"Bearer {secret}"}


def test_requests_without_a_valid_token_are_401(client: TestClient) -> None:  # type: ignore[type-arg]
    # Execute
    missing = client.get("/api/v1/devices")
    wrong = client.get("/api/v1/devices", headers={"Authorization": "Bearer ef_nope"})
    # Assert
    assert missing.status_code == 401
    assert wrong.status_code == 401
    assert "token" in missing.json()["detail"]


def test_roles_are_enforced_with_403(client: TestClient, fleet: Fleet) -> None:  # type: ignore[type-arg]
    # Prepare
    viewer, operator, admin = (bearer(fleet, r) for r in (Role.VIEWER, Role.OPERATOR, Role.ADMIN))
    body = {"device_id": "pi-1", "profile": "raspberry-pi-5", "tags": ["lab"]}
    # Execute / Assert
    assert client.post("/api/v1/devices", json=body, headers=viewer).status_code == 403
    assert client.post("/api/v1/devices", json=body, headers=operator).status_code == 403
    assert client.post("/api/v1/devices", json=body, headers=admin).status_code == 201
    assert client.get("/api/v1/devices", headers=viewer).status_code == 200
    assert client.patch("/api/v1/devices/pi-1", json={"tags": ["x"]}, headers=viewer).status_code == 403
    assert client.patch("/api/v1/devices/pi-1", json={"tags": ["x"]}, headers=operator).status_code == 200
    denied = client.delete("/api/v1/devices/pi-1", headers=operator)
    assert denied.status_code == 403
    assert "admin" in denied.json()["detail"]
    assert client.delete("/api/v1/devices/pi-1", headers=admin).status_code == 204


def test_revoked_token_is_rejected(client: TestClient, fleet: Fleet) -> None:  # type: ignore[type-arg]
    from controlplane.auth import revoke_token

    # Prepare
    info, secret = create_token(fleet.engine, Role.ADMIN)
    revoke_token(fleet.engine, info.id)
    # Execute
    response = client.get("/api/v1/devices", headers={"Authorization": f"Bearer {secret}"})
    # Assert
    assert response.status_code == 401


def test_enrolment_returns_credentials_once(client: TestClient, fleet: Fleet) -> None:  # type: ignore[type-arg]
    # Prepare
    admin = bearer(fleet, Role.ADMIN)
    # Execute
    created = client.post("/api/v1/devices", json={"device_id": "gw-7", "profile": "x86-gateway",
                                                    "tags": ["plant-a", "line-2"]}, headers=admin)
    fetched = client.get("/api/v1/devices/gw-7", headers=admin)
    key = client.get("/api/v1/signing-key", headers=admin).json()
    # Assert
    assert created.status_code == 201
    body = created.json()
    assert body["device_id"] == "gw-7"
    assert body["mqtt_username"] == "gw-7"
    assert len(body["mqtt_password"]) >= 24
    assert body["broker_url"].startswith("mqtt://")
    assert "mqtt_password" not in fetched.json()
    assert fetched.json()["tags"] == ["line-2", "plant-a"]
    assert body["signing_public_key"] == key["public_key"]
    assert len(base64.b64decode(key["public_key"])) == 32 and key["algorithm"] == "ed25519"


def test_list_filters(client: TestClient, fleet: Fleet) -> None:  # type: ignore[type-arg]
    # Prepare
    admin = bearer(fleet, Role.ADMIN)
    for device_id, profile, tags in [("a", "raspberry-pi-5", ["t1"]), ("b", "raspberry-pi-4", ["t1", "t2"]),
                                      ("c", "raspberry-pi-5", [])]:
        client.post("/api/v1/devices", json={"device_id": device_id, "profile": profile, "tags": tags},
                    headers=admin)
    # Execute
    by_profile = client.get("/api/v1/devices", params={"profile": "raspberry-pi-5"}, headers=admin).json()
    by_tag = client.get("/api/v1/devices", params={"tag": "t1"}, headers=admin).json()
    offline = client.get("/api/v1/devices", params={"online": "false"}, headers=admin).json()
    # Assert
    assert [d["device_id"] for d in by_profile] == ["a", "c"]
    assert [d["device_id"] for d in by_tag] == ["a", "b"]
    assert len(offline) == 3


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"device_id": "bad/id", "profile": "raspberry-pi-5"}, 400, "device_id"),
        ({"device_id": "ok", "profile": "toaster"}, 400, "unknown profile 'toaster'"),
        ({"device_id": "ok", "profile": "esp32-s3"}, 400, "export target"),
        ({"device_id": "ok"}, 400, "profile"),
        ({"device_id": "ok", "profile": "raspberry-pi-5", "colour": "red"}, 400, "colour"),
        ({"device_id": "ok", "profile": "raspberry-pi-5", "tags": "lab"}, 400, "tags"),
    ],
)
def test_invalid_enrolment_is_400_with_reason(client: TestClient, fleet: Fleet, body: dict[str, object],
                                              status: int, needle: str) -> None:  # type: ignore[type-arg]
    # Execute
    response = client.post("/api/v1/devices", json=body, headers=bearer(fleet, Role.ADMIN))
    # Assert
    assert response.status_code == status
    text = str(response.json())
    assert needle in text, text


def test_duplicate_and_missing_devices(client: TestClient, fleet: Fleet) -> None:  # type: ignore[type-arg]
    # Prepare
    admin = bearer(fleet, Role.ADMIN)
    body = {"device_id": "dup", "profile": "raspberry-pi-5"}
    client.post("/api/v1/devices", json=body, headers=admin)
    # Execute
    again = client.post("/api/v1/devices", json=body, headers=admin)
    missing = client.get("/api/v1/devices/nope", headers=admin)
    telemetry = client.get("/api/v1/devices/nope/telemetry", headers=admin)
    # Assert
    assert again.status_code == 409
    assert again.json() == {"status_code": 409, "detail": "device 'dup' is already enrolled"}
    assert missing.status_code == 404
    assert telemetry.status_code == 404


def test_health_and_openapi_need_no_token(client: TestClient) -> None:  # type: ignore[type-arg]
    # Execute
    health = client.get("/healthz")
    schema = client.get("/schema/openapi.json")
    # Assert
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    assert schema.status_code == 200
    assert "/api/v1/devices" in schema.json()["paths"]


def test_ingest_stats_shape(client: TestClient, fleet: Fleet) -> None:  # type: ignore[type-arg]
    # Execute
    stats = client.get("/api/v1/ingest/stats", headers=bearer(fleet, Role.VIEWER)).json()
    # Assert
    assert set(stats) >= {"received", "stored", "duplicates", "dead_letters"}
