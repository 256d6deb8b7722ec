"""Signing-key rotation (issue 10 §5) over a real control plane (app, broker, SQLite and PostgreSQL) and devices that
answer the rotation commands with the agent's own command handling and trust store (agent.trust), and verify
releases against it (agent.manifest): the key is learned, acknowledged, switched, the old one retired; an absent
device catches up; completion waits for every device unless forced; a real agent's active model survives the
retirement and a restart. Forged and replayed statements: tests/agent/test_trust.py."""

from __future__ import annotations

import base64
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from litestar.testing import TestClient
from sqlmodel import Session, select

from agent import protocol as wire
from agent.manifest import (
    ManifestError,
    Release,
    SignedRelease,
    TrustedKeys,
    decode_signed_release,
    key_id,
    release_bytes,
    verify_release,
    verify_signature,
)
from agent.mqtt import MqttProtocol, make_client, parse_broker_url
from agent.trust import TrustStore, apply_key_command, trust_store_for
from controlplane.app import create_app
from controlplane.auth import Role, create_token
from controlplane.db import DeploymentReleaseRecord
from controlplane.deployments.schemas import DeploymentCreate, Targets
from controlplane.devices.schemas import DeviceCreate
from controlplane.wiring import Fleet
from federated.signing import PRIVATE_KEY_FILE
from tests._services import fx_fleet, wait_for  # noqa: F401 - fx_fleet
from tests.controlplane.test_models_deployments import register_starter

pytestmark = pytest.mark.integration

PROFILE = "raspberry-pi-5"


class Device:
    """A device on the real broker whose signing-key commands are answered as the agent answers them
    (:func:`agent.trust.apply_key_command` on its trust store in ``data_dir``) and acked as the agent acks.
    Other commands are left unanswered."""

    def __init__(self, broker_url: str, device_id: str, data_dir: Path, signing_key: bytes) -> None:
        self.address = parse_broker_url(broker_url)
        self.device_id = device_id
        self.data_dir, self.signing_key = data_dir, signing_key
        self.acks: list[wire.Ack] = []
        self.client: mqtt.Client | None = None

    @property
    def store(self) -> TrustStore:
        return trust_store_for(self.data_dir, self.signing_key)

    def _state(self, online: bool) -> bytes:
        return wire.encode(wire.State(device_id=self.device_id, online=online, ts=time.time()))

    def connect(self) -> None:
        """Come online with a fresh broker session (nothing queued for it), subscribe, announce itself."""
        client = make_client(self.address, f"test-{self.device_id}-{uuid.uuid4().hex[:6]}",
                             protocol=MqttProtocol.V5)
        client.on_message = self._on_message
        client.will_set(wire.topic(self.device_id, wire.Channel.STATE), self._state(False), qos=1, retain=True)
        subscribed = threading.Event()
        client.on_subscribe = lambda *a: subscribed.set()
        client.connect(self.address.host, self.address.port)
        client.subscribe(wire.topic(self.device_id, wire.Channel.CMD), qos=1)
        client.loop_start()
        assert subscribed.wait(5)
        client.publish(wire.topic(self.device_id, wire.Channel.STATE), self._state(True), qos=1,
                       retain=True).wait_for_publish(5)
        self.client = client

    def disconnect(self) -> None:
        if self.client is not None:
            self.client.publish(wire.topic(self.device_id, wire.Channel.STATE), self._state(False), qos=1,
                                retain=True).wait_for_publish(5)
            self.client.disconnect()
            self.client.loop_stop()
            self.client = None

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        command = wire.decode(msg.payload, wire.Command)
        if command.kind not in (wire.CommandKind.TRUST_SIGNING_KEY, wire.CommandKind.RETIRE_SIGNING_KEY):
            return
        ok, reason, result = apply_key_command(self.store, command, self.device_id)
        ack = wire.Ack(device_id=self.device_id, command_id=command.command_id, ok=ok, reason=reason,
                       result=result, ts=time.time())
        self.acks.append(ack)
        client.publish(wire.topic(self.device_id, wire.Channel.ACK), wire.encode(ack), qos=1)


@pytest.fixture(name="devices")
def fx_devices(fleet: Fleet, mosquitto_url: str, tmp_path: Path) -> Iterator[dict[str, Device]]:
    made: dict[str, Device] = {}
    key = fleet.signer.public_key_raw
    for name in ("rot-a", "rot-b", "rot-c"):
        fleet.devices.enroll(DeviceCreate(device_id=name, profile=PROFILE))
        made[name] = Device(mosquitto_url, name, tmp_path / name, key)
    yield made
    for device in made.values():
        device.disconnect()


@pytest.fixture(name="api")
def fx_api(fleet: Fleet) -> Iterator[tuple[TestClient[Any], dict[str, str], dict[str, str]]]:
    _, admin = create_token(fleet.engine, Role.ADMIN)
    _, viewer = create_token(fleet.engine, Role.VIEWER)
    with TestClient(app=create_app(fleet=fleet)) as client:
        yield client, {"Authorization": f"Bearer {admin}"}, {"Authorization": f"Bearer {viewer}"}


def _status(client: TestClient[Any], headers: dict[str, str]) -> dict[str, Any]:
    response = client.get("/api/v1/keys", headers=headers)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def verify(release_json: bytes, keys: TrustedKeys) -> Release:
    """What the agent checks first: the release's signature, by a key the device trusts."""
    return verify_release(decode_signed_release(release_json), keys)


def _release_of(fleet: Fleet, deployment_id: int) -> bytes:
    with Session(fleet.engine) as session:
        row = session.exec(select(DeploymentReleaseRecord)
                           .where(DeploymentReleaseRecord.deployment_id == deployment_id)).first()
        assert row is not None
        return msgspec.json.encode(row.signed_release)


def test_rotation_switches_the_fleet_to_the_new_key_and_retires_the_old(
        fleet: Fleet, devices: dict[str, Device], api: tuple[TestClient[Any], dict[str, str], dict[str, str]]) -> None:
    # Prepare: three devices online, a model version in the registry, a release signed by the first key
    client, admin, viewer = api
    for device in devices.values():
        device.connect()
    register_starter(fleet, "m1", {"fp32": 0.975, "full-int8": 0.975})
    old_key_id = fleet.signer.key_id
    before = fleet.deployments.create(DeploymentCreate(model_version="m1", targets=Targets(device_ids=["rot-a"])))
    old_release = _release_of(fleet, before.id)

    # Execute: rotate; every device learns the new key
    assert client.post("/api/v1/keys/rotate", headers=viewer).status_code == 403
    response = client.post("/api/v1/keys/rotate", headers=admin)
    assert response.status_code == 201, response.text
    rotation = response.json()["rotation"]
    new_key_id = rotation["new_key_id"]
    assert (rotation["number"], rotation["old_key_id"], rotation["status"]) == (1, old_key_id, "in_progress")
    assert client.post("/api/v1/keys/rotate", headers=admin).status_code == 409  # one rotation at a time
    wait_for(lambda: _status(client, viewer)["rotation"]["acknowledged"] == 3, what="every device trusts the key")

    # Assert: still signing with the old key, which devices still accept
    assert fleet.signer.key_id == old_key_id
    during = fleet.deployments.create(DeploymentCreate(model_version="m1", targets=Targets(device_ids=["rot-b"])))
    assert msgspec.json.decode(_release_of(fleet, during.id))["key_id"] == old_key_id
    for device in devices.values():
        assert sorted(device.store.trusted().keys) == sorted([old_key_id, new_key_id])
        verify(_release_of(fleet, during.id), device.store.trusted())

    content = msgspec.json.decode(_release_of(fleet, during.id))["release"]

    # Execute: complete; every device retires the old key
    response = client.post("/api/v1/keys/rotate/complete", headers=admin, json={})
    assert response.status_code == 200, response.text
    assert response.json()["active_key_id"] == new_key_id
    wait_for(lambda: _status(client, viewer)["rotation"]["retired"] == 3, what="every device retired the old key")

    # Assert: a new deployment is signed by the new key and every device accepts it
    status = _status(client, viewer)
    assert status["rotation"]["status"] == "complete" and status["rotation"]["pending"] == []
    assert {k["key_id"]: k["state"] for k in status["keys"]} == {old_key_id: "retired", new_key_id: "active"}
    assert client.get("/api/v1/signing-key", headers=viewer).json()["key_id"] == new_key_id
    after = fleet.deployments.create(DeploymentCreate(model_version="m1", targets=Targets(device_ids=["rot-c"])))
    new_release = _release_of(fleet, after.id)
    assert msgspec.json.decode(new_release)["key_id"] == new_key_id
    for device in devices.values():
        assert verify(new_release, device.store.trusted()).deployment_id == after.id
        assert device.acks[-1].result["trusted_key_ids"] == [new_key_id]
    # ... what was stored is re-signed with the new key, content unchanged: manifests, active releases
    new_public = fleet.signer.public_key_raw
    for variant in ("fp32", "full-int8"):
        manifest = fleet.models.signed_manifest("m1", variant)
        assert manifest.key_id == new_key_id
        verify_signature(manifest, new_public)
    resigned = msgspec.json.decode(_release_of(fleet, during.id))
    assert resigned["key_id"] == new_key_id
    assert resigned["release"] == content
    verify(_release_of(fleet, during.id), devices["rot-b"].store.trusted())

    # Assert: a release signed by the retired key is refused, the reason naming the key
    for release_json in (old_release, _forge_release_with_old_key(fleet, msgspec.json.decode(new_release))):
        with pytest.raises(ManifestError, match=f"signed by retired key {old_key_id}"):
            verify(release_json, devices["rot-a"].store.trusted())
    # ... also after the device restarts: its trust store is on disk, the enrolment key stays retired
    restarted = trust_store_for(devices["rot-a"].data_dir, devices["rot-a"].signing_key)
    assert list(restarted.trusted().keys) == [new_key_id]


def _forge_release_with_old_key(fleet: Fleet, signed: dict[str, Any]) -> bytes:
    """The new release signed by the retired key (the attacker who kept a copy of it)."""
    pem = (fleet.signer.key_dir / PRIVATE_KEY_FILE).read_bytes()
    old = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(old, Ed25519PrivateKey)
    release = msgspec.convert(signed["release"], Release)
    public = old.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    forged = SignedRelease(release=release, signature=base64.b64encode(old.sign(release_bytes(release))).decode(),
                           key_id=key_id(public))
    return msgspec.json.encode(forged)


@pytest.mark.slow  # the control plane's sweep (every 2 s) re-sends to the device coming back
def test_completion_waits_for_every_device_and_an_absent_one_catches_up(
        fleet: Fleet, devices: dict[str, Device], api: tuple[TestClient[Any], dict[str, str], dict[str, str]],
        mosquitto_url: str, tmp_path: Path) -> None:
    # Prepare: rot-a and rot-b online; rot-c has never connected (no broker session: nothing waits for it)
    client, admin, viewer = api
    devices["rot-a"].connect()
    devices["rot-b"].connect()

    # Execute
    new_key_id = client.post("/api/v1/keys/rotate", headers=admin).json()["rotation"]["new_key_id"]
    wait_for(lambda: _status(client, viewer)["rotation"]["acknowledged"] == 2, what="online devices trust it")
    # ... a device enrolled during the rotation (with the key that signs now) gets it too
    fleet.devices.enroll(DeviceCreate(device_id="rot-late", profile=PROFILE))
    late = Device(mosquitto_url, "rot-late", tmp_path / "rot-late", fleet.signer.public_key_raw)
    late.connect()
    try:
        wait_for(lambda: _status(client, viewer)["rotation"]["acknowledged"] == 3, what="the late device")
        refused = client.post("/api/v1/keys/rotate/complete", headers=admin, json={"force": False})

        # Assert: refused, naming the device that has not acknowledged; status lists it with why
        assert refused.status_code == 409, refused.text
        assert "1 device(s) have not acknowledged" in refused.json()["detail"]
        assert "rot-c" in refused.json()["detail"]
        pending = _status(client, viewer)["rotation"]["pending"]
        assert [p["device_id"] for p in pending] == ["rot-c"]
        assert pending[0]["step"] == "trust" and pending[0]["online"] is False
        assert fleet.signer.key_id != new_key_id  # nothing switched

        # Execute: rot-c comes online (fresh session): the control plane sends the key again
        devices["rot-c"].connect()
        wait_for(lambda: _status(client, viewer)["rotation"]["acknowledged"] == 4, what="rot-c catches up")
        assert new_key_id in devices["rot-c"].store.trusted().keys
        response = client.post("/api/v1/keys/rotate/complete", headers=admin)
        assert response.status_code == 200, response.text
        wait_for(lambda: _status(client, viewer)["rotation"]["retired"] == 4, what="all retired the old key")
    finally:
        late.disconnect()


@pytest.mark.slow  # the control plane's sweep (every 2 s) re-sends to the device coming back
def test_forced_completion_reaches_a_device_that_was_away_in_order(
        fleet: Fleet, devices: dict[str, Device], api: tuple[TestClient[Any], dict[str, str], dict[str, str]]) -> None:
    # Prepare: rot-a and rot-c online, rot-b away for the whole rotation
    client, admin, viewer = api
    devices["rot-a"].connect()
    devices["rot-c"].connect()
    old_key_id = fleet.signer.key_id
    client.post("/api/v1/keys/rotate", headers=admin)
    wait_for(lambda: _status(client, viewer)["rotation"]["acknowledged"] == 2, what="online devices trust it")

    # Execute: completed by force; rot-b comes back afterwards
    response = client.post("/api/v1/keys/rotate/complete", headers=admin, json={"force": True})
    assert response.status_code == 200, response.text
    new_key_id = response.json()["active_key_id"]
    devices["rot-b"].connect()
    wait_for(lambda: _status(client, viewer)["rotation"]["retired"] == 3, what="rot-b learns, then retires")

    # Assert: it got the key first, then the retirement (which it could not have accepted before)
    kinds = [(a.ok, a.result.get("trusted_key_ids")) for a in devices["rot-b"].acks]
    assert kinds == [(True, sorted([old_key_id, new_key_id])), (True, [new_key_id])]


@pytest.mark.slow
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_real_agents_active_model_survives_the_retirement_of_its_signing_key_and_a_restart(
        fleet: Fleet, tmp_path: Path) -> None:
    # Prepare: a served control plane; a real agent installs a release signed by the first key
    from controlplane.demo import AppServer
    from controlplane.keys import KeyService
    from tests._services import free_port
    from tests.controlplane.test_rollout_e2e import start_agent, stop

    register_starter(fleet, "m1", {"fp32": 0.975, "full-int8": 0.975}, real_golden=True)
    creds = fleet.devices.enroll(DeviceCreate(device_id="pi5-keys", profile=PROFILE))
    data_dir = tmp_path / "pi5"
    old_key_id = fleet.signer.key_id
    port = free_port()
    with AppServer(create_app(fleet=fleet), port):
        url = f"http://127.0.0.1:{port}"
        agent = start_agent(creds, url, data_dir)
        try:
            wait_for(lambda: fleet.devices.get("pi5-keys").online, what="the agent online")
            fleet.deployments.create(DeploymentCreate(model_version="m1", targets=Targets(all=True)))
            wait_for(lambda: (fleet.devices.get("pi5-keys").reported_state or {}).get("active_model") == "m1",
                     timeout=90, what="the agent reports m1")
        finally:
            stop(agent)

        # Execute: the rotation, its statements applied to the agent's own data dir by the agent's handler (as
        # the running agent does once agent._daemon dispatches the two kinds), completed: the key that signed
        # the installed release is retired on the device
        keys = KeyService(fleet.engine, fleet.signer, fleet.publisher)
        keys.rotate()
        keys.complete(force=True)
        rotation = fleet.signer.current_rotation()
        assert rotation is not None and rotation.retirement is not None
        device = Device("mqtt://127.0.0.1:1", "pi5-keys", data_dir, base64.b64decode(creds.signing_public_key))
        for kind, statement in ((wire.CommandKind.TRUST_SIGNING_KEY, rotation.transition),
                                (wire.CommandKind.RETIRE_SIGNING_KEY, rotation.retirement)):
            ok, reason, _ = apply_key_command(device.store, wire.Command(
                command_id=uuid.uuid4().hex, kind=kind,
                args={"rotation": 1, "statement": msgspec.to_builtins(statement)}))
            assert ok, reason
        assert list(device.store.trusted().retired) == [old_key_id]
        installed = data_dir / "models" / "m1-full-int8" / "manifest.json"
        with pytest.raises(ManifestError, match=f"retired key {old_key_id}"):
            verify(installed.read_bytes(), device.store.trusted())

        # ... and the agent restarts (still configured with the retired key, as its enrolment left it)
        agent = start_agent(creds, url, data_dir)
        try:
            # Assert: it runs the model it verified at install time (start-up checks the recorded sha256)
            wait_for(lambda: fleet.devices.get("pi5-keys").online, what="the agent back online")
            wait_for(lambda: ((fleet.devices.get("pi5-keys").last_telemetry or {}).get("inference") or {})
                     .get("model_version") == "m1", what="inference telemetry from m1")
            assert (fleet.devices.get("pi5-keys").reported_state or {}).get("active_model") == "m1"
        finally:
            stop(agent)
    assert list(device.store.trusted().keys) == [rotation.new_key_id]  # the restart did not re-trust the old key


@pytest.mark.slow
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_real_agent_learns_the_new_key_and_installs_a_release_signed_by_it(fleet: Fleet, tmp_path: Path) -> None:
    # Prepare: a served control plane and a real agent enrolled with the first key
    import httpx

    from controlplane.demo import AppServer
    from tests._services import free_port
    from tests.controlplane.test_rollout_e2e import start_agent, stop

    register_starter(fleet, "m1", {"fp32": 0.975, "full-int8": 0.975}, real_golden=True)
    creds = fleet.devices.enroll(DeviceCreate(device_id="pi5-rot", profile=PROFILE))
    _, admin = create_token(fleet.engine, Role.ADMIN)
    port = free_port()
    with AppServer(create_app(fleet=fleet), port):
        url = f"http://127.0.0.1:{port}"
        client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin}"}, timeout=30)
        agent = start_agent(creds, url, tmp_path / "pi5")
        try:
            wait_for(lambda: fleet.devices.get("pi5-rot").online, what="the agent online")

            # Execute: rotate, the agent acknowledges; complete, the agent retires the old key
            assert client.post("/api/v1/keys/rotate").status_code == 201
            wait_for(lambda: client.get("/api/v1/keys").json()["rotation"]["acknowledged"] == 1
                     or client.get("/api/v1/keys").json()["rotation"]["pending"][0]["status"] == "error",
                     what="the agent's answer")
            pending = client.get("/api/v1/keys").json()["rotation"]["pending"]
            assert pending == [], pending
            assert client.post("/api/v1/keys/rotate/complete").status_code == 200
            wait_for(lambda: client.get("/api/v1/keys").json()["rotation"]["retired"] == 1, what="retired")
            created = fleet.deployments.create(DeploymentCreate(model_version="m1", targets=Targets(all=True)))
            wait_for(lambda: fleet.deployments.get(created.id).status != "running", timeout=90,
                     what="the rollout to end")

            # Assert: the release, signed by the new key, is installed
            result = fleet.deployments.get(created.id)
            assert result.status == "succeeded", result
            assert msgspec.json.decode(_release_of(fleet, created.id))["key_id"] == fleet.signer.key_id
            assert (fleet.devices.get("pi5-rot").reported_state or {}).get("active_model") == "m1"
        finally:
            stop(agent)
            client.close()


@pytest.mark.slow
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_cli_rotates_shows_who_is_missing_and_completes_only_when_told(
        fleet: Fleet, devices: dict[str, Device]) -> None:
    # Prepare: a served control plane; rot-a online, rot-b and rot-c never connected
    from typer.testing import CliRunner

    from controlplane.cli.keys import app as keys_cli
    from controlplane.demo import AppServer
    from tests._services import free_port

    runner = CliRunner()
    _, admin = create_token(fleet.engine, Role.ADMIN)
    devices["rot-a"].connect()
    port = free_port()
    with AppServer(create_app(fleet=fleet), port):
        common = ["--url", f"http://127.0.0.1:{port}", "--token", admin]
        # Execute
        rotated = runner.invoke(keys_cli, ["rotate", *common])
        wait_for(lambda: "acknowledged the new key: 1" in runner.invoke(keys_cli, ["status", *common]).stdout,
                 what="rot-a acknowledges")
        status = runner.invoke(keys_cli, ["status", *common])
        refused = runner.invoke(keys_cli, ["rotate", "--complete", *common])
        forced = runner.invoke(keys_cli, ["rotate", "--complete", "--force", "--json", *common])
    # Assert
    assert rotated.exit_code == 0, rotated.output
    assert "rotation 1: in_progress" in rotated.stdout
    assert status.exit_code == 0, status.output
    # (the served control plane logs to the same stdout: read the table's rows only)
    table = status.stdout[status.stdout.index("DEVICE"):].splitlines()[1:]
    assert [row.split()[:3] for row in table if row.startswith("rot-")] == [["rot-b", "no", "trust"],
                                                                           ["rot-c", "no", "trust"]]
    assert refused.exit_code == 1
    assert "2 device(s) have not acknowledged" in refused.output and "rot-b, rot-c" in refused.output
    assert forced.exit_code == 0, forced.output
    printed = forced.stdout[forced.stdout.index("{\n"):]
    assert msgspec.json.decode(printed[:printed.index("\n}") + 2])["rotation"]["status"] == "complete"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_device_enrolled_after_a_completed_rotation_is_given_the_new_key(fleet: Fleet) -> None:
    # Prepare: a fleet whose key was rotated (no devices to wait for)
    old = fleet.signer.public_key_b64
    fleet.signer.begin_rotation()
    fleet.signer.complete_rotation()
    # Execute: enrol after completion, in the same running control plane
    enrolled = fleet.devices.enroll(DeviceCreate(device_id="late-1", profile="raspberry-pi-5"))
    # Assert: the key devices are handed is the one that signs now, not the retired one
    assert enrolled.signing_public_key == fleet.signer.public_key_b64 != old
