"""A round that fails releases its devices at once, and the devices' refusals are its skip reasons.

Real parts: a control plane on mosquitto and each database, its Flower SuperLink, agents as processes that start
SuperNodes on invitation. The ServerApp is SIGKILLed mid-run ("the ServerApp died").
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from sqlmodel import Session, select

pytest.importorskip("flwr")
pytest.importorskip("torch")

import psutil

from agent.round_status import read_status
from controlplane.db import CommandRecord
from controlplane.devices.schemas import CommandCreate, DeviceCreate, DeviceEnrolled
from controlplane.rounds.eligibility import EligibilityRule
from controlplane.rounds.schemas import RoundCreate
from controlplane.wiring import Fleet
from federated.flower.runtime import SuperLinkProcess
from federated.tasks import get_task
from tests._services import fx_fleet, wait_for  # noqa: F401 - fx_fleet
from tests.controlplane.test_fleet_e2e import stop

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Every "device" shares this machine's CPU: a busy CPU is not held against them.
ELIGIBLE = EligibilityRule(allow_metered=True, min_battery_percent=10, max_cpu_percent=100)


def _round(**overrides: object) -> RoundCreate:
    values: dict[str, object] = {"rounds": 1, "min_clients": 2, "local_epochs": 1, "round_timeout_s": 30.0,
                                 "build": False, "eligibility": ELIGIBLE}
    values.update(overrides)
    return RoundCreate(**values)  # type: ignore[arg-type]


def _start_agent(creds: DeviceEnrolled, data_dir: Path) -> subprocess.Popen[bytes]:
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / "agent.log", "wb") as log:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "controlplane._entry", "agent", "run", "--device-id", creds.device_id,
             "--profile", creds.profile, "--broker", creds.broker_url, "--username", creds.mqtt_username,
             "--data-dir", str(data_dir), "--telemetry-interval", "0.5", "--log-level", "info"],
            env=dict(os.environ, EDGEFLEET_MQTT_PASSWORD=creds.mqtt_password), stdout=log, stderr=subprocess.STDOUT)


def _agents(fleet: Fleet, tmp_path: Path, with_data: list[str], without_data: list[str],
            unusable_data: bool = False) -> dict[str, subprocess.Popen[bytes]]:
    task = get_task("digits")
    parts = task.partition(len(with_data), alpha=1.0, seed=0)
    procs = {}
    for i, device_id in enumerate(with_data + without_data):
        data_dir = tmp_path / "agents" / device_id
        if device_id in with_data:
            path = data_dir / "data" / "partition.npz"  # where join_round looks
            path.parent.mkdir(parents=True, exist_ok=True)
            if unusable_data:  # labels to count, but samples of the wrong shape: training raises
                np.savez(path, x=np.zeros((len(parts[i].y), 3), dtype=np.float32), y=parts[i].y)
            else:
                task.write_partition(parts[i], path)
        creds = fleet.devices.enroll(DeviceCreate(device_id=device_id, profile="raspberry-pi-5"))
        procs[device_id] = _start_agent(creds, data_dir)

    def ready() -> bool:
        return all(d.online and d.last_telemetry for d in (fleet.devices.get(x) for x in procs))

    wait_for(ready, timeout=60, what="the agents online with telemetry")
    return procs


def _joins(fleet: Fleet, round_id: int) -> dict[str, CommandRecord]:
    with Session(fleet.engine) as session:
        rows = session.exec(select(CommandRecord).where(CommandRecord.kind == "join_round"))
        return {r.device_id: r for r in rows if r.args.get("round_id") == str(round_id) and not r.args.get("leave")}


def _serverapps(superlink: SuperLinkProcess) -> list[psutil.Process]:
    """This SuperLink's ServerApp processes (Flower detaches them: found by the FLWR_HOME they inherit)."""
    home = str(superlink.data_dir / "flwr-home")
    found = []
    for process in psutil.process_iter():
        try:
            if any("flwr-serverapp" in part for part in process.cmdline()) and process.environ().get("FLWR_HOME") == home:
                found.append(process)
        except psutil.Error:
            continue
    return found


def test_a_round_whose_serverapp_died_releases_its_devices_for_the_next_round(fleet: Fleet, tmp_path: Path) -> None:
    # Prepare: two agents with training data, one without (it declines its invitation)
    procs = _agents(fleet, tmp_path, with_data=["rel-a", "rel-b"], without_data=["rel-nodata"])
    try:
        first = fleet.rounds.start(_round(round_timeout_s=120.0))  # a time budget of 90 + 120 + 30 s
        assert first.invited == ["rel-a", "rel-b", "rel-nodata"], first
        runner = fleet.runner
        assert runner is not None
        # The ServerApp is running the round once it has identified the devices' SuperNodes (their ClientApp
        # noted the run in the agent's status file). Killed before, Flower would start another one.
        statuses = [tmp_path / "agents" / d / "round" / "status.json" for d in ("rel-a", "rel-b")]
        wait_for(lambda: all(read_status(p).get("run_id") for p in statuses), timeout=240,
                 what="the ServerApp to identify both devices")
        assert runner.superlink is not None and _serverapps(runner.superlink)
        wait_for(lambda: all(c.status == "pending" for c in _joins(fleet, first.id).values() if c.device_id != "rel-nodata"),
                 timeout=1, what="a and b still in the round (the positive control: there is something to release)")
        # Execute: the ServerApp dies (SIGKILL, as the OOM killer would)
        for process in _serverapps(runner.superlink):
            process.send_signal(signal.SIGKILL)
        # The SuperLink notices a dead ServerApp by its missed heartbeats (Flower: 30 s interval, patience 2)
        wait_for(lambda: fleet.rounds.get(first.id).status == "failed", timeout=150, what="round 1 failed")
        # Assert: it says why, and the device that declined says why it did
        failed = fleet.rounds.get(first.id)
        assert "ServerApp" in (failed.reason or ""), failed.reason
        assert failed.skipped["rel-nodata"].startswith("declined the invitation: no training data at"), failed.skipped
        # ... and the devices leave at once, not after the round's time budget (here 240 s)
        wait_for(lambda: all(c.status != "pending" for c in _joins(fleet, first.id).values()), timeout=30,
                 what="the invited agents to leave the failed round")
        joins = _joins(fleet, first.id)
        for device_id in ("rel-a", "rel-b"):
            assert joins[device_id].status == "error", joins[device_id]
            assert "ended round" in (joins[device_id].reason or ""), joins[device_id].reason
        # Execute: the next round, at once, among the devices with data
        stop(procs.pop("rel-nodata"))
        wait_for(lambda: not fleet.devices.get("rel-nodata").online, timeout=30, what="rel-nodata offline")
        second = fleet.rounds.start(_round())
        assert second.invited == ["rel-a", "rel-b"], second
        wait_for(lambda: fleet.rounds.get(second.id).status in ("succeeded", "failed"), timeout=300,
                 what="round 2 to end")
        # Assert: both devices accepted and trained
        done = fleet.rounds.get(second.id)
        assert done.status == "succeeded", (done.reason, done.skipped)
        assert done.participants == ["rel-a", "rel-b"]
        wait_for(lambda: all(c.status == "ok" for c in _joins(fleet, second.id).values()), timeout=30,
                 what="the agents to leave round 2 on the ServerApp's notice")
    finally:
        for proc in procs.values():
            stop(proc)


def test_a_round_that_too_many_devices_decline_fails_at_once_with_their_reasons(fleet: Fleet,
                                                                                tmp_path: Path) -> None:
    # Prepare: one agent with data, two without
    procs = _agents(fleet, tmp_path, with_data=["dec-a"], without_data=["dec-b", "dec-c"])
    try:
        # Execute
        started = fleet.rounds.start(_round())
        wait_for(lambda: fleet.rounds.get(started.id).status == "failed", timeout=60,
                 what="the round to fail (not after the 90 s discovery timeout)")
        # Assert: the reason names who declined and why; the device that accepted is released
        record = fleet.rounds.get(started.id)
        assert record.reason is not None
        assert record.reason.startswith("only 1 of 3 invited device(s) accepted the invitation, min_clients is 2")
        assert "dec-b: no training data at" in record.reason and "left out: none" not in record.reason
        assert record.skipped["dec-c"].startswith("declined the invitation: no training data at")
        wait_for(lambda: _joins(fleet, started.id)["dec-a"].status != "pending", timeout=30,
                 what="dec-a to leave the round")
    finally:
        for proc in procs.values():
            stop(proc)


def test_a_round_in_which_every_client_raised_releases_its_devices(fleet: Fleet, tmp_path: Path) -> None:
    # Prepare: two agents whose local data cannot be trained on
    procs = _agents(fleet, tmp_path, with_data=["raise-a", "raise-b"], without_data=[], unusable_data=True)
    try:
        # Execute
        started = fleet.rounds.start(_round())
        wait_for(lambda: fleet.rounds.get(started.id).status == "failed", timeout=240, what="the round to fail")
        # Assert: it says why, and both devices left the round at once (its time budget is 150 s)
        record = fleet.rounds.get(started.id)
        assert record.reason is not None and "round 1" in record.reason, record.reason
        wait_for(lambda: all(c.status != "pending" for c in _joins(fleet, started.id).values()), timeout=30,
                 what="the agents to leave the failed round")
        # ... on the ServerApp's own end-of-run notice (a device whose ClientApp raised is alive: it is told too)
        assert all(c.status == "ok" for c in _joins(fleet, started.id).values()), _joins(fleet, started.id)
    finally:
        for proc in procs.values():
            stop(proc)


def test_stopping_the_control_plane_leaves_no_release_thread_behind(fleet: Fleet, tmp_path: Path) -> None:
    # Prepare: a completed round whose device has not left on the ServerApp's notice yet: the background release
    # gives it FINISH_GRACE_S first
    from controlplane.rounds.runner import FINISH_GRACE_S, FlowerRoundRunner

    fleet.devices.enroll(DeviceCreate(device_id="rel-late", profile="raspberry-pi-5"))
    runner = FlowerRoundRunner(tmp_path / "flower", fleet.devices)
    join = fleet.devices.send_command("rel-late", CommandCreate(kind="join_round", args={"round_id": "7"}, wait_s=0))
    release = threading.Thread(target=runner._release_in_background, args=(7, {"rel-late": join.command_id}))
    runner._releases.add(release)
    release.start()
    # Execute: the control plane stops meanwhile
    started = time.monotonic()
    runner.stop()
    # Assert: the thread ended with the stop (it used to outlive it and hit a database that was gone), and sent no
    # leave that would wait in the device's broker session for a later round with the same id
    assert time.monotonic() - started < FINISH_GRACE_S / 2 and not release.is_alive()
    with Session(fleet.engine) as session:
        sent = [c.args for c in session.exec(select(CommandRecord).where(CommandRecord.device_id == "rel-late"))]
    assert sent == [{"round_id": "7"}]


def _supernodes(device_id: str) -> list[psutil.Process]:
    """The flower-supernode processes of one device (its id is in their node config)."""
    found = []
    for process in psutil.process_iter():
        try:
            cmdline = process.cmdline()
            if any("flower-supernode" in part for part in cmdline) and f"device-id='{device_id}'" in " ".join(cmdline):
                found.append(process)
        except psutil.Error:
            continue
    return found


def test_a_stopped_agent_leaves_no_supernode_behind(fleet: Fleet, tmp_path: Path) -> None:
    # Prepare: two agents in a round with a long time budget
    procs = _agents(fleet, tmp_path, with_data=["stop-a", "stop-b"], without_data=[])
    try:
        fleet.rounds.start(_round(round_timeout_s=300.0))
        # Positive control: the device's SuperNode is running (there is something that could be left behind)
        wait_for(lambda: bool(_supernodes("stop-a")), timeout=120, what="stop-a's SuperNode")
        agent = procs.pop("stop-a")
        # Execute: the agent is stopped (systemd's SIGTERM) while its round runs
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=30)
        # Assert: it stopped its SuperNode (and its ClientApp executor) before it exited
        assert agent.returncode == 0
        assert _supernodes("stop-a") == [], "a SuperNode outlived its agent"
    finally:
        for proc in procs.values():
            stop(proc)
        for process in _supernodes("stop-a") + _supernodes("stop-b"):
            process.kill()
