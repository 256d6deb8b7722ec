"""Property-based: whatever one device sends on its own topics, an honest device's records are stored exactly once,
every message is accounted for (stored | duplicate | dead letter by reason | state | ack) and the worker lives.

Hypothesis generates hostile telemetry / state / ack payloads: random JSON, valid records with one field made
hostile (out-of-range integers, NaN / 1e999 / huge floats, NUL characters, over-long strings, deep nesting, wrong
types, missing fields, another device's id), random bytes and oversized payloads. They go into a real database
(SQLite and PostgreSQL), once straight through `process_batch` and once through a real broker (mosquitto) and the
ingest worker.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, select
from sqlmodel import Session

from agent import protocol as wire
from agent.mqtt import BrokerAddress, make_client, parse_broker_url
from controlplane.db import CommandRecord, Device, TelemetryRecord, utcnow
from controlplane.devices.schemas import CommandCreate, DeviceCreate
from controlplane.ingest import Message, process_batch, read_stats
from controlplane.ingest.worker import _KnownDevices
from controlplane.wiring import Fleet
from tests._services import fleet_settings, free_port, fx_engine, wait_for  # noqa: F401 - fixtures

pytestmark = pytest.mark.integration

RAW = "\u2063raw:"  # a string marker replaced by a raw JSON token after json.dumps (1e999, NaN, ...)

# -- hostile values --------------------------------------------------------------------------------------------
big_ints = st.sampled_from([2**63, 2**63 - 1, -(2**63) - 1, 2**64, -1, 10**30, 2**200]) | st.integers()
raw_numbers = st.sampled_from(["1e999", "-1e999", "NaN", "Infinity", "-Infinity", "1e308", "-0.0", "1E400"])
nul_strings = st.text(max_size=20).map(lambda s: s + "\x00" + s) | st.just("\ud800 lone surrogate")
long_strings = st.integers(100, 6000).map(lambda n: "x" * n)


def _deep(depth: int, kind: str) -> str:
    """Nested deeper than Python's json would write it: as a raw token."""
    opening, closing = ('{"a":', "}") if kind == "dict" else ("[", "]")
    return RAW + opening * depth + "1" + closing * depth


deep_values = st.builds(_deep, st.integers(2, 3000), st.sampled_from(["dict", "list"]))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)
hostile_values = st.one_of(
    big_ints, raw_numbers.map(lambda t: RAW + t), nul_strings, long_strings, deep_values, json_values,
    st.dictionaries(st.text(max_size=5), st.integers(), min_size=300, max_size=1100),  # too many entries
)


def telemetry_dict(device_id: str, seq: int) -> dict[str, Any]:
    return json.loads(wire.encode(wire.Telemetry(
        device_id=device_id, seq=seq, ts=time.time(),
        system=wire.SystemStats(cpu_percent=1.0, mem_used_mb=10.0, mem_total_mb=100.0, disk_used_percent=5.0),
        power=wire.PowerStats(source="simulated", power_source="battery", battery_percent=80.0, charging=True),
        network=wire.NetworkStats(source="simulated", metered=False, bytes_sent=1, bytes_recv=2),
        inference=wire.InferenceStats(model_version="m1", count=3, class_histogram={"cat": 2, "dog": 1}),
        outbox=wire.OutboxStats(pending=0, pending_bytes=0, dropped_total=0),
    )))


FIELDS: dict[wire.Channel, list[tuple[str, ...]]] = {
    wire.Channel.TELEMETRY: [("seq",), ("ts",), ("device_id",), ("protocol_version",), ("system", "cpu_percent"),
                             ("system", "temperature_c"), ("power", "power_source"), ("network", "bytes_sent"),
                             ("network", "kind"), ("inference", "class_histogram"), ("inference", "count"),
                             ("inference", "model_version"), ("outbox", "dropped_total"), ("extra",)],
    wire.Channel.STATE: [("config",), ("agent_version",), ("profile",), ("online",), ("ts",), ("device_id",),
                         ("runtime_version",), ("extra",)],
    wire.Channel.ACK: [("result",), ("reason",), ("command_id",), ("ok",), ("ts",), ("device_id",), ("extra",)],
}


def base(channel: wire.Channel, device_id: str, seq: int, command_id: str) -> dict[str, Any]:
    if channel is wire.Channel.TELEMETRY:
        return telemetry_dict(device_id, seq)
    if channel is wire.Channel.STATE:
        return {"device_id": device_id, "online": True, "ts": 1.0, "agent_version": "9.9", "config": {"a": 1.0}}
    return {"device_id": device_id, "command_id": command_id, "ok": True, "result": {"pong": 1.0}}


_RAW_TOKEN = re.compile(r'"\\u2063raw:((?:[^"\\]|\\")*)"')


def dumps(value: dict[str, Any]) -> bytes:
    """JSON with the raw tokens put in (they would not survive json.dumps)."""
    text = json.dumps(value, allow_nan=True)
    return _RAW_TOKEN.sub(lambda m: m.group(1).replace('\\"', '"'), text).encode()


@st.composite
def hostile_message(draw: st.DrawFn, channel_names: tuple[str, ...] = ("telemetry", "state", "ack")) -> dict[str, Any]:
    """A recipe: filled in with the hostile device's id and command by `render`."""
    channel = wire.Channel(draw(st.sampled_from(channel_names)))
    kind = draw(st.sampled_from(["mutate", "mutate", "mutate", "drop_field", "random_json", "bytes", "oversized",
                                 "other_device", "unknown_device"]))
    recipe: dict[str, Any] = {"channel": channel, "kind": kind, "seq": draw(st.integers(1, 10**6))}
    if kind in ("mutate", "drop_field"):
        recipe["path"] = draw(st.sampled_from(FIELDS[channel]))
        recipe["value"] = draw(hostile_values)
    elif kind == "random_json":
        recipe["value"] = draw(json_values)
    elif kind == "bytes":
        recipe["value"] = draw(st.binary(max_size=200))
    return recipe


def render(recipe: dict[str, Any], hostile: str, honest: str, command_id: str) -> tuple[str, bytes]:
    channel: wire.Channel = recipe["channel"]
    kind = recipe["kind"]
    topic = wire.topic(hostile, channel)
    if kind == "bytes":
        return topic, recipe["value"]
    if kind == "random_json":
        return topic, dumps({"v": recipe["value"]})[6:-1]
    record = base(channel, hostile, recipe["seq"], command_id)
    if kind == "other_device":
        record["device_id"] = honest
    elif kind == "unknown_device":
        stranger = f"never-{uuid.uuid4().hex[:6]}"
        record["device_id"] = stranger
        topic = wire.topic(stranger, channel)
    elif kind == "oversized":
        record["extra"] = "x" * (wire.MAX_PAYLOAD_BYTES + 10)
    else:
        *parents, leaf = recipe["path"]
        target = record
        for name in parents:
            target = target[name]
        if kind == "drop_field":
            target.pop(leaf, None)
        else:
            target[leaf] = recipe["value"]
    return topic, dumps(record)


def honest_messages(device_id: str, seqs: list[int], command_id: str) -> list[tuple[str, bytes]]:
    out = [(wire.topic(device_id, wire.Channel.TELEMETRY), dumps(telemetry_dict(device_id, s))) for s in seqs]
    out.append((wire.topic(device_id, wire.Channel.STATE), wire.encode(wire.State(
        device_id=device_id, online=True, ts=time.time(), agent_version=f"v{seqs[-1]}"))))
    out.append((wire.topic(device_id, wire.Channel.ACK), wire.encode(wire.Ack(
        device_id=device_id, command_id=command_id, ok=True, result={"seq": seqs[-1]}))))
    return out


def interleave(honest: list[tuple[str, bytes]], hostile: list[tuple[str, bytes]], order: list[bool]) \
        -> list[tuple[str, bytes]]:
    """Merge keeping each list's own order; `order` says which list the next message comes from."""
    a, b, out = list(honest), list(hostile), []
    for take_honest in order:
        if take_honest and a:
            out.append(a.pop(0))
        elif b:
            out.append(b.pop(0))
    return out + a + b


def add_device(engine: Engine) -> tuple[str, str]:
    """An enrolled device and a command pending for it."""
    device_id, command_id = f"dev-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    with Session(engine) as session:
        session.add(Device(device_id=device_id, profile="raspberry-pi-5", created_at=utcnow()))
        session.add(CommandRecord(command_id=command_id, device_id=device_id, kind="ping", args={},
                                  created_at=utcnow()))
        session.commit()
    return device_id, command_id


def total(stats: dict[str, Any]) -> int:
    return int(stats["stored"] + stats["duplicates"] + sum(stats["dead_letters"].values()) + stats["states"]
               + stats["acks"])


def assert_honest_stored(engine: Engine, device_id: str, command_id: str, seqs: list[int]) -> None:
    """`seqs` stored exactly once (the device's earlier ones aside), its state and its ack applied."""
    with Session(engine) as session:
        stored = session.execute(
            select(TelemetryRecord.seq).where(TelemetryRecord.device_id == device_id,  # type: ignore[arg-type]
                                              TelemetryRecord.seq >= seqs[0]).order_by(TelemetryRecord.seq)
        ).scalars().all()
        device = session.get(Device, device_id)
        command = session.get(CommandRecord, command_id)
    assert list(stored) == seqs
    assert device is not None and device.agent_version == f"v{seqs[-1]}" and device.last_seq == seqs[-1]
    assert command is not None and command.status == "ok" and command.result == {"seq": seqs[-1]}


# -- straight into process_batch -------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow, HealthCheck.data_too_large])
@given(hostile=st.lists(hostile_message(), min_size=1, max_size=12), order=st.lists(st.booleans(), max_size=30),
       batch_size=st.integers(1, 40))
@pytest.mark.slow
def test_process_batch_contains_hostile_records(engine: Engine, hostile: list[dict[str, Any]], order: list[bool],
                                                batch_size: int) -> None:
    # Prepare
    honest, honest_cmd = add_device(engine)
    bad, bad_cmd = add_device(engine)
    seqs = [1, 2, 3]
    messages = interleave(honest_messages(honest, seqs, honest_cmd),
                          [render(r, bad, honest, bad_cmd) for r in hostile], order)
    known = _KnownDevices(engine)
    before = read_stats(engine)
    # Execute
    for i in range(0, len(messages), batch_size):
        batch = [Message(t, p, 0, 1) for t, p in messages[i:i + batch_size]]
        counts = process_batch(engine, known, batch)
        # Assert: each batch accounts for every message it got
        accounted = sum(n for k, n in counts.items() if k != "received")
        assert counts["received"] == len(batch) == accounted, counts
    # Assert
    after = read_stats(engine)
    assert after["received"] - before["received"] == len(messages)
    assert total(after) - total(before) == len(messages)
    assert_honest_stored(engine, honest, honest_cmd, seqs)
    with Session(engine) as session:  # what the hostile device got stored is inside the contract
        for seq in session.execute(select(TelemetryRecord.seq).where(  # type: ignore[arg-type]
                TelemetryRecord.device_id == bad)).scalars():
            assert 0 <= seq <= 2**63 - 1


# -- through a real broker and the ingest worker ---------------------------------------------------------------
@dataclass
class BrokerFleet:
    """A started fleet, an honest and a hostile device enrolled in it, and an MQTT client for each device."""

    fleet: Fleet
    honest: str
    hostile: str
    clients: dict[str, mqtt.Client]
    # On the embedded broker each device publishes with its own credentials: its ACL drops other topics.
    own_topics_only: bool
    next_seq: int = 1


def _client(address: BrokerAddress, client_id: str) -> mqtt.Client:
    client = make_client(address, client_id, protocol=address.protocol)
    client.connect(address.host, address.port)
    client.loop_start()
    return client


@pytest.fixture(name="broker_fleet", params=["mosquitto", "embedded"])
def fx_broker_fleet(request: pytest.FixtureRequest, database_url: str, tmp_path: Path) -> Iterator[BrokerFleet]:
    if request.param == "mosquitto":
        url = request.getfixturevalue("mosquitto_url")
        fleet = Fleet(fleet_settings(url, tmp_path / "cp", database_url)).start()
    else:
        pytest.importorskip("amqtt")
        fleet = Fleet(fleet_settings(None, tmp_path / "cp", database_url, embedded_broker_port=free_port())).start()
    clients: dict[str, mqtt.Client] = {}
    try:
        ids = []
        for _ in range(2):
            enrolled = fleet.devices.enroll(DeviceCreate(device_id=f"dev-{uuid.uuid4().hex[:8]}",
                                                         profile="raspberry-pi-5"))
            ids.append(enrolled.device_id)
            address = parse_broker_url(enrolled.broker_url)
            if request.param == "embedded":
                address = address.with_credentials(enrolled.mqtt_username, enrolled.mqtt_password)
            clients[enrolled.device_id] = _client(address, enrolled.device_id)
        yield BrokerFleet(fleet, ids[0], ids[1], clients, own_topics_only=request.param == "embedded")
    finally:
        for client in clients.values():
            client.disconnect()
            client.loop_stop()
        fleet.stop()


@settings(max_examples=30, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(hostile=st.lists(hostile_message(), min_size=5, max_size=25), order=st.lists(st.booleans(), max_size=40))
@pytest.mark.slow
def test_broker_ingest_contains_hostile_records(broker_fleet: BrokerFleet, hostile: list[dict[str, Any]],
                                                order: list[bool]) -> None:
    # Prepare: the next 5 seqs of the honest device, a command pending for each device
    bf, fleet = broker_fleet, broker_fleet.fleet
    seqs = list(range(bf.next_seq, bf.next_seq + 5))
    bf.next_seq += 5
    honest_cmd = fleet.devices.send_command(bf.honest, CommandCreate(kind="ping", wait_s=0)).command_id
    hostile_cmd = fleet.devices.send_command(bf.hostile, CommandCreate(kind="ping", wait_s=0)).command_id
    if bf.own_topics_only:
        hostile = [r for r in hostile if r["kind"] != "unknown_device"]
    messages = interleave(honest_messages(bf.honest, seqs, honest_cmd),
                          [render(r, bf.hostile, bf.honest, hostile_cmd) for r in hostile], order)
    before = read_stats(fleet.engine)
    # Execute: each device publishes on its own connection
    infos = [bf.clients[bf.honest if bf.honest in topic else bf.hostile].publish(topic, payload, qos=1)
             for topic, payload in messages]
    for info in infos:
        info.wait_for_publish(10)
    wait_for(lambda: read_stats(fleet.engine)["received"] - before["received"] >= len(messages), timeout=30,
             what=f"{len(messages)} messages ingested")
    # Assert
    after = read_stats(fleet.engine)
    assert after["received"] - before["received"] == len(messages)
    assert total(after) - total(before) == len(messages)
    assert_honest_stored(fleet.engine, bf.honest, honest_cmd, seqs)
    assert all(w.alive and w.status()["state"] == "running" and w.restarts == 0 for w in fleet.workers)
