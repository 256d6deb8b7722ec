"""Rounds and schedules through the API: validation, eligibility in the record, persistence across restarts."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from litestar.testing import TestClient
from sqlmodel import Session

from controlplane.app import create_app
from controlplane.auth import Role, create_token
from controlplane.db import Device
from controlplane.devices.schemas import DeviceCreate
from controlplane.settings import Settings
from controlplane.wiring import Fleet
from tests._services import fleet_settings

pytestmark = pytest.mark.integration


def settings_for(mosquitto_url: str, database_url: str, tmp_path: Path) -> Settings:
    return fleet_settings(mosquitto_url, tmp_path / "cp", database_url)


@pytest.fixture(name="fleet")
def fx_fleet(mosquitto_url: str, database_url: str, tmp_path: Path) -> Iterator[Fleet]:
    fleet = Fleet(settings_for(mosquitto_url, database_url, tmp_path)).start()
    yield fleet
    fleet.stop()


def report(fleet: Fleet, device_id: str, **power: object) -> None:
    """Set a device's presence and latest telemetry as ingest would."""
    with Session(fleet.engine) as session:
        device = session.get(Device, device_id)
        assert device is not None
        device.online = True
        device.last_telemetry = {
            "ts": time.time(), "system": {"cpu_percent": 5.0, "temperature_c": 45.0},
            "power": {"source": "simulated", "power_source": "battery", "battery_percent": 80.0,
                      "charging": False, **power},
            "network": {"source": "simulated", "metered": False},
        }
        session.add(device)
        session.commit()


def test_schedule_validation(fleet: Fleet) -> None:
    # Prepare
    _, token = create_token(fleet.engine, Role.OPERATOR)
    auth = {"Authorization": f"Bearer {token}"}
    with TestClient(app=create_app(fleet=fleet)) as client:
        # Execute
        bad_cron = client.post("/api/v1/schedules", headers=auth, json={"cron": "61 * * * *"})
        both = client.post("/api/v1/schedules", headers=auth, json={"cron": "0 2 * * *", "interval_s": 60})
        neither = client.post("/api/v1/schedules", headers=auth, json={})
        bad_task = client.post("/api/v1/schedules", headers=auth,
                               json={"cron": "0 2 * * *", "round": {"task": "no_such_task"}})
        bad_strategy = client.post("/api/v1/schedules", headers=auth,
                                   json={"cron": "0 2 * * *", "round": {"strategy": "fedsgd"}})
        ok = client.post("/api/v1/schedules", headers=auth,
                         json={"id": "nightly", "cron": "0 2 * * *", "round": {"rounds": 3, "min_clients": 2}})
        again = client.post("/api/v1/schedules", headers=auth, json={"id": "nightly", "cron": "0 3 * * *"})
    # Assert
    assert bad_cron.status_code == 400 and "invalid cron expression '61 * * * *'" in bad_cron.json()["detail"]
    assert both.status_code == 400 and neither.status_code == 400
    assert bad_task.status_code == 400 and "unknown task 'no_such_task'" in bad_task.json()["detail"]
    assert bad_strategy.status_code == 400 and "strategy" in str(bad_strategy.json())
    assert ok.status_code == 201 and ok.json()["next_run_time"] is not None
    assert again.status_code == 409


def test_schedules_survive_a_restart(mosquitto_url: str, database_url: str, tmp_path: Path) -> None:
    # Prepare
    settings = settings_for(mosquitto_url, database_url, tmp_path)
    first = Fleet(settings).start()
    from controlplane.schedules import ScheduleCreate

    created = first.schedules.create(ScheduleCreate(id="every-hour", interval_s=3600))
    first.stop()
    # Execute
    second = Fleet(settings).start()
    try:
        listed = second.schedules.list_all()
        # Assert
        assert [s.id for s in listed] == ["every-hour"]
        assert listed[0].next_run_time == created.next_run_time
        second.schedules.delete("every-hour")
        assert second.schedules.list_all() == []
    finally:
        second.stop()


def test_a_schedule_whose_stored_job_cannot_be_read_back_gets_it_again(mosquitto_url: str, database_url: str,
                                                                      tmp_path: Path) -> None:
    """A job stored when its callable had another module path (before schedules got their own package) is dropped
    by APScheduler when it cannot be read back; the schedule must not silently stop firing."""
    import pickle

    from sqlalchemy import text

    from controlplane.db import create_db_engine
    from controlplane.schedules import ScheduleCreate

    # Prepare: a schedule whose stored job names the old path of its callable
    settings = settings_for(mosquitto_url, database_url, tmp_path)
    first = Fleet(settings).start()
    created = first.schedules.create(ScheduleCreate(id="nightly", cron="0 2 * * *"))
    first.stop()
    engine = create_db_engine(database_url)
    with engine.begin() as conn:
        state = pickle.loads(conn.execute(text("SELECT job_state FROM apscheduler_jobs WHERE id = 'nightly'")).scalar())
        assert state["func"] == "controlplane.schedules.service:fire"
        state["func"] = "controlplane.rounds.scheduler:fire"
        conn.execute(text("UPDATE apscheduler_jobs SET job_state = :s WHERE id = 'nightly'"),
                     {"s": pickle.dumps(state)})
    engine.dispose()
    # Execute
    second = Fleet(settings).start()
    try:
        # Assert: the job is back, naming the current path, on the same trigger
        job = second.schedules._scheduler.get_job("nightly")
        assert job is not None and job.func_ref == "controlplane.schedules.service:fire"
        assert second.schedules.get("nightly").next_run_time == created.next_run_time
    finally:
        second.stop()


@pytest.mark.slow
def test_interval_schedule_fires_and_records_why_devices_were_skipped(fleet: Fleet) -> None:
    from controlplane.rounds.schemas import RoundCreate
    from controlplane.schedules import ScheduleCreate

    # Prepare: an eligible Pi 5, a Pi Zero off its charger, a Coral (may not train), an offline Pi 4
    for device_id, profile in [("pi5", "raspberry-pi-5"), ("zero", "raspberry-pi-zero-2w"),
                               ("coral", "coral-dev-board"), ("pi4", "raspberry-pi-4")]:
        fleet.devices.enroll(DeviceCreate(device_id=device_id, profile=profile))
    for device_id in ("pi5", "zero", "coral"):
        report(fleet, device_id)
    # Execute
    fleet.schedules.create(ScheduleCreate(id="soon", interval_s=1, max_runs=1,
                                          round=RoundCreate(min_clients=1, build=False)))
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not fleet.rounds.list_all():
        time.sleep(0.2)
    # Assert
    rounds = fleet.rounds.list_all()
    assert len(rounds) == 1 and rounds[0].schedule_id == "soon"
    record = rounds[0]
    assert record.invited == ["pi5"]
    assert "not charging" in record.skipped["zero"]
    assert "may not train" in record.skipped["coral"]
    assert record.skipped["pi4"] == "offline"
    time.sleep(1.5)
    assert len(fleet.rounds.list_all()) == 1  # max_runs=1
    assert fleet.schedules.get("soon").runs == 1


def test_round_with_too_few_eligible_devices_fails_with_the_reason(fleet: Fleet) -> None:
    # Prepare
    _, token = create_token(fleet.engine, Role.OPERATOR)
    fleet.devices.enroll(DeviceCreate(device_id="only", profile="raspberry-pi-5"))
    report(fleet, "only")
    with TestClient(app=create_app(fleet=fleet)) as client:
        # Execute
        created = client.post("/api/v1/rounds", headers={"Authorization": f"Bearer {token}"},
                              json={"min_clients": 2})
        fetched = client.get(f"/api/v1/rounds/{created.json()['id']}", headers={"Authorization": f"Bearer {token}"})
    # Assert
    assert created.status_code == 201
    body = fetched.json()
    assert body["status"] == "failed"
    assert body["reason"] == "1 eligible device(s), min_clients is 2"
    assert body["invited"] == ["only"]
