"""Ingest through a real broker into a real database: dedupe, dead letters, ack after commit."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest

from agent import protocol as wire
from agent.mqtt import MqttProtocol, make_client, parse_broker_url
from controlplane.devices.schemas import DeviceCreate
from controlplane.ingest import read_stats
from controlplane.wiring import Fleet
from tests._services import fleet_settings, fx_fleet, wait_for  # noqa: F401 - fx_fleet

pytestmark = pytest.mark.integration


def telemetry(device_id: str, seq: int) -> bytes:
    return wire.encode(wire.Telemetry(
        device_id=device_id, seq=seq, ts=time.time(),
        system=wire.SystemStats(cpu_percent=1.0, mem_used_mb=10.0, mem_total_mb=100.0, disk_used_percent=5.0),
        power=wire.PowerStats(source="simulated", power_source="battery", battery_percent=80.0, charging=True),
        network=wire.NetworkStats(source="simulated", metered=False),
    ))




@pytest.fixture(name="publisher")
def fx_publisher(mosquitto_url: str) -> Iterator[mqtt.Client]:
    client = make_client(parse_broker_url(mosquitto_url), f"test-{uuid.uuid4().hex[:6]}", protocol=MqttProtocol.V5)
    client.connect("127.0.0.1", parse_broker_url(mosquitto_url).port)
    client.loop_start()
    yield client
    client.disconnect()
    client.loop_stop()


def enroll(fleet: Fleet, profile: str = "raspberry-pi-5") -> str:
    device_id = f"dev-{uuid.uuid4().hex[:8]}"
    fleet.devices.enroll(DeviceCreate(device_id=device_id, profile=profile))
    return device_id


def publish(client: mqtt.Client, topic: str, payload: bytes) -> None:
    info = client.publish(topic, payload, qos=1)
    info.wait_for_publish(10)


def test_telemetry_stored_once_per_seq(fleet: Fleet, publisher: mqtt.Client) -> None:
    # Prepare
    device_id = enroll(fleet)
    topic = wire.topic(device_id, wire.Channel.TELEMETRY)
    # Execute: seq 1..20, then 5 and 7 again (a device re-sending after a lost PUBACK)
    for seq in [*range(1, 21), 5, 7]:
        publish(publisher, topic, telemetry(device_id, seq))
    wait_for(lambda: read_stats(fleet.engine)["received"] >= 22, what="22 messages ingested")
    # Assert
    records = fleet.devices.telemetry(device_id, since=None, until=None, limit=1000)
    assert [r.seq for r in records] == list(range(1, 21))
    stats = read_stats(fleet.engine)
    assert stats["stored"] == 20
    assert stats["duplicates"] == 2
    assert fleet.devices.get(device_id).last_seq == 20


def test_malformed_counted_and_worker_survives(fleet: Fleet, publisher: mqtt.Client) -> None:
    # Prepare
    device_id = enroll(fleet)
    other = enroll(fleet)
    topic = wire.topic(device_id, wire.Channel.TELEMETRY)
    # Execute
    publish(publisher, topic, b"{not json")
    publish(publisher, topic, b'{"device_id": "%s", "seq": "one"}' % device_id.encode())
    publish(publisher, topic, b"x" * (wire.MAX_PAYLOAD_BYTES + 1))
    publish(publisher, topic, telemetry(other, 1))  # another device's id in this device's topic
    publish(publisher, wire.topic("never-enrolled", wire.Channel.TELEMETRY), telemetry("never-enrolled", 1))
    publish(publisher, topic, telemetry(device_id, 1).replace(b'"protocol_version":1', b'"protocol_version":99'))
    publish(publisher, topic, telemetry(device_id, 1))
    wait_for(lambda: read_stats(fleet.engine)["stored"] >= 1, what="the valid message stored")
    # Assert
    stats = read_stats(fleet.engine)
    assert stats["dead_letters"] == {"malformed": 1, "invalid": 1, "oversized": 1, "device_mismatch": 1, "unknown_device": 1,
                                     "unsupported_version": 1}
    assert stats["stored"] == 1
    assert all(w.alive for w in fleet.workers)


def test_state_sets_presence(fleet: Fleet, publisher: mqtt.Client) -> None:
    # Prepare
    device_id = enroll(fleet)
    state = wire.State(device_id=device_id, online=True, ts=time.time(), profile="raspberry-pi-5",
                       agent_version="9.9", runtime="ai-edge-litert", active_model="m1")
    # Execute
    publish(publisher, wire.topic(device_id, wire.Channel.STATE), wire.encode(state))
    wait_for(lambda: fleet.devices.get(device_id).online, what="device online")
    offline = wire.State(device_id=device_id, online=False, ts=time.time())
    publish(publisher, wire.topic(device_id, wire.Channel.STATE), wire.encode(offline))
    wait_for(lambda: not fleet.devices.get(device_id).online, what="device offline")
    # Assert
    device = fleet.devices.get(device_id)
    assert device.agent_version is None or device.agent_version == "9.9"
    assert fleet.devices.find(online=False, profile="raspberry-pi-5")


@pytest.fixture(name="two_worker_fleet")
def fx_two_worker_fleet(mosquitto_url: str, tmp_path) -> Iterator[Fleet]:  # type: ignore[no-untyped-def]
    settings = fleet_settings(mosquitto_url, tmp_path / "cp", ingest_workers=2)
    fleet = Fleet(settings).start()
    yield fleet
    fleet.stop()


def test_two_workers_share_the_subscription(two_worker_fleet: Fleet, publisher: mqtt.Client) -> None:
    # Prepare
    fleet = two_worker_fleet
    devices = [enroll(fleet) for _ in range(4)]
    # Execute
    infos = [publisher.publish(wire.topic(d, wire.Channel.TELEMETRY), telemetry(d, seq), qos=1)
             for seq in range(1, 51) for d in devices]
    for info in infos:
        info.wait_for_publish(10)
    wait_for(lambda: read_stats(fleet.engine)["received"] >= 200, what="200 messages ingested")
    # Assert: every message handled exactly once, by one of the two workers
    stats = read_stats(fleet.engine)
    assert (stats["stored"], stats["duplicates"]) == (200, 0)
    assert all(w.processed > 0 for w in fleet.workers)
    assert sum(w.processed for w in fleet.workers) >= 200


def test_telemetry_window_query(fleet: Fleet, publisher: mqtt.Client) -> None:
    from litestar.testing import TestClient

    from controlplane.app import create_app
    from controlplane.auth import Role, create_token

    # Prepare: records at device times 1000..1009
    device_id = enroll(fleet)
    topic = wire.topic(device_id, wire.Channel.TELEMETRY)
    for seq in range(10):
        payload = telemetry(device_id, seq + 1)
        message = wire.decode(payload, wire.Telemetry)
        message.ts = 1000.0 + seq
        publish(publisher, topic, wire.encode(message))
    wait_for(lambda: len(fleet.devices.telemetry(device_id, since=None, until=None, limit=100)) == 10)
    _, token = create_token(fleet.engine, Role.VIEWER)
    headers = {"Authorization": f"Bearer {token}"}
    url = f"/api/v1/devices/{device_id}/telemetry"
    with TestClient(app=create_app(fleet=fleet)) as client:
        # Execute
        window = client.get(url, params={"since": 1002, "until": 1005}, headers=headers).json()
        iso = client.get(url, params={"since": "1970-01-01T00:16:47Z"}, headers=headers).json()
        newest = client.get(url, params={"limit": 2}, headers=headers).json()
        bad = client.get(url, params={"since": "yesterday"}, headers=headers)
    # Assert
    assert [r["seq"] for r in window] == [3, 4, 5]
    assert [r["ts"] for r in iso] == [1007.0, 1008.0, 1009.0]
    assert [r["seq"] for r in newest] == [9, 10]
    assert set(window[0]) >= {"device_id", "seq", "ts", "payload"}
    assert bad.status_code == 400 and "since='yesterday'" in bad.json()["detail"]
