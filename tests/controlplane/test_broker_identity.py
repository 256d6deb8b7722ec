"""Identity is bound, seen from a running control plane (issue 8, findings 2, 3 and 6): a device cannot pass for
the control plane (its client ids are unguessable, its names cannot be enrolled), and rotating or deleting a
device's credentials ends the old credential's sessions. On the embedded broker and on mosquitto + dynsec."""

from __future__ import annotations

import os
import stat
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient

from agent import protocol as wire
from agent.mqtt import MqttProtocol, make_client, parse_broker_url
from controlplane._errors import InvalidInput
from controlplane.app import create_app
from controlplane.auth import Role, create_token
from controlplane.broker import client_id_secret
from controlplane.devices.schemas import CommandCreate, DeviceCreate, DeviceEnrolled
from controlplane.settings import BrokerAuthMode, Settings
from controlplane.wiring import Fleet
from tests._services import wait_for
from tests.controlplane.test_fleet_e2e import fx_fleet  # noqa: F401 - on both brokers
from tests.controlplane.test_ingest import telemetry

pytestmark = [pytest.mark.integration, pytest.mark.slow]




class Client:
    """A paho client with the credentials a device was issued (any client id), run in its own thread."""

    def __init__(self, creds: DeviceEnrolled, client_id: str, *, persistent: bool = False) -> None:
        self.address = parse_broker_url(creds.broker_url).with_credentials(creds.mqtt_username, creds.mqtt_password)
        self.protocol = MqttProtocol.V311 if self.address.protocol is MqttProtocol.V311 else MqttProtocol.V5
        self.persistent, self.client_id = persistent, client_id
        self.reason: Any = None
        self.messages: list[bytes] = []
        self.disconnected = threading.Event()
        self._connack = threading.Event()
        self.client = make_client(self.address, client_id, protocol=self.protocol, persistent=persistent)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *a: self.disconnected.set()
        self.client.on_message = lambda _c, _u, msg: self.messages.append(bytes(msg.payload))
        self.client.reconnect_delay_set(30, 60)  # no quick reconnect: the tests watch what the broker does

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.reason = reason
        self._connack.set()

    def connect(self) -> bool:
        """Whether the broker accepted the connection."""
        kwargs: dict[str, Any] = {}
        if self.protocol is MqttProtocol.V5:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            if self.persistent:
                props.SessionExpiryInterval = 3600
            kwargs = {"clean_start": not self.persistent, "properties": props}
        self.client.connect(self.address.host, self.address.port, keepalive=30, **kwargs)
        self.client.loop_start()
        assert self._connack.wait(10) or self.disconnected.is_set(), "no CONNACK"
        return self.reason is not None and not self.reason.is_failure

    def subscribe(self) -> bool:
        """Subscribe to the device's own commands; whether the broker granted it."""
        granted = threading.Event()
        self.client.on_subscribe = lambda _c, _u, _m, reasons, _p: granted.set() if not reasons[0].is_failure else None
        self.client.subscribe(wire.topic(self.client_id, wire.Channel.CMD), qos=1)
        return granted.wait(5)

    def got(self, command_id: str) -> bool:
        return any(command_id.encode() in m for m in list(self.messages))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def stored(fleet: Fleet, device_id: str) -> int:
    return len(fleet.devices.telemetry(device_id, since=None, until=None, limit=100_000))


def test_a_device_cannot_take_the_ingest_client_id(fleet: Fleet) -> None:
    # Prepare: mallory knows ingest's client id (the worst case; it is unguessable anyway)
    mallory = fleet.devices.enroll(DeviceCreate(device_id="mallory", profile="raspberry-pi-5"))
    honest = fleet.devices.enroll(DeviceCreate(device_id="honest", profile="raspberry-pi-5"))
    intruder = Client(mallory, fleet.workers[0].client_id)
    device = Client(honest, "honest")
    try:
        # Execute: a short clean-session connection with ingest's client id
        accepted = intruder.connect()
        intruder.close()
        assert device.connect()
        for seq in range(1, 4):
            info = device.client.publish(wire.topic("honest", wire.Channel.TELEMETRY), telemetry("honest", seq), qos=1)
            info.wait_for_publish(5)
        # Assert: refused, and ingest keeps storing
        assert not accepted, "a device connected with the control plane's client id"
        wait_for(lambda: stored(fleet, "honest") == 3, timeout=10, what="the honest device's telemetry stored")
    finally:
        intruder.close()
        device.close()


def test_the_control_planes_client_ids_are_unguessable_and_stable(tmp_path: Path, mosquitto_url: str) -> None:
    # Prepare
    shown: list[str] = []  # what health and stats show of the workers

    def names(data_dir: Path) -> list[str]:
        settings = Settings(data_dir=data_dir, broker_url=mosquitto_url, broker_auth=BrokerAuthMode.NONE,
                            instance_name="cp-host", ingest_workers=2, ingest_group=f"t-{uuid.uuid4().hex[:8]}",
                            ingest_session_expiry_s=30)
        fleet = Fleet(settings).start()
        try:
            assert fleet.publisher is not None
            shown.extend(f"{w.status()} {w.health(grace_s=0)}" for w in fleet.workers)
            return [w.client_id for w in fleet.workers] + [fleet.publisher.client_id]
        finally:
            fleet.stop()

    # Execute
    first, again, elsewhere = names(tmp_path / "a"), names(tmp_path / "a"), names(tmp_path / "b")
    # Assert: the hostname-derived ids are gone; a secret kept 0600 in the data dir makes them stable
    secret = client_id_secret(tmp_path / "a")
    assert first[:2] == [f"edgefleet-ingest-cp-host-{secret}-0", f"edgefleet-ingest-cp-host-{secret}-1"]
    assert again[:2] == first[:2], "ingest's client ids changed across a restart: its persistent sessions are lost"
    assert elsewhere[:2] != first[:2]
    assert shown and not any(secret in text for text in shown), "the client-id secret is shown in health/stats"
    assert stat.S_IMODE(os.stat(tmp_path / "a" / "broker-client-id").st_mode) == 0o600
    publisher_ids = {first[2], again[2], elsewhere[2]}
    assert len(publisher_ids) == 3 and all(len(i) >= len("edgefleet-cp-") + 24 for i in publisher_ids)


def test_a_corrupt_client_id_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "broker-client-id").write_text("edgefleet-ingest-host\n")
    with pytest.raises(Exception, match="does not hold a client id secret"):
        client_id_secret(tmp_path)


@pytest.mark.parametrize("device_id", ["edgefleet-controlplane", "edgefleet-ingest-host-0", "EdgeFleet-admin"])
def test_reserved_names_cannot_be_enrolled(fleet: Fleet, device_id: str) -> None:
    # Execute / Assert: through the service and the API
    with pytest.raises(InvalidInput, match="reserved"):
        fleet.devices.enroll(DeviceCreate(device_id=device_id, profile="raspberry-pi-5"))
    _, secret = create_token(fleet.engine, Role.ADMIN, "test-admin")
    with TestClient(app=create_app(fleet=fleet)) as client:
        response = client.post("/api/v1/devices", json={"device_id": device_id, "profile": "raspberry-pi-5"},
                               headers={"Authorization": f"Bearer {secret}"})
    assert response.status_code == 400, response.text
    assert "reserved" in response.json()["detail"]
    assert fleet.devices.count() == 0


def test_rotation_and_reenrolment_end_the_old_sessions(fleet: Fleet) -> None:
    # Prepare: the device is online (persistent session, subscribed to its commands)
    old = fleet.devices.enroll(DeviceCreate(device_id="pi-1", profile="raspberry-pi-5"))
    stale = Client(old, "pi-1", persistent=True)
    assert stale.connect() and stale.subscribe()
    ping = fleet.devices.send_command("pi-1", CommandCreate(kind="ping", wait_s=0))
    wait_for(lambda: stale.got(ping.command_id), timeout=10, what="the device receiving its command")
    # Execute: rotate; then delete, enrol the same id again and command the new device
    rotated = fleet.devices.rotate_credentials("pi-1")
    assert stale.disconnected.wait(3), "the rotated credential's connection stayed up"
    second = Client(rotated, "pi-1", persistent=True)
    assert second.connect() and second.subscribe()
    fleet.devices.delete("pi-1")
    assert second.disconnected.wait(3), "the deleted credential's connection stayed up"
    fresh = Client(fleet.devices.enroll(DeviceCreate(device_id="pi-1", profile="raspberry-pi-5")), "pi-1",
                   persistent=True)
    try:
        assert fresh.connect() and fresh.subscribe()
        deploy = fleet.devices.send_command("pi-1", CommandCreate(kind="deploy_model", args={"token": "t"}, wait_s=0))
        # Assert: the new device gets its command; the old credentials never see it and cannot come back
        wait_for(lambda: fresh.got(deploy.command_id), timeout=10, what="the re-enrolled device's command")
        assert not stale.got(deploy.command_id) and not second.got(deploy.command_id)
        assert not Client(old, "pi-1").connect()
        assert not Client(rotated, "pi-1").connect()
    finally:
        for c in (stale, second, fresh):
            c.close()


def test_ingest_keeps_its_session_across_a_restart(dynsec_mosquitto: Any, tmp_path: Path) -> None:
    # Prepare: a control plane on mosquitto; a device enrolled
    settings = Settings(data_dir=tmp_path / "cp", broker_url=dynsec_mosquitto.url, broker_auth=BrokerAuthMode.DYNSEC,
                        instance_name="cp-host")
    fleet = Fleet(settings).start()
    creds = fleet.devices.enroll(DeviceCreate(device_id="pi-1", profile="raspberry-pi-5"))
    names = [w.client_id for w in fleet.workers]
    fleet.stop()
    device = Client(creds, "pi-1")
    try:
        # Execute: the device reports while the control plane is down; the control plane comes back
        assert device.connect()
        for seq in range(1, 4):
            info = device.client.publish(wire.topic("pi-1", wire.Channel.TELEMETRY), telemetry("pi-1", seq), qos=1)
            info.wait_for_publish(5)
        fleet = Fleet(settings).start()
        try:
            # Assert: same client ids, so the broker kept what arrived meanwhile for ingest's session
            assert [w.client_id for w in fleet.workers] == names
            wait_for(lambda: stored(fleet, "pi-1") == 3, timeout=15, what="telemetry sent while the control plane was down")
        finally:
            fleet.stop()
    finally:
        device.close()
