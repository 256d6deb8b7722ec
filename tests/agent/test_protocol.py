"""The wire contract's ranges, and the agent's side of it: it never emits what the contract forbids."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from agent import protocol as wire
from agent._outbox import Outbox
from agent._telemetry import finite_or_none


def telemetry(device_id: str = "dev-1", seq: int = 1, **system: Any) -> wire.Telemetry:
    return wire.Telemetry(
        device_id=device_id, seq=seq, ts=time.time(),
        system=wire.SystemStats(**{"cpu_percent": 1.0, "mem_used_mb": 10.0, "mem_total_mb": 100.0,
                                   "disk_used_percent": 5.0, **system}),
        power=wire.PowerStats(source="simulated", power_source="battery", battery_percent=80.0, charging=True),
        network=wire.NetworkStats(source="simulated", metered=False),
        inference=wire.InferenceStats(model_version="m1", count=1, class_histogram={"cat": 1}),
    )


def as_dict(message: msgspec.Struct) -> dict[str, Any]:
    return json.loads(wire.encode(message))  # type: ignore[no-any-return]


def with_field(record: dict[str, Any], path: str, value: Any) -> bytes:
    *parents, leaf = path.split(".")
    target = record
    for name in parents:
        target = target[name]
    target[leaf] = value
    return json.dumps(record).encode()


def deep(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    return value


TELEMETRY_BREACHES = {
    "seq 2**63": ("seq", 2**63),
    "seq -1": ("seq", -1),
    "bytes_sent 2**64": ("network.bytes_sent", 2**64),
    "histogram count 2**63": ("inference.class_histogram", {"cat": 2**63}),
    "histogram of 1025 classes": ("inference.class_histogram", {str(i): 1 for i in range(1025)}),
    "label of 129 characters": ("power.power_source", "x" * 129),
    "NUL in a label": ("power.power_source", "bat\x00tery"),
    "NUL in an unknown field": ("extra", "\x00"),
    "NUL in a histogram key": ("inference.class_histogram", {"c\x00t": 1}),
    "wrong type": ("system.cpu_percent", "hot"),
    "protocol_version 2**40": ("protocol_version", 2**40),
}


@pytest.mark.parametrize("case", sorted(TELEMETRY_BREACHES))
def test_telemetry_outside_the_contract_is_refused(case: str) -> None:
    path, value = TELEMETRY_BREACHES[case]
    payload = with_field(as_dict(telemetry()), path, value)
    with pytest.raises(wire.ProtocolError):
        wire.check(payload, wire.Channel.TELEMETRY)


@pytest.mark.parametrize("raw", [b"1e999", b"-1e999", b"NaN", b"Infinity", b"1E400"])
def test_non_finite_numbers_are_refused(raw: bytes) -> None:
    payload = json.dumps(as_dict(telemetry())).encode().replace(b'"cpu_percent": 1.0', b'"cpu_percent": ' + raw)
    with pytest.raises(wire.ProtocolError):
        wire.check(payload, wire.Channel.TELEMETRY)


@pytest.mark.parametrize("payload", [
    b'{"device_id":"dev-1","online":true,"ts":1,"config":' + json.dumps(deep(7)).encode() + b"}",
    b'{"device_id":"dev-1","online":true,"ts":1,"config":' + b'{"a":' * 20000 + b"1" + b"}" * 20000 + b"}",
    b'{"device_id":"dev-1","online":true,"ts":1,"x":' + b"[" * 20000 + b"]" * 20000 + b"}",
    b'{"device_id":"dev-1","online":true,"ts":1,"config":{"k":"' + b"x" * 4097 + b'"}}',
    b'{"device_id":"dev-1","online":true,"ts":1,"config":' + json.dumps({str(i): i for i in range(257)}).encode() + b"}",
    b'{"device_id":"dev-1","online":true,"ts":1,"agent_version":"\xff\xfe"}',
    b'{"device_id":"dev-1","online":true,"ts":1,"agent_version":"\\ud800"}',
    b'{"device_id":"dev 1","online":true,"ts":1}',
    b"x" * (wire.MAX_PAYLOAD_BYTES + 1),
], ids=["config 7 deep", "config 20000 deep", "unknown field 20000 deep", "string of 4097", "257 entries",
        "invalid UTF-8", "lone surrogate", "bad device id", "oversized"])
def test_state_outside_the_contract_is_refused(payload: bytes) -> None:
    with pytest.raises(wire.ProtocolError):
        wire.check(payload, wire.Channel.STATE)


def test_the_contract_admits_its_limits() -> None:
    # Prepare: every bound at its edge
    record = as_dict(telemetry(seq=wire.INT64_MAX))
    record["network"]["bytes_sent"] = wire.INT64_MAX
    record["power"]["power_source"] = "x" * 128
    record["extra"] = "back\\u0000slash"  # an escaped backslash, not a NUL
    state = {"device_id": "dev-1", "online": True, "ts": 1.0, "config": deep(wire.MAX_FREEFORM_DEPTH), "agent_version": "v" * 128}
    ack = {"device_id": "dev-1", "command_id": "c" * 64, "ok": False, "reason": "r" * 2048,
           "result": {"n": -(2**63), "f": 1e308, "l": [[[1]]]}}
    # Execute / Assert
    assert wire.check(json.dumps(record).encode(), wire.Channel.TELEMETRY).seq == wire.INT64_MAX
    assert wire.check(json.dumps(state).encode(), wire.Channel.STATE).config == deep(wire.MAX_FREEFORM_DEPTH)
    assert wire.check(json.dumps(ack).encode(), wire.Channel.ACK).result["n"] == -(2**63)


def test_agent_encodes_a_broken_sensor_as_unknown() -> None:
    # A NaN / infinite reading of an optional field goes out as null: "unknown", inside the contract.
    message = telemetry(temperature_c=math.nan, load_1m=math.inf)
    checked = wire.check(wire.encode(message), wire.Channel.TELEMETRY)
    assert isinstance(checked, wire.Telemetry)
    assert checked.system.temperature_c is None and checked.system.load_1m is None
    assert finite_or_none(math.nan) is None and finite_or_none(-math.inf) is None and finite_or_none(41.5) == 41.5


def test_agent_sends_an_unsendable_ack_as_an_error_ack() -> None:
    # Prepare: a command result nested deeper than the contract allows
    ack = wire.Ack(device_id="dev-1", command_id="c1", ok=True, result={"deep": deep(10)})
    # Execute
    sent = wire.check(wire.encode(ack), wire.Channel.ACK)
    # Assert: the control plane gets an ack it can store, saying why the result is missing
    assert isinstance(sent, wire.Ack)
    assert (sent.ok, sent.result, sent.command_id) == (False, {}, "c1")
    assert sent.reason is not None and "could not be sent" in sent.reason


def test_outbox_refuses_what_breaks_the_contract(tmp_path: Path) -> None:
    # Prepare
    box = Outbox(tmp_path / "o.db")
    topic = wire.topic("dev-1", wire.Channel.TELEMETRY)
    # Execute: a required reading that is NaN (encoded null), another device's id, then a good record
    broken = box.put(topic, wire.encode(telemetry(cpu_percent=math.nan)))
    foreign = box.put(topic, wire.encode(telemetry(device_id="dev-2")))
    huge = box.put(wire.topic("dev-1", wire.Channel.ACK),
                   b'{"device_id":"dev-1","command_id":"c","ok":true,"result":{"n":%d}}' % 2**64)
    good = box.put(topic, wire.encode(telemetry(temperature_c=math.nan)))
    # Assert: refused, counted and never queued for publishing; the good one is
    assert (broken, foreign, huge) == (0, 0, 0) and good > 0
    assert box.rejected == 3
    assert [e.id for e in box.peek(10)] == [good]
    box.close()
    assert Outbox(tmp_path / "o.db").rejected == 3
