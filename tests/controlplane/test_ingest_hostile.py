"""One device sending what the wire contract forbids, on its own topics, cannot stop ingest for the others.

A real broker (the machine's mosquitto) and a real database (SQLite and PostgreSQL): the hostile device is
enrolled and publishes on its own topics, as a device holding its own valid credentials could.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from agent import protocol as wire
from agent.mqtt import MqttProtocol, make_client, parse_broker_url
from controlplane.devices.schemas import CommandCreate, DeviceCreate
from controlplane.ingest import read_stats
from controlplane.wiring import Fleet
from tests._services import fleet_settings, fx_fleet, wait_for  # noqa: F401 - fx_fleet
from tests.controlplane.test_ingest import telemetry

pytestmark = pytest.mark.integration


def deep(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


# (channel, payload template): {id} is the hostile device's id, {cmd} a command id pending for it.
HOSTILE: dict[str, tuple[wire.Channel, bytes]] = {
    "seq_2_63": (wire.Channel.TELEMETRY, telemetry("{id}", 1).replace(b'"seq":1', b'"seq":9223372036854775808')),
    "seq_2_70": (wire.Channel.TELEMETRY, telemetry("{id}", 1).replace(b'"seq":1', b'"seq":%d' % 2**70)),
    "bytes_sent_2_64": (wire.Channel.TELEMETRY,
                        telemetry("{id}", 7).replace(b'"metered":false', b'"metered":false,"bytes_sent":%d' % 2**64)),
    "invalid_utf8": (wire.Channel.TELEMETRY, telemetry("{id}", 2).replace(b'"battery"', b'"\xff\xfe"')),
    "nul_in_string": (wire.Channel.TELEMETRY, telemetry("{id}", 3).replace(b'"battery"', b'"bat\\u0000tery"')),
    "state_deep_config": (wire.Channel.STATE,
                          b'{"device_id":"{id}","online":true,"ts":1.0,"config":' + deep(5000) + b"}"),
    "state_nul_agent_version": (wire.Channel.STATE,
                                b'{"device_id":"{id}","online":true,"ts":1.0,"agent_version":"1\\u0000"}'),
    "ack_deep_result": (wire.Channel.ACK, b'{"device_id":"{id}","command_id":"{cmd}","ok":true,"result":'
                        + deep(5000) + b"}"),
    "ack_nul_reason": (wire.Channel.ACK, b'{"device_id":"{id}","command_id":"{cmd}","ok":false,"reason":"x\\u0000"}'),
    "ack_huge_int_result": (wire.Channel.ACK, b'{"device_id":"{id}","command_id":"{cmd}","ok":true,'
                            b'"result":{"n":%d}}' % 2**200),
}


@pytest.fixture(name="publisher")
def fx_publisher(mosquitto_url: str) -> Iterator[mqtt.Client]:
    address = parse_broker_url(mosquitto_url)
    client = make_client(address, f"test-{uuid.uuid4().hex[:6]}", protocol=MqttProtocol.V5)
    client.connect(address.host, address.port)
    client.loop_start()
    yield client
    client.disconnect()
    client.loop_stop()


def enroll(fleet: Fleet) -> str:
    device_id = f"dev-{uuid.uuid4().hex[:8]}"
    fleet.devices.enroll(DeviceCreate(device_id=device_id, profile="raspberry-pi-5"))
    return device_id


def publish(client: mqtt.Client, topic: str, payload: bytes) -> None:
    client.publish(topic, payload, qos=1).wait_for_publish(10)


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_record_does_not_stop_honest_device(fleet: Fleet, publisher: mqtt.Client, case: str) -> None:
    # Prepare: an honest device with one record stored, a hostile one with a command pending
    honest, hostile = enroll(fleet), enroll(fleet)
    honest_cmd = fleet.devices.send_command(honest, CommandCreate(kind="ping", wait_s=0)).command_id
    hostile_cmd = fleet.devices.send_command(hostile, CommandCreate(kind="ping", wait_s=0)).command_id
    publish(publisher, wire.topic(honest, wire.Channel.TELEMETRY), telemetry(honest, 1))
    wait_for(lambda: read_stats(fleet.engine)["stored"] == 1, what="the first honest record stored")
    channel, template = HOSTILE[case]
    payload = template.replace(b"{id}", hostile.encode()).replace(b"{cmd}", hostile_cmd.encode())
    # Execute: the hostile message, then the honest device goes on (telemetry, state, ack)
    publish(publisher, wire.topic(hostile, channel), payload)
    for seq in range(2, 6):
        publish(publisher, wire.topic(honest, wire.Channel.TELEMETRY), telemetry(honest, seq))
    publish(publisher, wire.topic(honest, wire.Channel.STATE),
            wire.encode(wire.State(device_id=honest, online=True, ts=time.time(), agent_version="1.0")))
    publish(publisher, wire.topic(honest, wire.Channel.ACK),
            wire.encode(wire.Ack(device_id=honest, command_id=honest_cmd, ok=True, result={"pong": 1.0})))
    # Assert: everything the honest device sent is stored; the hostile message is a dead letter
    wait_for(lambda: read_stats(fleet.engine)["received"] >= 8, timeout=15, what="all 8 messages ingested")
    assert [r.seq for r in fleet.devices.telemetry(honest, since=None, until=None, limit=100)] == [1, 2, 3, 4, 5]
    assert fleet.devices.get(honest).online
    assert fleet.devices.get(honest).agent_version == "1.0"
    assert fleet.devices.get_command(honest, honest_cmd).status == "ok"
    assert fleet.devices.telemetry(hostile, since=None, until=None, limit=100) == []
    assert fleet.devices.get_command(hostile, hostile_cmd).status == "pending"
    stats = read_stats(fleet.engine)
    assert sum(stats["dead_letters"].values()) == 1, stats  # type: ignore[attr-defined]
    assert all(w.alive for w in fleet.workers)


@pytest.mark.slow
def test_worker_failure_is_restarted_and_visible(fleet: Fleet, publisher: mqtt.Client) -> None:
    """A real fault under the worker (its counters table vanishes, as after a broken manual migration): PostgreSQL
    refuses the statement (an error that is not the database being away: the loop restarts), SQLite reports it as
    operational (the batch is retried). Either way /healthz says ingest is down and why; once the table is back
    nothing is lost."""
    from litestar.testing import TestClient

    from controlplane.app import create_app
    from controlplane.auth import Role, create_token

    # Prepare
    honest = enroll(fleet)
    topic = wire.topic(honest, wire.Channel.TELEMETRY)
    publish(publisher, topic, telemetry(honest, 1))
    wait_for(lambda: read_stats(fleet.engine)["stored"] == 1, what="the first record stored")
    _, token = create_token(fleet.engine, Role.VIEWER)
    postgres = fleet.engine.dialect.name == "postgresql"
    with TestClient(app=create_app(fleet=fleet)) as client:
        assert client.get("/healthz").json()["ingest"] == {"ok": True, "workers": 1}
        # Execute: the fault, then the device goes on publishing
        with fleet.engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE ingest_counter RENAME TO ingest_counter_away")
        for seq in (2, 3):
            publish(publisher, topic, telemetry(honest, seq))
        wait_for(lambda: client.get("/healthz").status_code == 503, timeout=30, what="/healthz degraded")
        down = client.get("/healthz").json()
        worker = fleet.workers[0].status()
        with fleet.engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE ingest_counter_away RENAME TO ingest_counter")
        wait_for(lambda: read_stats(fleet.engine)["stored"] == 3, timeout=30, what="the held records stored")
        wait_for(lambda: client.get("/healthz").status_code == 200, timeout=15, what="/healthz ok again")
        stats = client.get("/api/v1/ingest/stats", headers={"Authorization": f"Bearer {token}"}).json()
    # Assert: visible while down, restarted (PostgreSQL) or retried (SQLite), nothing lost or doubled
    assert down["status"] == "degraded" and down["ingest"]["ok"] is False
    assert fleet.workers[0].name in down["ingest"]["reason"] and "ingest_counter" in down["ingest"]["reason"]
    assert worker["alive"] is True
    if postgres:
        assert worker["state"] == "restarting" and worker["restarts"] >= 1
    else:
        assert worker["state"] == "db_unavailable" and worker["db_errors"] >= 1
    assert "ingest_counter" in worker["last_error"]
    assert [r.seq for r in fleet.devices.telemetry(honest, since=None, until=None, limit=10)] == [1, 2, 3]
    (after,) = stats["workers"]
    assert after["alive"] and after["connected"] and after["state"] == "running"
    assert after["restarts"] == worker["restarts"] and after["last_error"] == worker["last_error"]


POISON_DDL = {
    "postgresql": [
        "ALTER TABLE telemetry ADD CONSTRAINT poison_ts CHECK (ts <> 666)",
        "ALTER TABLE device ADD CONSTRAINT poison_version CHECK (agent_version IS NULL OR agent_version <> 'poison')",
        "ALTER TABLE command ADD CONSTRAINT poison_reason CHECK (reason IS NULL OR reason <> 'poison')",
    ],
    "sqlite": [
        "CREATE TRIGGER poison_ts BEFORE INSERT ON telemetry WHEN NEW.ts = 666 BEGIN SELECT RAISE(ABORT, 'ts'); END",
        ("CREATE TRIGGER poison_version BEFORE UPDATE ON device WHEN NEW.agent_version = 'poison' "
         "BEGIN SELECT RAISE(ABORT, 'agent_version'); END"),
        ("CREATE TRIGGER poison_reason BEFORE UPDATE ON command WHEN NEW.reason = 'poison' "
         "BEGIN SELECT RAISE(ABORT, 'reason'); END"),
    ],
}


def test_records_the_database_refuses_are_isolated(database_url: str) -> None:
    """Records inside the contract that the database still refuses (here: constraints the test adds) cost only
    themselves: the batch is stored again record by record and each refused one is a `db_rejected` dead letter."""
    from sqlmodel import Session

    from controlplane.db import CommandRecord, Device, create_db_engine, migrate, utcnow
    from controlplane.ingest import Message, process_batch
    from controlplane.ingest.worker import _KnownDevices

    # Prepare: two devices with a pending command each; the database refuses some values
    engine = create_db_engine(database_url)
    migrate(engine)
    with Session(engine) as session:
        for device_id in ("honest", "hostile"):
            session.add(Device(device_id=device_id, profile="p", created_at=utcnow()))
            session.add(CommandRecord(command_id=f"cmd-{device_id}", device_id=device_id, kind="ping", args={},
                                      created_at=utcnow()))
        session.commit()
    with engine.begin() as conn:
        for ddl in POISON_DDL[engine.dialect.name]:
            conn.exec_driver_sql(ddl)
    poison = wire.decode(telemetry("hostile", 1), wire.Telemetry)
    poison.ts = 666.0

    def msg(device_id: str, channel: wire.Channel, payload: bytes) -> Message:
        return Message(wire.topic(device_id, channel), payload, 0, 1)

    batch = [
        msg("honest", wire.Channel.TELEMETRY, telemetry("honest", 1)),
        msg("hostile", wire.Channel.TELEMETRY, wire.encode(poison)),
        msg("honest", wire.Channel.TELEMETRY, telemetry("honest", 2)),
        msg("hostile", wire.Channel.STATE, wire.encode(wire.State(device_id="hostile", online=True, ts=1.0,
                                                                  agent_version="poison"))),
        msg("honest", wire.Channel.STATE, wire.encode(wire.State(device_id="honest", online=True, ts=1.0,
                                                                 agent_version="1.0"))),
        msg("hostile", wire.Channel.ACK, wire.encode(wire.Ack(device_id="hostile", command_id="cmd-hostile",
                                                              ok=False, reason="poison"))),
        msg("honest", wire.Channel.ACK, wire.encode(wire.Ack(device_id="honest", command_id="cmd-honest", ok=True))),
        msg("honest", wire.Channel.TELEMETRY, telemetry("honest", 3)),
        msg("honest", wire.Channel.TELEMETRY, telemetry("honest", 2)),  # a re-send
    ]
    # Execute
    counts = process_batch(engine, _KnownDevices(engine), batch)
    # Assert
    assert counts == {"received": 9, "stored": 3, "duplicates": 1, "states": 1, "acks": 1,
                      "dead_letter:db_rejected": 3}
    stats = read_stats(engine)
    assert stats["stored"] == 3 and stats["dead_letters"] == {"db_rejected": 3}
    with Session(engine) as session:
        honest, hostile = session.get(Device, "honest"), session.get(Device, "hostile")
        assert honest is not None and hostile is not None
        assert (honest.last_seq, honest.agent_version, honest.online) == (3, "1.0", True)
        assert (hostile.last_seq, hostile.agent_version, hostile.online) == (None, None, False)
        assert session.get(CommandRecord, "cmd-honest").status == "ok"  # type: ignore[union-attr]
        assert session.get(CommandRecord, "cmd-hostile").status == "pending"  # type: ignore[union-attr]
    engine.dispose()


def test_poison_waiting_in_the_session_does_not_kill_the_restarted_worker(
    private_mosquitto: Any, database_url: str, tmp_path: Path
) -> None:
    """The crash loop of the report: a poison message the broker holds for the ingest session (here: sent while
    the control plane was down) reaches the worker as soon as it reconnects. It is a dead letter; the worker lives
    and stores what the honest device sent around it."""
    # Prepare: a control plane that subscribed once (persistent session) and stopped
    settings = fleet_settings(private_mosquitto.url, tmp_path / "cp", database_url)
    fleet = Fleet(settings).start()
    honest, hostile = enroll(fleet), enroll(fleet)
    fleet.stop()
    address = parse_broker_url(private_mosquitto.url)
    client = make_client(address, f"test-{uuid.uuid4().hex[:6]}", protocol=MqttProtocol.V5)
    client.connect(address.host, address.port)
    client.loop_start()
    poison = telemetry(hostile, 1).replace(b'"seq":1', b'"seq":9223372036854775808')
    try:
        publish(client, wire.topic(honest, wire.Channel.TELEMETRY), telemetry(honest, 1))
        publish(client, wire.topic(hostile, wire.Channel.TELEMETRY), poison)
        publish(client, wire.topic(honest, wire.Channel.TELEMETRY), telemetry(honest, 2))
        # Execute: the control plane comes back on the same session
        restarted = Fleet(settings).start()
        try:
            wait_for(lambda: read_stats(restarted.engine)["received"] >= 3, timeout=15, what="the held messages")
            publish(client, wire.topic(honest, wire.Channel.TELEMETRY), telemetry(honest, 3))
            wait_for(lambda: read_stats(restarted.engine)["stored"] >= 3, timeout=15, what="a new record stored")
            # Assert
            stats = read_stats(restarted.engine)
            assert stats["dead_letters"] == {"invalid": 1}
            assert [r.seq for r in restarted.devices.telemetry(honest, since=None, until=None, limit=10)] == [1, 2, 3]
            assert all(w.alive and w.restarts == 0 for w in restarted.workers)
        finally:
            restarted.stop()
    finally:
        client.disconnect()
        client.loop_stop()
