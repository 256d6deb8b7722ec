"""Enrol → agent connects with the issued credentials → telemetry, commands; ACLs hold. On both brokers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import protocol as wire
from agent.mqtt import MqttProtocol, make_client, parse_broker_url
from controlplane.devices.schemas import CommandCreate, DeviceCreate, DeviceEnrolled
from controlplane.ingest import read_stats
from controlplane.settings import BrokerAuthMode, Settings
from controlplane.wiring import Fleet
from tests._services import free_port, wait_for
from tests.controlplane.test_ingest import telemetry

pytestmark = [pytest.mark.integration, pytest.mark.slow]




@pytest.fixture(name="fleet", params=["embedded", "mosquitto-dynsec"])
def fx_fleet(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Fleet]:
    if request.param == "embedded":
        settings = Settings(data_dir=tmp_path / "cp", embedded_broker_port=free_port())
    else:
        mosquitto = request.getfixturevalue("dynsec_mosquitto")
        settings = Settings(data_dir=tmp_path / "cp", broker_url=mosquitto.url, broker_auth=BrokerAuthMode.DYNSEC,
                            instance_name=uuid.uuid4().hex[:8])
    fleet = Fleet(settings).start()
    yield fleet
    fleet.stop()


def start_agent(creds: DeviceEnrolled, data_dir: Path, password: str | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "controlplane._entry", "agent", "run", "--device-id", creds.device_id,
         "--profile", creds.profile, "--broker", creds.broker_url, "--username", creds.mqtt_username,
         "--data-dir", str(data_dir), "--telemetry-interval", "0.2", "--log-level", "warning"],
        env=dict(os.environ, EDGEFLEET_MQTT_PASSWORD=password or creds.mqtt_password),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def count(fleet: Fleet, device_id: str) -> int:
    return len(fleet.devices.telemetry(device_id, since=None, until=None, limit=100_000))


def inferences(fleet: Fleet, device_id: str) -> int:
    """Inferences the device reported in all its telemetry (each message counts those since the previous one)."""
    return sum((t.payload.get("inference") or {}).get("count", 0)
               for t in fleet.devices.telemetry(device_id, since=None, until=None, limit=100_000))


def test_enrolled_agent_reports_and_answers(fleet: Fleet, tmp_path: Path) -> None:
    # Prepare
    creds = fleet.devices.enroll(DeviceCreate(device_id="pi-e2e", profile="raspberry-pi-5", tags=["lab"]))
    agent = start_agent(creds, tmp_path / "agent")
    try:
        # Execute
        wait_for(lambda: count(fleet, "pi-e2e") >= 3, what="telemetry from the enrolled agent")
        ping = fleet.devices.send_command("pi-e2e", CommandCreate(kind="ping"))
        # Assert
        assert ping.status == "ok"
        device = fleet.devices.get("pi-e2e")
        assert device.online
        assert (device.reported_state or {})["runtime"] in ("ai-edge-litert", "tflite-runtime")
        # The agent runs its model and says so: inferences counted in its telemetry.
        wait_for(lambda: inferences(fleet, "pi-e2e") > 0, what="inferences reported by the enrolled agent")
    finally:
        stop(agent)


def test_wrong_password_never_connects(fleet: Fleet, tmp_path: Path) -> None:
    # Prepare: a control agent with its right password starts at the same moment, so the window in which the
    # wrong one reports nothing is one in which an agent demonstrably could connect and report.
    creds = fleet.devices.enroll(DeviceCreate(device_id="pi-wrong", profile="raspberry-pi-5"))
    control = fleet.devices.enroll(DeviceCreate(device_id="pi-control", profile="raspberry-pi-5"))
    agent = start_agent(creds, tmp_path / "agent", password="not-the-password")
    witness = start_agent(control, tmp_path / "control")
    try:
        # Execute
        wait_for(lambda: count(fleet, "pi-control") >= 3, what="telemetry from the control agent")
        # Assert
        assert fleet.devices.get("pi-control").online
        assert count(fleet, "pi-wrong") == 0
        assert not fleet.devices.get("pi-wrong").online
        assert agent.poll() is None  # still trying, not gone: the window covered its attempts
    finally:
        stop(agent)
        stop(witness)


def test_device_cannot_write_another_devices_topics(fleet: Fleet) -> None:
    # Prepare: two enrolled devices; "mallory" connects with its own valid credentials
    fleet.devices.enroll(DeviceCreate(device_id="victim", profile="raspberry-pi-5"))
    mallory = fleet.devices.enroll(DeviceCreate(device_id="mallory", profile="raspberry-pi-5"))
    address = parse_broker_url(mallory.broker_url).with_credentials("mallory", mallory.mqtt_password)
    protocol = MqttProtocol.V311 if address.protocol is MqttProtocol.V311 else MqttProtocol.V5
    client = make_client(address, "mallory", protocol=protocol)
    client.connect(address.host, address.port)
    client.loop_start()
    try:
        # Execute: forge telemetry for the victim, then publish own telemetry as a marker
        before = read_stats(fleet.engine)["received"]
        client.publish(wire.topic("victim", wire.Channel.TELEMETRY), telemetry("victim", 1), qos=1).wait_for_publish(5)
        client.publish(wire.topic("mallory", wire.Channel.TELEMETRY), telemetry("mallory", 1), qos=1).wait_for_publish(5)
        wait_for(lambda: count(fleet, "mallory") == 1, what="mallory's own telemetry")
        # Assert: the forged message never reached the control plane
        assert count(fleet, "victim") == 0
        assert read_stats(fleet.engine)["received"] == before + 1
    finally:
        client.disconnect()
        client.loop_stop()


def test_deleted_device_loses_broker_access(fleet: Fleet, tmp_path: Path) -> None:
    # Prepare
    creds = fleet.devices.enroll(DeviceCreate(device_id="pi-gone", profile="raspberry-pi-5"))
    fleet.devices.delete("pi-gone")
    # Execute: re-enrol under the same id: the old password must not work any more
    renewed = fleet.devices.enroll(DeviceCreate(device_id="pi-gone", profile="raspberry-pi-5"))
    control = fleet.devices.enroll(DeviceCreate(device_id="pi-control", profile="raspberry-pi-5"))
    agent = start_agent(creds, tmp_path / "agent")
    witness = start_agent(control, tmp_path / "control")  # proves the window was long enough to report in
    try:
        wait_for(lambda: count(fleet, "pi-control") >= 3, what="telemetry from the control agent")
        # Assert
        assert count(fleet, "pi-gone") == 0
        assert agent.poll() is None
    finally:
        stop(agent)
        stop(witness)
    # The same device id with its new credentials does get through: it was the old password that was refused.
    agent = start_agent(renewed, tmp_path / "agent-renewed")
    try:
        wait_for(lambda: count(fleet, "pi-gone") >= 1, what="telemetry with the renewed credentials")
    finally:
        stop(agent)


@pytest.mark.parametrize("fleet", ["embedded"], indirect=True)  # only the embedded broker is MQTT 3.1.1-only
def test_agent_falls_back_to_mqtt_311_by_itself(fleet: Fleet, tmp_path: Path) -> None:
    assert fleet.embedded is not None
    # Prepare: the URL without ?protocol=3.1.1, as an operator might type it
    creds = fleet.devices.enroll(DeviceCreate(device_id="pi-auto", profile="raspberry-pi-5"))
    bare = DeviceEnrolled(**{**{f: getattr(creds, f) for f in creds.__struct_fields__},
                             "broker_url": creds.broker_url.split("?")[0]})
    agent = start_agent(bare, tmp_path / "agent")
    try:
        # Execute / Assert
        wait_for(lambda: count(fleet, "pi-auto") >= 1, what="telemetry after falling back to 3.1.1")
    finally:
        stop(agent)


def test_credentials_in_command_args_reach_the_device_but_are_never_stored(fleet: Fleet) -> None:
    # Prepare: the device's own MQTT session, subscribed to its commands
    creds = fleet.devices.enroll(DeviceCreate(device_id="pi-cmd", profile="raspberry-pi-5"))
    address = parse_broker_url(creds.broker_url).with_credentials("pi-cmd", creds.mqtt_password)
    protocol = MqttProtocol.V311 if address.protocol is MqttProtocol.V311 else MqttProtocol.V5
    client = make_client(address, "pi-cmd", protocol=protocol)
    received: list[bytes] = []
    client.on_message = lambda _c, _u, msg: received.append(msg.payload)
    client.on_connect = lambda c, *_: c.subscribe(wire.topic("pi-cmd", wire.Channel.CMD), qos=1)
    client.connect(address.host, address.port)
    client.loop_start()
    try:
        wait_for(lambda: fleet.devices.get("pi-cmd") is not None and client.is_connected(), what="device connected")
        time.sleep(0.5)  # the subscription is in place
        # Execute: an operator hands the device a download credential in the args
        sent = fleet.devices.send_command("pi-cmd", CommandCreate(
            kind="deploy_model", args={"manifest_url": "http://cp/x", "bearer": "s3cret-token",
                                       "nested": {"api_token": "s3cret-2"}}, wait_s=0))
        wait_for(lambda: received, what="the command at the device")
        shown = fleet.devices.get_command("pi-cmd", sent.command_id)
        with fleet.engine.connect() as conn:
            stored = conn.exec_driver_sql("SELECT args FROM command").scalars().all()
    finally:
        client.loop_stop()
        client.disconnect()
    # Assert
    assert b"s3cret-token" in received[0] and b"s3cret-2" in received[0]
    assert shown.args == {"manifest_url": "http://cp/x", "bearer": "[redacted]", "nested": {"api_token": "[redacted]"}}
    assert not any("s3cret" in str(row) for row in stored)
