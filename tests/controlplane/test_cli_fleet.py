"""`edgefleet devices` and `edgefleet models` against a served control plane, a real broker and a device on it that
reports state and telemetry and answers commands: tables, --json, filters, the ack of a command, deletion with and
without confirmation, and the API's reason (not a traceback) when something is wrong."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from typer.testing import CliRunner

from agent import protocol as wire
from agent.mqtt import MqttProtocol, make_client, parse_broker_url
from controlplane.app import create_app
from controlplane.auth import Role, create_token
from controlplane.cli import app as cli
from controlplane.devices.schemas import DeviceCreate
from controlplane.wiring import Fleet
from tests._services import clear_retained, free_port, fx_fleet, wait_for  # noqa: F401 - fx_fleet
from tests.controlplane.test_models_deployments import register_starter

pytestmark = pytest.mark.integration

runner = CliRunner()


class Device:
    """A device on the real broker speaking the agent's protocol: retained state, telemetry, and acks to its
    commands (``fail`` is refused with a reason; ``logs`` and ``restart`` are answered as the agent answers them;
    anything else is acked with its arguments echoed)."""

    def __init__(self, broker_url: str, device_id: str) -> None:
        self.address, self.device_id = parse_broker_url(broker_url), device_id
        self.restarted = False
        self.client = make_client(self.address, f"cli-{device_id}-{uuid.uuid4().hex[:4]}", protocol=MqttProtocol.V5)
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect(self.address.host, self.address.port)
        self.client.subscribe(wire.topic(device_id, wire.Channel.CMD), qos=1)
        self.client.loop_start()
        assert subscribed.wait(5)
        self.publish(wire.Channel.STATE, wire.State(device_id=device_id, online=True, ts=time.time(),
                                                    agent_version="0.test", active_model="m1",
                                                    active_variant="fp32"), retain=True)

    def publish(self, channel: wire.Channel, message: Any, retain: bool = False) -> None:
        self.client.publish(wire.topic(self.device_id, channel), wire.encode(message), qos=1,
                            retain=retain).wait_for_publish(5)

    def telemetry(self, seq: int, ts: float) -> None:
        self.publish(wire.Channel.TELEMETRY, wire.Telemetry(
            device_id=self.device_id, seq=seq, ts=ts,
            system=wire.SystemStats(cpu_percent=12.5 + seq, mem_used_mb=300, mem_total_mb=4096, disk_used_percent=40,
                                    temperature_c=51.25),
            power=wire.PowerStats(source="simulated", power_source="battery", battery_percent=87.0),
            network=wire.NetworkStats(source="simulated"),
            inference=wire.InferenceStats(model_version="m1", count=50, latency_p50_ms=1.25, latency_p95_ms=3.5,
                                          labelled=10, correct=9)))

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        command = wire.decode(msg.payload, wire.Command)
        refused = command.kind == "fail"
        reason, result = "unsupported command kind 'fail'" if refused else None, {"echo": command.args}
        if command.kind == "logs":  # as agent._logring answers: at most 50 entries fit here, one with an escape
            lines = command.args.get("lines", 100)
            kept = [f"2026-11-26T08:00:{i:02d}.000Z [info   ] event.{i}" for i in range(min(lines, 50))]
            kept[-1] = "2026-11-26T08:00:59.000Z [warning] evil \x1b]0;pwned\x07 title"
            result = {"lines": kept, "requested": lines, "available": 120, "truncated": lines > 50, "dropped": 0}
        elif command.kind == "restart":  # as agent._restart: the second one within 15 s is refused
            refused = self.restarted
            reason = "restart refused: the agent restarted 0 s ago (at most one restart per 15 s)" if refused else None
            result = {"restarting": True, "mode": "exit", "pid": 4242, "uptime_s": 12.5}
            self.restarted = True
        ack = wire.Ack(device_id=self.device_id, command_id=command.command_id, ok=not refused, reason=reason,
                       result={} if refused else result)
        client.publish(wire.topic(self.device_id, wire.Channel.ACK), wire.encode(ack), qos=1)

    def close(self) -> None:
        self.publish(wire.Channel.STATE, wire.State(device_id=self.device_id, online=False, ts=time.time()),
                     retain=True)
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture(name="served")
def fx_served(fleet: Fleet, mosquitto_url: str) -> Iterator[tuple[Fleet, list[str]]]:
    """The fleet served over HTTP: cam-0 online with three telemetry records, cam-1 (another profile and tag)
    and gone-0 enrolled but never connected; model m1 registered. Yields the CLI options (an admin token)."""
    from controlplane.demo import AppServer

    fleet.devices.enroll(DeviceCreate(device_id="cam-0", profile="raspberry-pi-5", tags=["lab", "cam"]))
    fleet.devices.enroll(DeviceCreate(device_id="cam-1", profile="jetson-orin-nano", tags=["yard"]))
    fleet.devices.enroll(DeviceCreate(device_id="gone-0", profile="raspberry-pi-5"))
    register_starter(fleet, "m1", {"fp32": 0.975, "full-int8": 0.9625})
    device = Device(mosquitto_url, "cam-0")
    _, token = create_token(fleet.engine, Role.ADMIN, "cli")
    port = free_port()
    try:
        for seq, ts in enumerate((1_795_300_000.0, 1_795_300_010.0, 1_795_300_020.0)):
            device.telemetry(seq, ts)
        wait_for(lambda: fleet.devices.get("cam-0").online and fleet.devices.get("cam-0").last_seq == 2,
                 what="cam-0 online with its telemetry")
        with AppServer(create_app(fleet=fleet), port):
            yield fleet, ["--url", f"http://127.0.0.1:{port}", "--token", token]
    finally:
        device.close()
        clear_retained(mosquitto_url, ["cam-0"])


def printed_json(output: str) -> Any:
    return json.loads(output)


def json_in(output: str) -> Any:
    """The JSON object the CLI printed, among the served control plane's own log lines (same process here)."""
    lines = output.splitlines()
    start = lines.index("{")
    return json.loads("\n".join(lines[start:lines.index("}", start) + 1]))


def ids(result: Any) -> list[str]:
    return sorted(d["device_id"] for d in printed_json(result.stdout))


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_devices_list_and_show(served: tuple[Fleet, list[str]]) -> None:
    # Prepare
    _, common = served
    # Execute
    table = runner.invoke(cli, ["devices", "list", *common])
    as_json = runner.invoke(cli, ["devices", "list", "--json", *common])
    online = runner.invoke(cli, ["devices", "list", "--online", "--json", *common])
    offline = runner.invoke(cli, ["devices", "list", "--offline", "--json", *common])
    by_profile = runner.invoke(cli, ["devices", "list", "--profile", "jetson-orin-nano", "--json", *common])
    by_tag = runner.invoke(cli, ["devices", "list", "--tag", "lab", "--json", *common])
    page = runner.invoke(cli, ["devices", "list", "--limit", "1", "--offset", "1", "--json", *common])
    shown = runner.invoke(cli, ["devices", "show", "cam-0", *common])
    shown_json = runner.invoke(cli, ["devices", "show", "cam-0", "--json", *common])
    never = runner.invoke(cli, ["devices", "show", "gone-0", *common])
    # Assert
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert lines[0].split()[:4] == ["DEVICE", "PROFILE", "STATUS", "LAST"]
    cam0 = next(line for line in lines if line.startswith("cam-0"))
    assert "raspberry-pi-5" in cam0 and " online " in cam0 and "m1 (fp32)" in cam0 and "cam,lab" in cam0
    assert any(line.startswith("gone-0") and " offline " in line and "never" in line for line in lines)
    assert ids(as_json) == ["cam-0", "cam-1", "gone-0"]
    assert ids(online) == ["cam-0"]
    assert ids(offline) == ["cam-1", "gone-0"]
    assert ids(by_profile) == ["cam-1"]
    assert ids(by_tag) == ["cam-0"]
    assert len(printed_json(page.stdout)) == 1
    assert shown.exit_code == 0, shown.output
    for expected in ("profile:      raspberry-pi-5", "status:       online", "active_model: m1", "agent_version: 0.test",
                     "seq 2 at 2026-11-21T", "cpu 14.5%", "temperature 51.2 C", "battery 87%", "p50 1.25 ms",
                     "p95 3.50 ms", "on-device accuracy 0.900"):
        assert expected in shown.stdout, (expected, shown.stdout)
    device = printed_json(shown_json.stdout)
    assert device["last_telemetry"]["seq"] == 2 and device["reported_state"]["active_variant"] == "fp32"
    assert never.exit_code == 0 and "reported state: none yet" in never.stdout
    assert "last telemetry: none yet" in never.stdout


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_devices_telemetry(served: tuple[Fleet, list[str]]) -> None:
    # Prepare
    _, common = served
    # Execute
    table = runner.invoke(cli, ["devices", "telemetry", "cam-0", *common])
    last_two = runner.invoke(cli, ["devices", "telemetry", "cam-0", "-n", "2", "--json", *common])
    window = runner.invoke(cli, ["devices", "telemetry", "cam-0", "--since", "1795300005",
                                 "--until", "2026-11-21T22:27:00Z", "--json", *common])
    bad_since = runner.invoke(cli, ["devices", "telemetry", "cam-0", "--since", "yesterday", *common])
    # Assert
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["SEQ", "TS", "(UTC)", "CPU%", "MEM", "MB", "TEMP", "C", "BATT%", "P50", "ms", "P95",
                                "ms"]
    assert [line.split()[0] for line in lines[1:]] == ["0", "1", "2"]
    assert lines[1].split()[1:] == ["2026-11-21T22:26:40Z", "12.5", "300", "51.2", "87", "1.25", "3.50"]
    assert [r["seq"] for r in printed_json(last_two.stdout)] == [1, 2]
    assert [r["seq"] for r in printed_json(window.stdout)] == [1]
    assert bad_since.exit_code == 1
    assert "400" in bad_since.output and "since='yesterday'" in bad_since.output
    assert "Traceback" not in bad_since.output


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_devices_command_prints_the_ack(served: tuple[Fleet, list[str]]) -> None:
    # Prepare
    _, common = served
    # Execute
    acked = runner.invoke(cli, ["devices", "command", "cam-0", "set_config", "--args", '{"interval_s": 5}',
                                "--wait", "10", *common])
    acked_json = runner.invoke(cli, ["devices", "command", "cam-0", "ping", "--json", *common])
    refused = runner.invoke(cli, ["devices", "command", "cam-0", "fail", *common])
    pending = runner.invoke(cli, ["devices", "command", "cam-1", "ping", "--wait", "0", "--json", *common])
    bad_args = runner.invoke(cli, ["devices", "command", "cam-0", "ping", "--args", "[1, 2]", *common])
    # Assert
    assert acked.exit_code == 0, acked.output
    assert "set_config to cam-0: ok" in acked.stdout and 'result: {"echo": {"interval_s": 5}}' in acked.stdout
    command = printed_json(acked_json.stdout)
    assert (command["status"], command["kind"], command["result"]) == ("ok", "ping", {"echo": {}})
    assert refused.exit_code == 1 and "fail to cam-0: error" in refused.stdout
    assert "reason: unsupported command kind 'fail'" in refused.stdout
    assert pending.exit_code == 0 and printed_json(pending.stdout)["status"] == "pending"
    assert bad_args.exit_code == 2 and "--args must be a JSON object" in bad_args.output


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_devices_delete_asks_unless_yes(served: tuple[Fleet, list[str]]) -> None:
    # Prepare
    fleet, common = served
    # Execute
    declined = runner.invoke(cli, ["devices", "delete", "gone-0", *common], input="n\n")
    still_there = [d.device_id for d in fleet.devices.find()]
    confirmed = runner.invoke(cli, ["devices", "delete", "gone-0", *common], input="y\n")
    after_confirm = [d.device_id for d in fleet.devices.find()]
    forced = runner.invoke(cli, ["devices", "delete", "cam-1", "--yes", *common])
    # Assert
    assert declined.exit_code == 1 and "delete device gone-0" in declined.output and "Aborted" in declined.output
    assert "gone-0" in still_there
    assert confirmed.exit_code == 0 and "device gone-0 deleted" in confirmed.stdout
    assert "gone-0" not in after_confirm
    assert forced.exit_code == 0, forced.output
    assert sorted(d.device_id for d in fleet.devices.find()) == ["cam-0"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_an_unknown_device_or_model_is_the_apis_reason_not_a_traceback(served: tuple[Fleet, list[str]]) -> None:
    # Prepare
    _, common = served
    # Execute
    results = {
        "show": runner.invoke(cli, ["devices", "show", "nope-9", *common]),
        "telemetry": runner.invoke(cli, ["devices", "telemetry", "nope-9", *common]),
        "command": runner.invoke(cli, ["devices", "command", "nope-9", "ping", *common]),
        "delete": runner.invoke(cli, ["devices", "delete", "nope-9", "--yes", *common]),
        "model": runner.invoke(cli, ["models", "show", "nope-9", *common]),
    }
    # Assert
    for what, result in results.items():
        assert result.exit_code == 1, (what, result.output)
        assert "error: 404: no " in result.output and "'nope-9'" in result.output, (what, result.output)
        assert "Traceback" not in result.output and isinstance(result.exception, SystemExit), (what, result.exception)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_models_list_and_show(served: tuple[Fleet, list[str]]) -> None:
    # Prepare
    _, common = served
    # Execute
    listed = runner.invoke(cli, ["models", "list", *common])
    listed_json = runner.invoke(cli, ["models", "list", "--json", *common])
    shown = runner.invoke(cli, ["models", "show", "m1", *common])
    shown_json = runner.invoke(cli, ["models", "show", "m1", "--json", *common])
    # Assert
    assert listed.exit_code == 0, listed.output
    row = next(line for line in listed.stdout.splitlines() if line.startswith("m1 "))
    assert "release 1" in row and "digits" in row and "ready" in row and "fp32,full-int8" in row
    assert [m["version"] for m in printed_json(listed_json.stdout)] == ["m1"]
    assert shown.exit_code == 0, shown.output
    variants = {line.split()[0]: line for line in shown.stdout.splitlines()[1:]
                if line.split() and line.split()[0] in ("fp32", "full-int8", "dynamic-int8")}
    assert "0.9750" in variants["fp32"] and "KiB" in variants["fp32"] and "published" in variants["fp32"]
    assert "0.9625" in variants["full-int8"]
    assert "refused: accuracy 0.90 is 7.5 points below fp32" in variants["dynamic-int8"]
    assert "task:     digits" in shown.stdout
    assert {v["variant"] for v in printed_json(shown_json.stdout)["variants"]} == {"fp32", "full-int8",
                                                                                   "dynamic-int8"}


def test_no_token_is_one_line() -> None:
    # Execute: no control plane is needed to refuse a call without a token
    result = runner.invoke(cli, ["devices", "list", "--url", "http://127.0.0.1:9"], env={"EDGEFLEET_TOKEN": ""})
    # Assert
    assert result.exit_code == 2 and "an API token is needed" in result.output


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_devices_logs_prints_the_lines_safely_and_is_bounded(served: tuple[Fleet, list[str]]) -> None:
    # Prepare
    fleet, common = served
    url = common[common.index("--url") + 1]
    _, viewer = create_token(fleet.engine, Role.VIEWER, "viewer")
    # Execute
    three = runner.invoke(cli, ["devices", "logs", "cam-0", "-n", "3", *common])
    many = runner.invoke(cli, ["devices", "logs", "cam-0", "--lines", "200", *common])
    as_json = runner.invoke(cli, ["devices", "logs", "cam-0", "-n", "2", "--json", *common])
    zero = runner.invoke(cli, ["devices", "logs", "cam-0", "-n", "0", *common])
    too_many_api = runner.invoke(cli, ["devices", "command", "cam-0", "logs", "--args", '{"lines": 1000}', *common])
    silent = runner.invoke(cli, ["devices", "logs", "cam-1", "--wait", "0.3", *common])
    unknown = runner.invoke(cli, ["devices", "logs", "nope-9", *common])
    command_id = json_in(as_json.stdout)["command_id"]
    as_viewer = httpx.get(f"{url}/api/v1/devices/cam-0/commands/{command_id}",
                          headers={"Authorization": f"Bearer {viewer}"}).json()
    as_admin = httpx.get(f"{url}/api/v1/devices/cam-0/commands/{command_id}",
                         headers={"Authorization": f"Bearer {common[-1]}"}).json()
    # Assert
    assert three.exit_code == 0, three.output
    printed = three.stdout.splitlines()
    assert printed[:2] == ["2026-11-26T08:00:00.000Z [info   ] event.0", "2026-11-26T08:00:01.000Z [info   ] event.1"]
    assert printed[2] == "2026-11-26T08:00:59.000Z [warning] evil \\x1b]0;pwned\\x07 title"  # no raw escape
    assert "\x1b" not in three.stdout
    assert many.exit_code == 0 and len([x for x in many.output.splitlines() if x.startswith("2026-11-26T08:00:")]) == 50
    assert "50 of the 120 entries asked for fit in one answer" in many.output
    assert json_in(as_json.stdout)["result"]["requested"] == 2
    assert zero.exit_code == 2 and "0 is not in the range 1<=x<=200" in zero.output
    assert too_many_api.exit_code == 1 and "400" in too_many_api.output
    assert "'lines' must be an integer in 1..200, got 1000" in too_many_api.output
    assert silent.exit_code == 1 and "cam-1 did not answer within 0.3 s" in silent.output
    assert unknown.exit_code == 1 and "404" in unknown.output
    assert as_admin["result"]["lines"] and as_viewer["result"] is None  # a device's log is for operators


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_devices_restart_asks_unless_yes_and_says_what_happens(served: tuple[Fleet, list[str]]) -> None:
    # Prepare
    fleet, common = served
    # Execute
    declined = runner.invoke(cli, ["devices", "restart", "cam-0", *common], input="n\n")
    sent_after_decline = [c.kind for c in _commands(fleet)]
    restarted = runner.invoke(cli, ["devices", "restart", "cam-0", *common], input="y\n")
    again = runner.invoke(cli, ["devices", "restart", "cam-0", "--yes", "--json", *common])
    with_args = runner.invoke(cli, ["devices", "command", "cam-0", "restart", "--args", '{"force": true}', *common])
    offline = runner.invoke(cli, ["devices", "restart", "gone-0", "--yes", "--wait", "0", *common])
    unknown = runner.invoke(cli, ["devices", "restart", "nope-9", "--yes", *common])
    # Assert
    assert declined.exit_code == 1 and "restart the agent on cam-0?" in declined.output and "Aborted" in declined.output
    assert "restart" not in sent_after_decline
    assert restarted.exit_code == 0, restarted.output
    assert "restart of cam-0 acknowledged: the agent (pid 4242) exits (code 75)" in restarted.stdout
    assert again.exit_code == 1 and json_in(again.stdout)["status"] == "error"
    assert "at most one restart per 15 s" in json_in(again.stdout)["reason"]
    assert with_args.exit_code == 1 and "400" in with_args.output and "restart takes no arguments" in with_args.output
    assert offline.exit_code == 1 and "gone-0 is offline" in offline.output and "did not ack" in offline.output
    assert unknown.exit_code == 1 and "404" in unknown.output and "Traceback" not in unknown.output


def _commands(fleet: Fleet) -> list[Any]:
    from sqlmodel import Session, select

    from controlplane.db import CommandRecord

    with Session(fleet.engine) as session:
        return list(session.exec(select(CommandRecord)))
