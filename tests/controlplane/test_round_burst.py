"""A round's burst step: validated up front, linked round → job → model, and not lost across a restart."""

from __future__ import annotations

from pathlib import Path

import pytest
from litestar.testing import TestClient
from sqlmodel import Session

from controlplane.app import create_app
from controlplane.auth import Role, create_token
from controlplane.burst.schemas import JobCreate, JobKind, Placement
from controlplane.db import RoundRecord, utcnow
from controlplane.devices.schemas import DeviceCreate
from controlplane.rounds.schemas import Strategy
from controlplane.statuses import RoundStatus
from controlplane.wiring import Fleet
from tests._services import fleet_settings, fx_fleet, wait_for  # noqa: F401 - fx_fleet
from tests.controlplane.test_build_registry import fx_weights  # noqa: F401 - the trained weights fixture

pytestmark = pytest.mark.integration


def test_a_burst_step_that_cannot_run_is_refused_with_the_reason(fleet: Fleet) -> None:
    # Prepare
    _, token = create_token(fleet.engine, Role.OPERATOR)
    auth = {"Authorization": f"Bearer {token}"}
    with TestClient(app=create_app(fleet=fleet)) as client:
        # Execute
        local_gpu = client.post("/api/v1/rounds", headers=auth, json={
            "burst": {"kind": "qat", "placement": "local", "resources": {"gpus": 1}}})
        bad_kind = client.post("/api/v1/schedules", headers=auth, json={
            "cron": "0 2 * * *", "round": {"burst": {"kind": "pretrain"}}})
        unknown_field = client.post("/api/v1/schedules", headers=auth, json={
            "cron": "0 2 * * *", "round": {"burst": {"kind": "qat", "gpus": 1}}})
        ok = client.post("/api/v1/schedules", headers=auth, json={
            "id": "nightly-qat", "cron": "0 2 * * *", "round": {"burst": {"kind": "qat", "epochs": 3}}})
        listed = client.get("/api/v1/schedules", headers=auth)
    # Assert
    assert local_gpu.status_code == 400
    assert "burst: placement=local cannot provide 1 GPU" in local_gpu.json()["detail"]
    assert bad_kind.status_code == 400 and "pretrain" in str(bad_kind.json())
    assert unknown_field.status_code == 400 and "gpus" in str(unknown_field.json())
    assert ok.status_code == 201, ok.text
    (schedule,) = listed.json()
    assert schedule["round"]["burst"]["kind"] == "qat" and schedule["round"]["burst"]["epochs"] == 3


def running_round(fleet: Fleet, job_id: int | None = None) -> int:
    """A round record as the round thread leaves it while it runs (or waits on its burst job)."""
    with Session(fleet.engine) as session:
        record = RoundRecord(task="digits", strategy=Strategy.FEDAVG, config={}, status=RoundStatus.RUNNING,
                             job_id=job_id, created_at=utcnow())
        session.add(record)
        session.commit()
        assert record.id is not None
        return record.id


@pytest.mark.slow
def test_a_round_waiting_on_its_burst_job_completes_after_a_restart(mosquitto_url: str, tmp_path: Path,
                                                                    weights: Path) -> None:
    # Prepare: one round cut off in its Flower run, one waiting on its QAT job, when the control plane stops
    settings = fleet_settings(mosquitto_url, tmp_path / "cp")
    first = Fleet(settings).start()
    first.devices.enroll(DeviceCreate(device_id="coral", profile="coral-dev-board"))
    cut_off = running_round(first)
    waiting = running_round(first)
    job = first.jobs.submit(JobCreate(kind=JobKind.QAT, epochs=3, placement=Placement.LOCAL), base_weights=weights,
                            round_id=waiting)
    with Session(first.engine) as session:
        record = session.get(RoundRecord, waiting)
        assert record is not None
        record.job_id = job.id
        session.add(record)
        session.commit()
    first.stop()
    # Execute
    second = Fleet(settings).start()
    try:
        wait_for(lambda: second.rounds.get(waiting).status != "running", timeout=240, what="round done")
        # Assert: the round finished with its job's model; the other one is failed, not left running
        done, job_done = second.rounds.get(waiting), second.jobs.get(job.id)
        assert job_done.status == "succeeded", (job_done.reason, job_done.logs_tail[-500:])
        assert done.status == "succeeded", done.reason
        assert done.job_id == job.id and job_done.round_id == waiting
        assert done.model_version == job_done.model_version == f"round-{waiting}-qat"
        model = second.models.get(done.model_version)
        assert (model.source_kind, model.source_id) == ("burst", str(job.id))
        cut = second.rounds.get(cut_off)
        assert cut.status == "failed" and cut.reason == "the control plane restarted during the Flower run"
        assert cut.finished_at is not None
    finally:
        second.stop()
