"""The `logs` and `restart` commands: a bounded, redacted log ring answered over MQTT, and a restart that is acked
before the agent goes (re-exec or exit 75 for systemd), comes back online, and never runs stale or twice."""

from __future__ import annotations

import json
import logging
import os
import queue
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent import protocol as wire
from agent._logring import MAX_LINES, LogRing, LogsArgsError, logs_result, parse_logs_args
from agent._restart import MAX_AGE_S, RESTART_EXIT_CODE, RestartLog, RestartMode, refusal, resolve_mode
from agent.logsetup import get_logger
from tests._services import PrivateMosquitto, stop_process, wait_for

SECRET = "hunter2-Secret-pw"


# -- the ring, redaction and the bounds (no broker) ------------------------------------------------------------
@pytest.fixture(name="ring")
def fx_ring() -> Iterator[LogRing]:
    ring = LogRing(lines=50, max_bytes=64 * 1024, max_line_chars=300)
    ring.add_secret(SECRET)
    logger = logging.getLogger("edgefleet.test.ring")
    logger.addHandler(ring)
    logger.setLevel(logging.INFO)
    yield ring
    logger.removeHandler(ring)


def test_the_ring_redacts_credentials_before_it_stores_them(ring: LogRing) -> None:
    # Prepare
    log = get_logger("edgefleet.test.ring", device_id="pi-1")
    # Execute
    log.info("mqtt.connect", broker=f"mqtts://pi-1:{SECRET}@broker.example:8883", password="p4ss-word!")
    log.info("http.get", url="https://cp.example/m?token=abc123def&x=1", headers={"Authorization": "Bearer eyJ.x.y"})
    log.info("command.ack", reason=f"unknown command kind 'x {SECRET} y'")
    log.warning("trust.key", pem="-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMG\n-----END PRIVATE KEY-----")
    text = "\n".join(ring.tail(10))
    # Assert
    for secret in (SECRET, "p4ss-word!", "abc123def", "eyJ.x.y", "MIGHAgEAMBMG"):
        assert secret not in text, (secret, text)
    assert "mqtts://pi-1:[redacted]@broker.example:8883" in text and "password=[redacted]" in text
    assert "token=[redacted]&x=1" in text and "[redacted private key]" in text
    assert "device_id=pi-1" in text and "mqtt.connect" in text  # the rest stays readable


def test_the_ring_is_bounded_in_entries_characters_and_bytes(ring: LogRing) -> None:
    # Prepare
    log = get_logger("edgefleet.test.ring")
    # Execute
    for i in range(120):
        log.info("filler", i=i, blob="x" * (1000 if i == 119 else 10))
    newest = ring.tail(3)
    # Assert
    assert len(ring) == 50 and ring.dropped == 70
    assert "i=117" in newest[0] and "i=118" in newest[1]
    assert len(newest[2]) <= 300 and newest[2].endswith("more characters]")


def test_logs_result_fits_its_byte_budget_and_says_truncated(ring: LogRing) -> None:
    # Prepare
    log = get_logger("edgefleet.test.ring")
    for i in range(50):
        log.info("line", i=i, blob="y" * 200)
    # Execute
    whole = logs_result(ring, 10)
    cut = logs_result(ring, 50, budget_bytes=3000)
    # Assert
    assert len(whole["lines"]) == 10 and not whole["truncated"] and whole["available"] == 50
    assert "i=49" in whole["lines"][-1]  # oldest first, the newest last
    assert 0 < len(cut["lines"]) < 50 and cut["truncated"] and "i=49" in cut["lines"][-1]
    assert len(json.dumps(cut["lines"])) <= 3000


@pytest.mark.parametrize("args", [{"lines": 0}, {"lines": MAX_LINES + 1}, {"lines": True}, {"lines": "5"},
                                  {"lines": 1.5}, {"lines": 5, "path": "/etc/shadow"}])
def test_logs_arguments_out_of_bounds_are_refused(args: dict[str, Any]) -> None:
    with pytest.raises(LogsArgsError):
        parse_logs_args(args)


def test_a_restart_is_refused_when_stale_from_the_future_too_soon_or_with_arguments(tmp_path: Path) -> None:
    # Prepare
    now = time.time()

    def cmd(ts: float, **args: Any) -> wire.Command:
        return wire.Command(command_id="c1", kind="restart", args=args, ts=ts)

    # Execute / Assert
    assert refusal(cmd(now - 5), now, None) is None
    assert "stale" in (refusal(cmd(now - MAX_AGE_S - 1), now, None) or "")
    assert "future" in (refusal(cmd(now + MAX_AGE_S + 1), now, None) or "")
    assert "no send time" in (refusal(cmd(0.0), now, None) or "")
    assert "restarted 3 s ago" in (refusal(cmd(now), now, now - 3) or "")
    assert "no arguments" in (refusal(cmd(now, force=True), now, None) or "")
    log = RestartLog(tmp_path / "restart.json")
    log.record(wire.Ack(device_id="pi-1", command_id="c1", ok=True, result={"restarting": True}, ts=now))
    again = RestartLog(tmp_path / "restart.json")
    assert [a.command_id for a in again.acks()] == ["c1"] and again.last is not None


def test_auto_restart_mode_exits_under_systemd_and_execs_by_hand(monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # Execute / Assert
    assert resolve_mode(RestartMode.AUTO, {"NOTIFY_SOCKET": "/run/systemd/notify"}) is RestartMode.EXIT
    assert resolve_mode(RestartMode.AUTO, {}) is RestartMode.EXEC
    assert resolve_mode(RestartMode.EXEC, {"NOTIFY_SOCKET": "/run/systemd/notify"}) is RestartMode.EXEC
    from agent.cli import main

    monkeypatch.setenv("EDGEFLEET_AGENT_RESTART", "reboot")
    with pytest.raises(SystemExit) as exited:
        main(["run", "--device-id", "pi-1", "--profile", "raspberry-pi-5", "--broker", "mqtt://127.0.0.1:1"])
    assert exited.value.code == 2 and "EDGEFLEET_AGENT_RESTART must be auto, exit or exec" in capsys.readouterr().err


# -- a real agent process on a real broker ---------------------------------------------------------------------
class Watcher:
    """A client on the device's ack and state topics that also sends it raw commands (as the broker would
    deliver them, with any id and time)."""

    def __init__(self, broker_url: str, device_id: str) -> None:
        self.device_id = device_id
        self.acks: queue.Queue[wire.Ack] = queue.Queue()
        self.states: list[bool] = []
        port = int(broker_url.rsplit(":", 1)[1])
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"watch-{uuid.uuid4().hex[:8]}")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe([(wire.topic(device_id, wire.Channel.ACK), 1),
                               (wire.topic(device_id, wire.Channel.STATE), 1)])
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if not msg.payload:
            return
        if msg.topic.endswith("/ack"):
            self.acks.put(wire.decode(msg.payload, wire.Ack))
        else:
            self.states.append(wire.decode(msg.payload, wire.State).online)

    def send(self, kind: str, command_id: str | None = None, ts: float | None = None, **args: Any) -> str:
        command_id = command_id or uuid.uuid4().hex
        payload = wire.encode(wire.Command(command_id=command_id, kind=kind, args=args,
                                           ts=time.time() if ts is None else ts))
        self.client.publish(wire.topic(self.device_id, wire.Channel.CMD), payload, qos=1).wait_for_publish(5)
        return command_id

    def ack(self, command_id: str, timeout: float = 15.0) -> wire.Ack:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                ack = self.acks.get(timeout=0.1)
            except queue.Empty:
                continue
            if ack.command_id == command_id:
                return ack
        raise AssertionError(f"no ack for {command_id} within {timeout} s")

    def close(self) -> None:
        for channel in (wire.Channel.STATE,):  # the private broker goes with the test; leave nothing retained
            self.client.publish(wire.topic(self.device_id, channel), b"", qos=1, retain=True).wait_for_publish(5)
        self.client.disconnect()
        self.client.loop_stop()


def start_agent(device_id: str, broker_url: str, data_dir: Path, log_file: Path,
                *extra: str) -> subprocess.Popen[bytes]:
    data_dir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "EDGEFLEET_AGENT_RESTART")}
    with log_file.open("ab") as log:  # a file, not a pipe: an info-level agent would fill a pipe and block
        return subprocess.Popen(
            [sys.executable, "-m", "controlplane._entry", "agent", "run", "--device-id", device_id,
             "--profile", "raspberry-pi-5", "--broker", broker_url, "--data-dir", str(data_dir),
             "--telemetry-interval", "1", "--power-source", "simulated", "--log-level", "info", *extra],
            env=env, stdout=subprocess.DEVNULL, stderr=log,
        )


@pytest.fixture(name="device")
def fx_device(private_mosquitto: PrivateMosquitto) -> Iterator[tuple[str, Watcher]]:
    device_id = f"pi-{uuid.uuid4().hex[:6]}"
    watcher = Watcher(private_mosquitto.url, device_id)
    yield device_id, watcher
    watcher.close()


@pytest.mark.integration
@pytest.mark.slow
def test_logs_answers_bounded_redacted_lines(device: tuple[str, Watcher], private_mosquitto: PrivateMosquitto,
                                             tmp_path: Path) -> None:
    # Prepare: the broker URL carries a password (mosquitto here accepts anyone), and hostile command kinds put
    # secrets and long lines into the agent's log
    device_id, watcher = device
    url = private_mosquitto.url.replace("mqtt://", f"mqtt://edge:{SECRET}@")
    agent = start_agent(device_id, url, tmp_path / "agent", tmp_path / "agent.log")
    try:
        wait_for(lambda: True in watcher.states, what="agent online")
        leak = watcher.send(f"x password={SECRET} mqtt://u:{SECRET}@h Bearer abc.def token=tok123")
        watcher.ack(leak)
        # Execute
        three = watcher.ack(watcher.send("logs", lines=3))
        refused = watcher.ack(watcher.send("logs", lines=MAX_LINES + 1))
        for _ in range(60):
            watcher.send("z" * 1500)  # acked as unknown: each ack's log entry is cut at 2048 characters
        most = watcher.ack(watcher.send("logs", lines=MAX_LINES), timeout=30)
        # Assert
        assert three.ok and len(three.result["lines"]) == 3 and three.result["requested"] == 3
        assert three.result["available"] > 3 and three.result["truncated"] is False
        text = "\n".join(three.result["lines"])
        assert "command.ack" in text and "[redacted]" in text
        assert SECRET not in text and "abc.def" not in text and "tok123" not in text
        assert not refused.ok and f"1..{MAX_LINES}" in (refused.reason or "")
        assert most.ok and most.result["truncated"] is True
        assert 0 < len(most.result["lines"]) < MAX_LINES and most.result["available"] > len(most.result["lines"])
        assert all(len(line) <= 2048 for line in most.result["lines"])
        assert len(wire.encode(most)) <= wire.MAX_PAYLOAD_BYTES
        assert not any(SECRET in line for line in most.result["lines"])
    finally:
        stop_process(agent)


@pytest.fixture(name="fleet")
def fx_fleet(private_mosquitto: PrivateMosquitto, tmp_path: Path) -> Iterator[Any]:
    from controlplane.settings import BrokerAuthMode, Settings
    from controlplane.wiring import Fleet

    fleet = Fleet(Settings(data_dir=tmp_path / "cp", broker_url=private_mosquitto.url,
                           broker_auth=BrokerAuthMode.NONE, instance_name=uuid.uuid4().hex[:8])).start()
    yield fleet
    fleet.stop()


@pytest.mark.integration
@pytest.mark.slow
def test_restart_through_the_control_plane_reexecs_and_comes_back_online(
    fleet: Any, device: tuple[str, Watcher], private_mosquitto: PrivateMosquitto, tmp_path: Path
) -> None:
    from controlplane.devices.schemas import CommandCreate, DeviceCreate

    # Prepare
    device_id, watcher = device
    fleet.devices.enroll(DeviceCreate(device_id=device_id, profile="raspberry-pi-5"))
    agent = start_agent(device_id, private_mosquitto.url, tmp_path / "agent", tmp_path / "agent.log",
                        "--on-restart", "exec")
    try:
        wait_for(lambda: fleet.devices.get(device_id).online, what="agent online")
        # Execute
        logs = fleet.devices.send_command(device_id, CommandCreate(kind="logs", args={"lines": MAX_LINES}))
        stale = watcher.ack(watcher.send("restart", ts=time.time() - MAX_AGE_S - 30))
        seen = len(watcher.states)
        restart = fleet.devices.send_command(device_id, CommandCreate(kind="restart"))
        wait_for(lambda: watcher.states[seen:][-2:] == [False, True], timeout=30, what="offline, then online")
        wait_for(lambda: fleet.devices.get(device_id).online, what="the registry says online again")
        after = fleet.devices.send_command(device_id, CommandCreate(kind="ping"))
        # Assert
        assert logs.status == "ok" and logs.result and "agent.state" in "\n".join(logs.result["lines"])
        assert not stale.ok and "stale" in (stale.reason or "")
        assert restart.status == "ok", restart
        assert restart.result and restart.result["mode"] == "exec" and restart.result["pid"] == agent.pid
        assert agent.poll() is None  # the same process (os.execv), running again
        assert after.status == "ok" and after.result and after.result["state"] == "online"
        log = (tmp_path / "agent.log").read_text()
        assert log.count("agent.restarting") == 1 and "agent.reexec" in log
    finally:
        stop_process(agent)


@pytest.mark.integration
@pytest.mark.slow
def test_restart_exits_75_for_systemd_and_a_redelivery_does_not_restart_again(
    device: tuple[str, Watcher], private_mosquitto: PrivateMosquitto, tmp_path: Path
) -> None:
    # Prepare
    device_id, watcher = device
    data_dir, log_file = tmp_path / "agent", tmp_path / "agent.log"
    agent = start_agent(device_id, private_mosquitto.url, data_dir, log_file, "--on-restart", "exit")
    try:
        wait_for(lambda: watcher.states[-1:] == [True], what="agent online")
        command_id = watcher.send("restart")
        first = watcher.ack(command_id)
        code = agent.wait(30)
        # Execute: the supervisor starts it again, and the broker delivers the same command once more
        agent = start_agent(device_id, private_mosquitto.url, data_dir, log_file, "--on-restart", "exit")
        wait_for(lambda: watcher.states[-1:] == [True], what="back online")
        seen = len(watcher.states)
        replayed = watcher.ack(watcher.send("restart", command_id=command_id, ts=first.ts))
        time.sleep(1.0)
        # Assert
        assert first.ok and first.result["mode"] == "exit" and code == RESTART_EXIT_CODE
        assert replayed == first  # the recorded ack, not a new decision
        assert agent.poll() is None and False not in watcher.states[seen:]
    finally:
        stop_process(agent)
