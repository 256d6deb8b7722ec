"""Burst jobs: placement policy, local and Ray backends, timeouts on missing resources, cancel, results → models."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from litestar.testing import TestClient

from controlplane._errors import InvalidInput
from controlplane.app import create_app
from controlplane.auth import Role, create_token
from controlplane.burst.backends import _is_worker
from controlplane.burst.schemas import JobCreate, JobKind, Placement, Resources
from controlplane.burst.service import decide_placement
from controlplane.devices.schemas import DeviceCreate
from controlplane.settings import Settings
from controlplane.wiring import Fleet
from tests._services import fleet_settings, free_port, wait_for

BUDGETS = {"ram_budget_mb": 2048, "max_samples": 20000}


def test_placement_policy() -> None:
    # Execute / Assert
    gpu = decide_placement(JobCreate(kind=JobKind.FINETUNE, resources=Resources(gpus=1)), {"memory_mb": 10}, BUDGETS)
    assert gpu == ("burst", "asks for accelerators (1 GPU)")
    big = decide_placement(JobCreate(kind=JobKind.DISTILL), {"memory_mb": 9000, "samples": 100}, BUDGETS)
    assert big[0] == "burst" and "9000 MB" in big[1] and "2048 MB" in big[1]
    small = decide_placement(JobCreate(kind=JobKind.QAT), {"memory_mb": 20, "samples": 1400}, BUDGETS)
    assert small[0] == "local" and "fit" in small[1]
    no_devices = decide_placement(JobCreate(kind=JobKind.QAT), {"memory_mb": 20, "samples": 1400},
                                  {"ram_budget_mb": 0, "max_samples": 0})
    assert no_devices[0] == "burst"
    with pytest.raises(InvalidInput, match="cannot provide 1 GPU"):
        decide_placement(JobCreate(kind=JobKind.QAT, placement=Placement.LOCAL, resources=Resources(gpus=1)),
                         {"memory_mb": 1}, BUDGETS)


@pytest.fixture(name="fleet")
def fx_fleet(mosquitto_url: str, tmp_path: Path) -> Iterator[Fleet]:
    fleet = Fleet(fleet_settings(mosquitto_url, tmp_path / "cp")).start()
    fleet.devices.enroll(DeviceCreate(device_id="pi5", profile="raspberry-pi-5"))
    yield fleet
    for job in fleet.jobs.list_all():  # local workers outlive the control plane by design: end the tests' own
        if job.status in ("queued", "running"):
            fleet.jobs.cancel(job.id)
    fleet.stop()


@pytest.mark.integration
@pytest.mark.slow
def test_local_job_builds_a_model_version(fleet: Fleet) -> None:
    # Execute
    job = fleet.jobs.submit(JobCreate(kind=JobKind.FINETUNE, epochs=15))
    wait_for(lambda: fleet.jobs.get(job.id).status not in ("queued", "running"), timeout=120, what="job done")
    # Assert
    done = fleet.jobs.get(job.id)
    assert done.placement == "local", done.placement_reason
    assert done.status == "succeeded", (done.reason, done.logs_tail[-500:])
    assert done.metrics["accuracy"] > 0.9
    assert done.progress.get("epoch") is not None
    model = fleet.models.get(done.model_version or "")
    assert model.status == "ready" and model.source_kind == "burst" and model.source_id == str(job.id)


needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed")


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("placement", [Placement.LOCAL, pytest.param(Placement.BURST, marks=needs_ray)])
def test_cancel_a_running_job(fleet: Fleet, placement: Placement) -> None:
    # Prepare
    job = fleet.jobs.submit(JobCreate(kind=JobKind.FINETUNE, epochs=5000, time_budget_s=600, placement=placement))
    wait_for(lambda: fleet.jobs.get(job.id).progress.get("epoch") is not None, timeout=120, what="job training")
    backend_id = fleet.jobs.get(job.id).backend_job_id or ""
    if placement is Placement.BURST:  # progress came over the Jobs API's log stream, not full re-fetches
        tail = fleet.jobs.backends["burst"]._tails[backend_id]  # type: ignore[attr-defined]
        assert not tail.failed and "EDGEFLEET_PROGRESS" in tail.text
    # Execute
    cancelled = fleet.jobs.cancel(job.id)
    # Assert: recorded as cancelled, and the worker really stopped: it ended its step, kept its checkpoint and
    # exported no weights
    assert cancelled.status == "cancelled" and cancelled.reason == "cancelled by an operator"
    backend = fleet.jobs.backends[str(placement)]
    wait_for(lambda: backend.status(cancelled.backend_job_id or "") in ("STOPPED", "FAILED"), timeout=60,
             what="worker stopped")
    out_dir = Path(fleet.settings.data_dir) / "jobs" / f"job-{job.id}"
    result = json.loads((out_dir / "result.json").read_text())
    assert result["status"] == "cancelled" and result["checkpoint"] and result["epochs_done"] < 5000
    assert not (out_dir / "weights.npz").exists()
    fleet.jobs.step()  # a service step later (run here, not hoped for during a sleep), the record is unchanged
    assert fleet.jobs.get(job.id).status == "cancelled" and fleet.jobs.get(job.id).model_version is None


def test_invalid_jobs_are_400(fleet: Fleet) -> None:
    _, token = create_token(fleet.engine, Role.OPERATOR)
    auth = {"Authorization": f"Bearer {token}"}
    with TestClient(app=create_app(fleet=fleet)) as client:
        bad_kind = client.post("/api/v1/jobs", headers=auth, json={"kind": "pretrain"})
        bad_task = client.post("/api/v1/jobs", headers=auth, json={"kind": "qat", "task": "nope"})
        missing = client.get("/api/v1/jobs/999", headers=auth)
    assert bad_kind.status_code == 400 and "kind" in str(bad_kind.json())
    assert bad_task.status_code == 400 and "unknown task 'nope'" in bad_task.json()["detail"]
    assert missing.status_code == 404


@needs_ray
@pytest.mark.integration
@pytest.mark.slow
def test_burst_jobs_on_local_ray(fleet: Fleet) -> None:
    # Execute: a CPU job placed on the burst backend, and one asking for a GPU this cluster does not have
    started = time.monotonic()
    cpu = fleet.jobs.submit(JobCreate(kind=JobKind.QAT, epochs=10, placement=Placement.BURST))
    answered_s = time.monotonic() - started  # while the local head starts in the background
    gpu = fleet.jobs.submit(JobCreate(kind=JobKind.FINETUNE, resources=Resources(gpus=1), pending_timeout_s=10))
    assert cpu.status == "queued" and cpu.backend_job_id is None, answered_s  # answered before the head is up
    wait_for(lambda: all(fleet.jobs.get(j.id).status not in ("queued", "running") for j in (cpu, gpu)),
             timeout=240, what="both jobs done")
    # Assert
    done = fleet.jobs.get(cpu.id)
    assert done.placement == "burst" and done.backend_job_id
    assert done.status == "succeeded", (done.reason, done.logs_tail[-800:])
    assert fleet.models.get(done.model_version or "").status == "ready"
    starved = fleet.jobs.get(gpu.id)
    assert starved.status == "timed_out"
    assert "GPU" in starved.placement_reason and "lacks these resources" in (starved.reason or "")


@needs_ray
@pytest.mark.integration
@pytest.mark.slow
def test_another_ray_on_this_machine_does_not_take_our_heads_ports(fleet: Fleet, tmp_path: Path) -> None:
    # Prepare: somebody else's Ray head on Ray's default ports (agent 52365, client 10001, ...)
    temp, dashboard = Path(tempfile.mkdtemp(prefix="foreign-ray-")), free_port()
    foreign = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
                                f"--port={free_port()}", f"--dashboard-port={dashboard}", "--num-cpus=1",
                                f"--temp-dir={temp}", "--disable-usage-stats"],
                               env=dict(os.environ, RAY_TMPDIR=str(temp)), start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _http_ok(f"http://127.0.0.1:{dashboard}/api/version"), timeout=90, what="foreign head up")
        # Execute
        job = fleet.jobs.submit(JobCreate(kind=JobKind.FINETUNE, epochs=5, placement=Placement.BURST))
        wait_for(lambda: fleet.jobs.get(job.id).status not in ("queued", "running"), timeout=180, what="job done")
    finally:
        os.killpg(foreign.pid, signal.SIGKILL)
        foreign.wait()
    # Assert
    done = fleet.jobs.get(job.id)
    assert done.status == "succeeded", (done.reason, done.logs_tail[-800:])


@needs_ray
@pytest.mark.integration
@pytest.mark.slow
def test_a_burst_job_cancelled_while_being_submitted_never_runs(fleet: Fleet) -> None:
    # Execute: cancelled before the (starting) head has taken it
    job = fleet.jobs.submit(JobCreate(kind=JobKind.FINETUNE, epochs=2000, placement=Placement.BURST))
    cancelled = fleet.jobs.cancel(job.id)
    wait_for(lambda: fleet.jobs.get(job.id).backend_job_id is not None, timeout=120, what="submission done")
    # Assert: still cancelled, and the submission that arrived after the cancel was stopped
    backend, backend_id = fleet.jobs.backends["burst"], fleet.jobs.get(job.id).backend_job_id or ""
    wait_for(lambda: backend.status(backend_id) in ("STOPPED", "FAILED"), timeout=60, what="Ray job stopped")
    assert cancelled.status == fleet.jobs.get(job.id).status == "cancelled"


@pytest.mark.integration
@pytest.mark.slow
def test_a_running_job_is_reattached_after_a_restart(mosquitto_url: str, tmp_path: Path) -> None:
    # Prepare: a job running when its control plane stops
    settings = fleet_settings(mosquitto_url, tmp_path / "cp")
    first = Fleet(settings).start()
    first.devices.enroll(DeviceCreate(device_id="pi5", profile="raspberry-pi-5"))
    job = first.jobs.submit(JobCreate(kind=JobKind.FINETUNE, epochs=100))
    wait_for(lambda: first.jobs.get(job.id).status == "running", timeout=60, what="job running")
    first.stop()
    # Execute
    second = Fleet(settings).start()
    try:
        wait_for(lambda: second.jobs.get(job.id).status not in ("queued", "running"), timeout=180, what="job done")
        # Assert: the same worker finished it (not forgotten, not started over)
        done = second.jobs.get(job.id)
        assert done.status == "succeeded", (done.reason, done.logs_tail[-500:])
        assert done.model_version is not None
    finally:
        second.stop()


@needs_ray
@pytest.mark.integration
@pytest.mark.slow
def test_a_ray_job_cut_off_by_a_restart_resumes_from_its_checkpoint(mosquitto_url: str, tmp_path: Path) -> None:
    # Prepare: a Ray job training on the local head when the control plane (and so its head) stops
    settings = fleet_settings(mosquitto_url, tmp_path / "cp")
    first = Fleet(settings).start()
    job = first.jobs.submit(JobCreate(kind=JobKind.FINETUNE, epochs=2000, placement=Placement.BURST))
    wait_for(lambda: int(first.jobs.get(job.id).progress.get("step") or 0) > 200, timeout=120,
             what="job past a checkpoint")
    first.stop()
    out_dir = Path(settings.data_dir) / "jobs" / f"job-{job.id}"
    # the head's end orphans nothing: the worker was stopped first, and checkpointed
    assert not [p for p in Path("/proc").glob("[0-9]*") if _is_worker(int(p.name), out_dir)]
    cut = json.loads((out_dir / "result.json").read_text())
    assert cut["status"] == "cancelled" and cut["checkpoint"]
    # Execute
    second = Fleet(settings).start()
    try:
        wait_for(lambda: second.jobs.get(job.id).status not in ("queued", "running"), timeout=240, what="job done")
        # Assert: re-submitted to the new head, resumed where the checkpoint was, finished with a model
        done = second.jobs.get(job.id)
        assert done.status == "succeeded", (done.reason, done.logs_tail[-800:])
        assert done.metrics["resumed_from_step"] and done.metrics["resumed_from_step"] >= 50
        assert done.model_version is not None
        assert done.metrics["resumed_from_step"] == cut["steps"]
    finally:
        second.stop()



@needs_ray
@pytest.mark.integration
@pytest.mark.slow
def test_after_a_crash_the_local_ray_head_is_adopted_and_its_job_reattached(tmp_path: Path) -> None:
    # Prepare: `edgefleet controlplane serve` running a Ray job, then killed -9 (its Ray head lives on)
    data_dir, port = tmp_path / "cp", free_port()
    cli = [sys.executable, "-m", "controlplane._entry"]
    token = subprocess.run([*cli, "tokens", "create", "--role", "operator", "--data-dir", str(data_dir),
                            "--create"],
                           check=True, capture_output=True, text=True).stdout.split()[0]
    server = subprocess.Popen([*cli, "controlplane", "serve", "--port", str(port), "--data-dir", str(data_dir),
                               "--embedded-broker-port", str(free_port()), "--log-level", "warning"],
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        api = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token}"},
                           timeout=30)
        wait_for(lambda: _http_ok(f"http://127.0.0.1:{port}/healthz"), timeout=60, what="control plane up")
        job = api.post("/api/v1/jobs", json={"kind": "finetune", "epochs": 1500, "placement": "burst"}).json()
        wait_for(lambda: api.get(f"/api/v1/jobs/{job['id']}").json()["progress"].get("epoch"), timeout=120,
                 what="job training")
        job = api.get(f"/api/v1/jobs/{job['id']}").json()
    except BaseException:
        _kill_head(data_dir)
        raise
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    head = json.loads((data_dir / "ray" / "head.json").read_text())
    # Execute
    fleet = Fleet(Settings(data_dir=data_dir, embedded_broker_port=free_port())).start()
    try:
        wait_for(lambda: fleet.jobs.get(job["id"]).status not in ("queued", "running"), timeout=240,
                 what="job done")
        # Assert: the same head, the same worker, never interrupted
        done = fleet.jobs.get(job["id"])
        assert done.status == "succeeded", (done.reason, done.logs_tail[-800:])
        assert done.backend_job_id == job["backend_job_id"] and done.metrics["resumed_from_step"] is None
        assert json.loads((data_dir / "ray" / "head.json").read_text())["pid"] == head["pid"]
    finally:
        fleet.stop()
        _kill_head(data_dir)  # only if the test failed before the fleet stopped it
    assert not (data_dir / "ray" / "head.json").exists() and not Path(f"/proc/{head['pid']}").exists()


def _kill_head(data_dir: Path) -> None:
    with contextlib.suppress(OSError, ValueError, KeyError):
        os.killpg(int(json.loads((data_dir / "ray" / "head.json").read_text())["pid"]), signal.SIGKILL)


def _http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False



def test_ray_workers_get_the_task_allow_list(monkeypatch: pytest.MonkeyPatch) -> None:
    # A remote Ray cluster does not inherit the control plane's environment: the job's runtime_env carries it.
    from controlplane.burst.backends import _worker_env

    monkeypatch.setenv("EDGEFLEET_TASKS", "vib=mypkg.vibration:VibrationTask")
    with_list = _worker_env()
    monkeypatch.delenv("EDGEFLEET_TASKS")
    assert with_list["EDGEFLEET_TASKS"] == "vib=mypkg.vibration:VibrationTask"
    assert "EDGEFLEET_TASKS" not in _worker_env()
