"""Provisioning tokens and device self-enrolment, through the real API, database, fleet CA and broker."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from litestar.testing import TestClient
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import update
from sqlmodel import Session

from agent import protocol as wire
from controlplane.app import create_app
from controlplane.auth import Role, create_token
from controlplane.db import Device, ProvisioningTokenRecord, utcnow
from controlplane.settings import Settings
from controlplane.wiring import Fleet
from tests._services import free_port, fx_fleet  # noqa: F401 - fx_fleet

pytestmark = pytest.mark.integration


@pytest.fixture(name="client")
def fx_client(fleet: Fleet) -> Iterator[TestClient]:  # type: ignore[type-arg]
    with TestClient(app=create_app(fleet=fleet)) as client:
        yield client


def admin(fleet: Fleet, role: Role = Role.ADMIN) -> dict[str, str]:
    _, secret = create_token(fleet.engine, role, f"test-{role}")
    return {"Authorization": f"Bearer {secret}"}


def provision(client: TestClient, fleet: Fleet, **body: Any) -> dict[str, Any]:  # type: ignore[type-arg]
    response = client.post("/api/v1/provisioning-tokens", headers=admin(fleet),
                           json={"profile": "raspberry-pi-4", "tags": ["lab", "line-2"], **body})
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def csr_for(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
           .sign(key, hashes.SHA256()))
    return key, csr.public_bytes(serialization.Encoding.PEM).decode()


def enroll(client: TestClient, token: str, device_id: str, **body: Any) -> Any:  # type: ignore[type-arg]
    return client.post("/api/v1/enroll", json={"device_id": device_id, **body},
                       headers={"Authorization": f"Bearer {token}"})


def test_token_is_shown_once_stored_hashed_and_listed_without_secrets(
        client: TestClient, fleet: Fleet) -> None:  # type: ignore[type-arg]
    # Execute
    created = provision(client, fleet, max_uses=3, expires_in_s=3600)
    listed = client.get("/api/v1/provisioning-tokens", headers=admin(fleet))
    # Assert
    token = created["token"]
    assert token.startswith("efp_") and len(token) >= 40
    assert created["provisioning_token"]["state"] == "active"
    assert created["ca_bundle_pem"].startswith("-----BEGIN CERTIFICATE-----")
    assert listed.status_code == 200
    assert token not in listed.text
    [row] = listed.json()
    assert row["max_uses"] == 3 and row["uses"] == 0 and row["created_by"] == "test-admin"
    assert row["tags"] == ["lab", "line-2"]
    with Session(fleet.engine) as session:
        stored = session.get(ProvisioningTokenRecord, row["id"])
        assert stored is not None and token not in stored.token_hash and len(stored.token_hash) == 64


def test_only_admins_manage_tokens_and_bounds_are_400(client: TestClient, fleet: Fleet) -> None:  # type: ignore[type-arg]
    body = {"profile": "raspberry-pi-4"}
    assert client.post("/api/v1/provisioning-tokens", json=body, headers=admin(fleet, Role.OPERATOR)).status_code == 403
    assert client.get("/api/v1/provisioning-tokens", headers=admin(fleet, Role.VIEWER)).status_code == 403
    for bad in ({"max_uses": 0}, {"max_uses": 100_001}, {"expires_in_s": 31 * 86400}, {"profile": "no-such-board"},
                {"tags": ["bad tag"]}):
        response = client.post("/api/v1/provisioning-tokens", json={**body, **bad}, headers=admin(fleet))
        assert response.status_code == 400, (bad, response.text)
    assert client.delete("/api/v1/provisioning-tokens/999", headers=admin(fleet)).status_code == 404


def test_enrolment_signs_the_csr_for_the_enrolled_id_whatever_it_asked(
        client: TestClient, fleet: Fleet) -> None:  # type: ignore[type-arg]
    # Prepare: a CSR asking for another device's name
    token = provision(client, fleet)["token"]
    key, csr = csr_for("someone-else")
    flower_key = ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    # Execute
    response = enroll(client, token, "pi-0001", csr=csr, flower_public_key=flower_key + " pi@lab",
                      agent_version="0.9.0")
    # Assert
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["device_id"] == body["mqtt_username"] == "pi-0001"
    assert body["profile"] == "raspberry-pi-4" and body["tags"] == ["lab", "line-2"]
    assert body["mqtt_password"] and body["signing_public_key"] == fleet.signer.public_key_b64
    assert body["controlplane_url"].startswith("http")
    cert = x509.load_pem_x509_certificate(body["client_certificate_pem"].encode())
    ca = x509.load_pem_x509_certificates(body["ca_bundle_pem"].encode())[0]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "pi-0001"
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]
    cert.verify_directly_issued_by(ca)
    with Session(fleet.engine) as session:
        device = session.get(Device, "pi-0001")
        assert device is not None and device.flower_public_key == flower_key
        assert device.agent_version == "0.9.0"


def test_max_uses_holds_under_20_concurrent_enrolments(client: TestClient, fleet: Fleet) -> None:  # type: ignore[type-arg]
    # Prepare
    created = provision(client, fleet, max_uses=5)
    token, token_id = created["token"], created["provisioning_token"]["id"]
    start = threading.Barrier(20)

    def attempt(i: int) -> int:
        start.wait()
        return int(enroll(client, token, f"conc-{i:02d}").status_code)

    # Execute
    with ThreadPoolExecutor(20) as pool:
        codes = list(pool.map(attempt, range(20)))
    # Assert: exactly five enrolled, the rest refused as used up
    assert sorted(codes) == [201] * 5 + [403] * 15
    assert len([d for d in fleet.devices.find(limit=100) if d.device_id.startswith("conc-")]) == 5
    [row] = [t for t in client.get("/api/v1/provisioning-tokens", headers=admin(fleet)).json() if t["id"] == token_id]
    assert row["uses"] == 5 and row["state"] == "used_up"
    refused = enroll(client, token, "conc-99")
    assert refused.status_code == 403 and "max_uses" in refused.json()["detail"]


def test_failed_enrolments_do_not_use_up_the_token(client: TestClient, fleet: Fleet) -> None:  # type: ignore[type-arg]
    token = provision(client, fleet, max_uses=1)["token"]
    assert enroll(client, token, "pi-1", csr="not a csr").status_code == 400
    assert enroll(client, token, "pi-1", flower_public_key="ssh-ed25519 AAAA").status_code == 400
    p256 = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    wrong_curve = enroll(client, token, "pi-1", flower_public_key=p256)
    assert wrong_curve.status_code == 400 and "P-384" in wrong_curve.json()["detail"]
    assert enroll(client, token, "-bad-id").status_code == 400
    assert enroll(client, token, "pi-1").status_code == 201


def test_repeat_enrolment_is_409_never_a_takeover(client: TestClient, fleet: Fleet) -> None:  # type: ignore[type-arg]
    token = provision(client, fleet, max_uses=3)["token"]
    first = enroll(client, token, "pi-7")
    second = enroll(client, token, "pi-7")
    assert first.status_code == 201
    assert second.status_code == 409 and "already enrolled" in second.json()["detail"]
    [row] = client.get("/api/v1/provisioning-tokens", headers=admin(fleet)).json()
    assert row["uses"] == 1  # the refused attempt gave its use back


def test_expired_and_revoked_tokens_are_refused_without_revealing_devices(
        client: TestClient, fleet: Fleet) -> None:  # type: ignore[type-arg]
    # Prepare: an enrolled device, an expired token and a revoked one
    live = provision(client, fleet, max_uses=5)["token"]
    assert enroll(client, live, "pi-known").status_code == 201
    expired = provision(client, fleet)
    with Session(fleet.engine) as session:
        session.exec(update(ProvisioningTokenRecord)
                     .where(ProvisioningTokenRecord.id == expired["provisioning_token"]["id"])
                     .values(expires_at=utcnow()))
        session.commit()
    revoked = provision(client, fleet)
    assert client.delete(f"/api/v1/provisioning-tokens/{revoked['provisioning_token']['id']}",
                         headers=admin(fleet)).status_code == 204
    time.sleep(0.01)
    # Execute / Assert: the same answer for a known and an unknown device id
    for token, reason in ((expired["token"], "expired"), (revoked["token"], "revoked")):
        known, unknown = enroll(client, token, "pi-known"), enroll(client, token, "pi-new")
        assert known.status_code == unknown.status_code == 403
        assert known.json()["detail"] == unknown.json()["detail"] and reason in known.json()["detail"]
    states = {t["id"]: t["state"] for t in client.get("/api/v1/provisioning-tokens", headers=admin(fleet)).json()}
    assert states[expired["provisioning_token"]["id"]] == "expired"
    assert states[revoked["provisioning_token"]["id"]] == "revoked"


def test_operator_and_provisioning_tokens_each_work_only_where_they_belong(
        client: TestClient, fleet: Fleet) -> None:  # type: ignore[type-arg]
    # Prepare
    operator_admin = admin(fleet)
    token = provision(client, fleet, max_uses=5)["token"]
    as_device = {"Authorization": f"Bearer {token}"}
    # Execute / Assert: an admin token cannot enrol through /enroll ...
    refused = client.post("/api/v1/enroll", json={"device_id": "pi-x"}, headers=operator_admin)
    assert refused.status_code == 401 and "provisioning token" in refused.json()["detail"]
    assert client.post("/api/v1/enroll", json={"device_id": "pi-x"}).status_code == 401
    assert enroll(client, "efp_" + "x" * 43, "pi-x").status_code == 401
    # ... and a provisioning token works nowhere else
    assert client.post("/api/v1/devices", json={"device_id": "pi-y", "profile": "raspberry-pi-4"},
                       headers=as_device).status_code == 401
    assert client.get("/api/v1/devices", headers=as_device).status_code == 401
    assert client.get("/api/v1/provisioning-tokens", headers=as_device).status_code == 401
    assert client.post("/api/v1/provisioning-tokens", json={"profile": "raspberry-pi-4"},
                       headers=as_device).status_code == 401
    # an oversized body is refused before it is read whole
    big = client.post("/api/v1/enroll", content=b'{"device_id": "pi-z", "csr": "' + b"A" * 100_000 + b'"}',
                      headers={**as_device, "Content-Type": "application/json"})
    assert big.status_code == 413


@pytest.fixture(name="embedded_fleet")
def fx_embedded_fleet(tmp_path: Path) -> Iterator[Fleet]:
    """A control plane on its embedded broker (real device credentials, checked at CONNECT)."""
    fleet = Fleet(Settings(data_dir=tmp_path / "cp", embedded_broker_port=free_port())).start(ingest=False)
    yield fleet
    fleet.stop()


def test_enrolled_password_connects_to_the_embedded_broker(embedded_fleet: Fleet) -> None:
    # Prepare
    fleet = embedded_fleet
    with TestClient(app=create_app(fleet=fleet)) as client:
        token = provision(client, fleet)["token"]
        # Execute
        body = enroll(client, token, "pi-mqtt").json()
    # Assert: the device connects with its own id and publishes its state; a wrong password is refused
    assert connect(body["broker_url"], "pi-mqtt", body["mqtt_password"]) == 0
    assert connect(body["broker_url"], "pi-mqtt", "wrong") != 0


def connect(broker_url: str, device_id: str, password: str) -> int:
    """The CONNACK reason code (0: accepted) after publishing the device's state when accepted."""
    from agent.mqtt import parse_broker_url

    address = parse_broker_url(broker_url)
    result: dict[str, int] = {}
    done = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv311)
    client.username_pw_set(device_id, password)

    def on_connect(c: mqtt.Client, u: Any, flags: Any, reason: Any, props: Any) -> None:
        result["rc"] = int(reason.value)
        done.set()

    client.on_connect = on_connect
    client.connect(address.host, address.port)
    client.loop_start()
    try:
        assert done.wait(10), "no CONNACK"
        if result["rc"] == 0:
            info = client.publish(wire.topic(device_id, wire.Channel.TELEMETRY), b"{}", qos=1)
            info.wait_for_publish(5)
            assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()
    return result["rc"]
