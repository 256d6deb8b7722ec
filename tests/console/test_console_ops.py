"""The console's rounds, models, deployments and jobs pages (controlplane/console/pages_ops.py).

Seeded through the services and the database (no real Flower round): every page renders what the API's services
hold, escapes what devices and workers wrote, answers malformed and unknown ids with a 400 / 404 page (never a 500,
never the API's JSON), and applies roles to the actions as the API does: an operator starts a round and pauses,
resumes, cancels a deployment; a viewer sees the buttons disabled and a POST is 403.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import pytest
from litestar.testing import TestClient
from sqlmodel import Session, select

from controlplane.app import create_app
from controlplane.auth import Role, create_token
from controlplane.console import COOKIE
from controlplane.db import DeploymentTargetRecord, JobRecord, ModelVersionRecord, RoundRecord, utcnow
from controlplane.deployments.schemas import DeploymentCreate, Targets
from controlplane.devices.schemas import DeviceCreate
from controlplane.schedules import ScheduleCreate
from controlplane.statuses import JobStatus, RoundStatus, TargetStatus
from controlplane.wiring import Fleet
from federated.burst.spec import JobKind
from federated.flower.config import Strategy
from tests._services import fx_fleet  # noqa: F401 - the fleet fixture (mosquitto, SQLite and PostgreSQL)
from tests.console.conftest import ConsoleServer, login, screenshot
from tests.controlplane.test_models_deployments import FakeDevice, register_starter

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = pytest.mark.integration

HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'
STARTER = {"fp32": 0.975, "full-int8": 0.971}


# -- seeding --------------------------------------------------------------------------------------------------
def seed_round(fleet: Fleet, *, status: RoundStatus = RoundStatus.SUCCEEDED, model_version: str | None = None,
               devices: int = 6, reason: str | None = None, schedule_id: str | None = None,
               initial_model: str | None = None, prefix: str = "pi", hostile: str = HOSTILE) -> int:
    """A finished federated run as the round service records it (its metrics as the ServerApp reports them); the
    devices' and workers' words carry `hostile`."""
    ids = [f"{prefix}-{i:02d}" for i in range(devices)]
    invited, participants = ids[: devices - 2], ids[: devices - 3]
    dropped = ids[devices - 3]
    metrics: list[dict[str, Any]] = [{"round": 0, "accuracy": 0.11, "loss": 2.30, "participants": []}]
    for rnd, (acc, loss) in enumerate([(0.62, 1.21), (0.81, 0.64), (0.9, 0.38), (0.93, 0.27)], start=1):
        metrics.append({"round": rnd, "accuracy": acc, "loss": loss, "participants": participants,
                        "dropped": [dropped] if rnd == 2 else [], "duration_s": 4.2 + rnd,
                        "drop_reasons": {dropped: f"no update within 30s {hostile}".strip()} if rnd == 2 else {}})
    with Session(fleet.engine) as session:
        record = RoundRecord(schedule_id=schedule_id, task="digits", strategy=Strategy.FEDAVG,
                             config={"rounds": 4, "min_clients": 2, "initial_model": initial_model},
                             status=status, reason=reason, invited=invited, participants=participants,
                             skipped={ids[-2]: f"battery 12% < 30% {hostile}".strip(), ids[-1]: "offline",
                                      dropped: "dropped out: no update within 30s"},
                             metrics=metrics if status is RoundStatus.SUCCEEDED else metrics[:2],
                             model_version=model_version, created_at=utcnow() - timedelta(minutes=30),
                             finished_at=utcnow() - timedelta(minutes=28))
        session.add(record)
        session.commit()
        assert record.id is not None
        return record.id


def seed_model(fleet: Fleet, version: str, *, source_kind: str, source_id: str) -> None:
    register_starter(fleet, version, STARTER)
    with Session(fleet.engine) as session:
        record = session.get(ModelVersionRecord, version)
        assert record is not None
        record.source_kind, record.source_id = source_kind, source_id
        session.add(record)
        session.commit()


def seed_job(fleet: Fleet, *, status: JobStatus, round_id: int | None = None, model_version: str | None = None,
             epoch: int = 3, hostile: str = HOSTILE) -> int:
    logs = "\n".join(f"EDGEFLEET_PROGRESS {{\"epoch\": {i}, \"loss\": 0.5}} step {i * 50}" for i in range(400))
    with Session(fleet.engine) as session:
        record = JobRecord(kind=JobKind.QAT, task="digits", resources={"gpus": 1.0, "cpus": 4.0}, status=status,
                           reason=None if status is not JobStatus.FAILED else f"worker died {hostile}",
                           placement="burst", placement_reason=f"asks for accelerators (gpus=1) {hostile}".strip(),
                           progress={"epoch": epoch, "epochs": 5, "step": 50 * epoch, "loss": 0.4213, "phase": "qat"},
                           metrics={"accuracy": 0.958, "device": "cuda"}, logs_tail=logs + "\n" + hostile,
                           model_version=model_version, out_dir="/nonexistent", round_id=round_id,
                           created_at=utcnow() - timedelta(minutes=20), started_at=utcnow() - timedelta(minutes=19))
        session.add(record)
        session.commit()
        assert record.id is not None
        return record.id


def enroll(fleet: Fleet, *device_ids: str, profile: str = "raspberry-pi-5") -> None:
    for device_id in device_ids:
        fleet.devices.enroll(DeviceCreate(device_id=device_id, profile=profile, tags=["line-1"]))


def seed_ops(fleet: Fleet) -> dict[str, Any]:
    """Rounds (one that produced a model, one via a burst job, one refused), models with lineage, a deployment
    to offline devices (pending: it stays running), a job, a schedule."""
    enroll(fleet, *(f"pi-{i:02d}" for i in range(6)))
    first = seed_round(fleet, model_version="r1-digits")
    seed_model(fleet, "r1-digits", source_kind="round", source_id=str(first))
    second = seed_round(fleet, model_version="j1-qat", initial_model="r1-digits", schedule_id="nightly")
    job = seed_job(fleet, status=JobStatus.SUCCEEDED, round_id=second, model_version="j1-qat")
    seed_model(fleet, "j1-qat", source_kind="burst", source_id=str(job))
    failed = seed_round(fleet, status=RoundStatus.FAILED, reason=f"1 eligible device(s), min_clients is 2 {HOSTILE}")
    running_job = seed_job(fleet, status=JobStatus.RUNNING)
    deployment = fleet.deployments.create(DeploymentCreate(model_version="j1-qat", targets=Targets(tags=["line-1"]),
                                                           waves=[50.0, 100.0]))
    fleet.schedules.create(ScheduleCreate(id="nightly", cron="0 2 * * *"))
    return {"rounds": (first, second, failed), "job": job, "running_job": running_job,
            "deployment": deployment.id}


# -- clients --------------------------------------------------------------------------------------------------
def console_client(client: TestClient[Any], fleet: Fleet, role: Role) -> str:
    """Log `client` in with a new token of `role` (the console's cookie); returns the CSRF token of its forms."""
    _, token = create_token(fleet.engine, role, name=f"{role}-test")
    client.cookies.set(COOKIE, token)
    page = client.get("/console/rounds")
    assert page.status_code == 200, page.text
    match = re.search(r'name="_csrf_token" value="([^"]+)"', page.text)
    assert match is not None
    return match.group(1)


@pytest.fixture(name="sqlite_fleet")
def fx_sqlite_fleet(mosquitto_url: str, tmp_path: Any) -> Iterator[Fleet]:
    """One database is enough where the SQL is the services' own (the list queries run on both)."""
    from tests._services import clear_retained, fleet_settings

    fleet = Fleet(fleet_settings(mosquitto_url, tmp_path / "cp", f"sqlite:///{tmp_path / 'edgefleet.db'}")).start()
    yield fleet
    device_ids = [d.device_id for d in fleet.devices.find(limit=100_000)]
    fleet.stop()
    clear_retained(mosquitto_url, device_ids)


def assert_escaped(html: str) -> None:
    assert "<script>alert" not in html and "<img src=x" not in html
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in html or "&lt;script&gt;" in html


# -- pages ----------------------------------------------------------------------------------------------------
def test_every_page_shows_the_services_records_escaped(fleet: Fleet) -> None:
    """On SQLite and PostgreSQL: the lists' counts and accuracies come from SQL over the JSON columns."""
    # Prepare
    seeded = seed_ops(fleet)
    first, second, failed = seeded["rounds"]
    with Session(fleet.engine) as session:  # a worker's very long reason
        job = session.get(JobRecord, seeded["job"])
        assert job is not None
        job.placement_reason = "x" * 5000
        session.add(job)
        session.commit()
    with TestClient(app=create_app(fleet=fleet)) as client:
        console_client(client, fleet, Role.VIEWER)
        # Execute
        pages = {path: client.get(path) for path in (
            "/console/rounds", f"/console/rounds/{first}", f"/console/rounds/{failed}", "/console/models",
            "/console/models/r1-digits", "/console/models/j1-qat", "/console/deployments",
            f"/console/deployments/{seeded['deployment']}", f"/console/deployments/{seeded['deployment']}/live",
            "/console/jobs", f"/console/jobs/{seeded['job']}", f"/console/jobs/{seeded['running_job']}",
            f"/console/rounds/{first}/live")}
        rounds_again = client.get("/console/rounds").text  # finished rounds' counts now from the app's cache
    # Assert
    for path, page in pages.items():
        assert page.status_code == 200, (path, page.text[:500])
        assert page.headers["content-type"].startswith("text/html"), path
    rounds = pages["/console/rounds"].text
    row = re.search(rf'href="/console/rounds/{first}">#{first}</a>.*?</tr>', rounds, re.DOTALL)
    assert row is not None
    cells = re.findall(r'<td class="num">([^<]*)</td>', row.group(0))
    assert cells == ["4", "3", "3", "93.00 %"], cells  # invited, participants, skipped, last round's accuracy
    assert "nightly" in rounds and "cron <code>0 2 * * *</code>" in rounds  # the schedule and its next fire time
    assert re.search(r"<time datetime=\"[0-9-]+T02:00:00\+00:00\">", rounds)
    assert_escaped(rounds)
    assert rounds_again == rounds
    assert pages[f"/console/rounds/{first}/live"].headers.get("hx-refresh") == "true"  # finished: reload the page
    detail = pages[f"/console/rounds/{first}"].text
    assert 'id="round-chart-data"' in detail and '"accuracy": [0.11, 0.62, 0.81, 0.9, 0.93]' in detail
    assert "/console/static/vendor/uplot/uPlot.iife.min.js" in detail
    assert 'href="/console/models/r1-digits"' in detail  # the model it produced
    assert "pi-03" in detail and "no update within 30s" in detail  # dropped, with the ServerApp's reason
    assert "offline" in detail and "battery 12%" in detail  # skipped, by reason
    assert_escaped(detail)
    assert_escaped(pages[f"/console/rounds/{failed}"].text)
    assert "min_clients is 2" in pages[f"/console/rounds/{failed}"].text
    models = pages["/console/models"].text
    assert "2 / 1" in models and "97.50 %" in models  # published / rejected, best published accuracy
    assert f'href="/console/rounds/{first}">round {first}</a>' in models
    lineage = pages["/console/models/j1-qat"].text
    assert ('href="/console/models/r1-digits">r1-digits</a> →' in lineage
            and f'href="/console/rounds/{second}">round #{second}</a>' in lineage
            and f'href="/console/jobs/{seeded["job"]}">qat job {seeded["job"]}</a>' in lineage)  # round → job → model
    assert "rejected" in lineage and "accuracy 0.90 is 7.5 points below fp32" in lineage  # the gate's verdict
    assert f'href="/console/deployments/{seeded["deployment"]}"' in lineage
    deployments = pages["/console/deployments"].text
    assert "0 / 6" in deployments  # none of the six (offline) devices done
    deployment = pages[f"/console/deployments/{seeded['deployment']}"].text
    assert 'hx-trigger="every 2s"' in deployment and "/console/static/vendor/htmx/htmx.min.js" in deployment
    assert deployment.count('data-device="') == 6 and "disabled" in deployment  # a viewer's buttons
    live = pages[f"/console/deployments/{seeded['deployment']}/live"].text
    assert live.lstrip().startswith("{#") is False and "<html" not in live and 'id="deployment-live"' in live
    jobs = pages["/console/jobs"].text
    assert "epoch 3 / 5 · step 150 · loss 0.4213 · qat" in jobs
    assert "x" * 299 + "…" in jobs and "x" * 301 not in jobs  # cut in the list
    assert_escaped(jobs)
    job = pages[f"/console/jobs/{seeded['job']}"].text
    assert job.count("EDGEFLEET_PROGRESS") == 199 and "step 19950" in job  # the bounded tail of the log
    assert_escaped(job)
    assert 'hx-trigger="every 3s"' in pages[f"/console/jobs/{seeded['running_job']}"].text
    assert "hx-trigger" not in job  # a finished job is not polled


def test_malformed_and_unknown_ids_are_400_and_404_pages(sqlite_fleet: Fleet) -> None:
    fleet = sqlite_fleet
    seeded = seed_ops(fleet)
    with TestClient(app=create_app(fleet=fleet)) as client:
        console_client(client, fleet, Role.VIEWER)
        # Execute
        answers = {path: client.get(path) for path in (
            "/console/rounds/abc", "/console/rounds/-1", "/console/rounds/0", "/console/rounds/99999",
            "/console/rounds/" + "9" * 40, "/console/rounds/" + "9" * 5000, "/console/rounds/%C2%B2",
            "/console/models/nope", "/console/models/-rm%20-rf", "/console/models/" + "a" * 300,
            "/console/deployments/x1", "/console/deployments/4242", "/console/deployments/4242/live",
            f"/console/deployments/{seeded['deployment']}?offset=-1",
            f"/console/deployments/{seeded['deployment']}?offset=abc",
            f"/console/deployments/{seeded['deployment']}?offset=" + "9" * 30,
            f"/console/deployments/{seeded['deployment']}?status=bogus",
            "/console/jobs/1e3", "/console/jobs/777", "/console/jobs?offset=-5", "/console/rounds?offset=x",
            "/console/models/99", "/console/models/" + "9" * 12)}
        by_release = client.get("/console/models/2", follow_redirects=False)
    # Assert
    expected = {"/console/rounds/abc": 400, "/console/rounds/-1": 400, "/console/rounds/0": 404,
                "/console/rounds/99999": 404, "/console/models/nope": 404, "/console/models/-rm%20-rf": 400,
                "/console/deployments/x1": 400, "/console/deployments/4242": 404,
                "/console/deployments/4242/live": 404, "/console/jobs/1e3": 400, "/console/jobs/777": 404, "/console/models/99": 404}
    for path, answer in answers.items():
        assert 400 <= answer.status_code < 500, (path[:80], answer.status_code, answer.text[:300])
        assert answer.headers["content-type"].startswith("text/html"), path[:80]
        if path in expected:
            assert answer.status_code == expected[path], (path, answer.status_code)
    assert by_release.status_code == 303 and by_release.headers["location"] == "/console/models/j1-qat"
    assert "no round 99999" in answers["/console/rounds/99999"].text
    assert "not a round id: &#39;abc&#39;" in answers["/console/rounds/abc"].text
    assert "no model version &#39;nope&#39;" in answers["/console/models/nope"].text


def test_roles_apply_to_the_actions_as_to_the_api(sqlite_fleet: Fleet) -> None:
    fleet = sqlite_fleet
    seeded = seed_ops(fleet)
    deployment = seeded["deployment"]
    with TestClient(app=create_app(fleet=fleet)) as viewer, TestClient(app=create_app(fleet=fleet)) as operator, \
            TestClient(app=create_app(fleet=fleet)) as anonymous:
        viewer_csrf = console_client(viewer, fleet, Role.VIEWER)
        operator_csrf = console_client(operator, fleet, Role.OPERATOR)
        # Execute: what each sees and may do
        viewer_page = viewer.get("/console/rounds").text
        operator_page = operator.get("/console/rounds").text
        refused = viewer.post("/console/rounds", data={"_csrf_token": viewer_csrf, "task": "digits"},
                              follow_redirects=False)
        refused_pause = viewer.post(f"/console/deployments/{deployment}/pause", data={"_csrf_token": viewer_csrf},
                                    follow_redirects=False)
        no_csrf = operator.post("/console/rounds", data={"task": "digits"}, follow_redirects=False)
        not_logged_in = anonymous.get("/console/deployments", follow_redirects=False)
        rounds_before = len(fleet.rounds.list_all())
        bad = operator.post("/console/rounds", data={"_csrf_token": operator_csrf, "task": "digits", "rounds": "0"},
                            follow_redirects=False)
        twice = operator.post("/console/rounds", data={"_csrf_token": operator_csrf, "task": ["digits", "digits"]},
                              follow_redirects=False)
        unknown_task = operator.post("/console/rounds", data={"_csrf_token": operator_csrf, "task": "nope"},
                                     follow_redirects=False)
        started = operator.post("/console/rounds", data={"_csrf_token": operator_csrf, "task": "digits",
                                                         "strategy": "fedprox", "rounds": "2", "min_clients": "2",
                                                         "build": "on"}, follow_redirects=False)
        round_page = operator.get(started.headers["location"])
        paused = operator.post(f"/console/deployments/{deployment}/pause", data={"_csrf_token": operator_csrf},
                               follow_redirects=False)
        paused_page = operator.get(f"/console/deployments/{deployment}").text
        resumed = operator.post(f"/console/deployments/{deployment}/resume", data={"_csrf_token": operator_csrf},
                                follow_redirects=False)
        cancelled = operator.post(f"/console/deployments/{deployment}/cancel", data={"_csrf_token": operator_csrf},
                                  follow_redirects=False)
        again = operator.post(f"/console/deployments/{deployment}/cancel", data={"_csrf_token": operator_csrf},
                              follow_redirects=False)
        no_such_action = operator.post(f"/console/deployments/{deployment}/delete",
                                       data={"_csrf_token": operator_csrf}, follow_redirects=False)
        job_cancelled = operator.post(f"/console/jobs/{seeded['running_job']}/cancel",
                                      data={"_csrf_token": operator_csrf}, follow_redirects=False)
    # Assert: a viewer sees the form disabled and is refused; the operator's actions go through the services
    assert re.search(r'<fieldset\s+disabled>', viewer_page) and "needs the operator role" in viewer_page
    assert not re.search(r'<fieldset\s+disabled>', operator_page)
    assert refused.status_code == 403 and "operator" in refused.text
    assert refused_pause.status_code == 403
    assert no_csrf.status_code == 403
    assert not_logged_in.status_code in (302, 303) and "/console/login" in not_logged_in.headers["location"]
    assert bad.status_code == 400 and "rounds" in bad.text and "&gt;= 1" in bad.text
    assert unknown_task.status_code == 400 and "unknown task" in unknown_task.text
    assert twice.status_code == 400 and "given more than once" in twice.text
    assert started.status_code == 303
    created = fleet.rounds.list_all()[0]
    assert len(fleet.rounds.list_all()) == rounds_before + 1 and created.strategy == "fedprox"
    assert started.headers["location"] == f"/console/rounds/{created.id}"
    # no device is online: the service's own reason is on the page
    assert created.status == "failed" and "0 eligible device(s), min_clients is 2" in round_page.text
    assert paused.status_code == 303 and "paused by an operator" in paused_page and ">Resume</button>" in paused_page
    assert resumed.status_code == 303 and cancelled.status_code == 303
    assert fleet.deployments.get(deployment).status == "cancelled"
    assert again.status_code == 409 and "already cancelled" in again.text
    assert no_such_action.status_code == 404
    assert job_cancelled.status_code == 303 and fleet.jobs.get(seeded["running_job"]).status == "cancelled"


def test_list_pages_paginate(sqlite_fleet: Fleet) -> None:
    fleet = sqlite_fleet
    ids = [seed_round(fleet) for _ in range(30)]
    with TestClient(app=create_app(fleet=fleet)) as client:
        console_client(client, fleet, Role.VIEWER)
        first = client.get("/console/rounds").text
        second = client.get("/console/rounds?offset=25").text
    assert "1–25 of 30" in first and 'href="/console/rounds?offset=25"' in first
    assert f'href="/console/rounds/{ids[-1]}"' in first and f'href="/console/rounds/{ids[0]}"' not in first
    assert "26–30 of 30" in second and f'href="/console/rounds/{ids[0]}"' in second



# -- in the browser --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_an_operator_starts_a_round_from_the_page(page: Page, console_server: ConsoleServer) -> None:
    # Prepare: devices that may train, offline: none is eligible now
    fleet = console_server.fleet
    enroll(fleet, "start-0", "start-1")
    login(page, console_server.tokens[Role.OPERATOR], next_path="/console/rounds")
    before = {r.id for r in fleet.rounds.list_all()}
    # Execute: the form, as a person fills it
    page.select_option("#round-start select[name=strategy]", "fedprox")
    page.fill("#round-start input[name=rounds]", "2")
    page.fill("#round-start input[name=min_clients]", "2")
    with page.expect_navigation():
        page.click("#round-start button[type=submit]")
    started = [r for r in fleet.rounds.list_all() if r.id not in before]
    reason = page.locator("#round-reason").inner_text()
    # Assert: the round is recorded by the service, and its page says why it could not run
    assert len(started) == 1 and started[0].strategy == "fedprox" and started[0].config["rounds"] == 2
    assert page.url.endswith(f"/console/rounds/{started[0].id}")
    assert started[0].status == "failed" and "eligible device(s), min_clients is 2" in reason
    assert started[0].skipped.get("start-0") == "offline"
    assert "offline" in page.locator("#round-skipped").inner_text()


@pytest.mark.slow
def test_a_running_rounds_page_follows_it_to_its_end(page: Page, console_server: ConsoleServer) -> None:
    # Prepare: a round the runner is running (recorded as the service records it)
    fleet = console_server.fleet
    with Session(fleet.engine) as session:
        record = RoundRecord(task="digits", strategy=Strategy.FEDAVG, config={"rounds": 4, "min_clients": 2},
                             status=RoundStatus.RUNNING, invited=["live-a", "live-b"], created_at=utcnow())
        session.add(record)
        session.commit()
        round_id = record.id
    login(page, console_server.tokens[Role.VIEWER], next_path=f"/console/rounds/{round_id}")
    running = page.locator("#round-live").get_attribute("data-status")
    # Execute: the ServerApp's results land, as RoundService records them
    with Session(fleet.engine) as session:
        done = session.get(RoundRecord, round_id)
        assert done is not None
        done.status, done.finished_at, done.participants = RoundStatus.SUCCEEDED, utcnow(), ["live-a", "live-b"]
        done.metrics = [{"round": 1, "accuracy": 0.7, "loss": 0.9, "participants": ["live-a", "live-b"]},
                        {"round": 2, "accuracy": 0.85, "loss": 0.5, "participants": ["live-a", "live-b"]}]
        session.add(done)
        session.commit()
    page.locator('#round-chart[data-ops-drawn="true"]').wait_for(timeout=15_000)
    # Assert: polled while running, then reloaded once with the curve
    assert running == "running"
    assert page.locator("#round-live").get_attribute("data-status") == "succeeded"
    assert page.locator("#round-live").get_attribute("hx-trigger") is None
    assert page.locator("#round-metrics tbody tr").count() == 2


@pytest.mark.slow
def test_a_viewer_is_refused_starting_a_round(page: Page, console_server: ConsoleServer) -> None:
    # Prepare
    fleet = console_server.fleet
    login(page, console_server.tokens[Role.VIEWER], next_path="/console/rounds")
    before = len(fleet.rounds.list_all())
    # Execute: the button is disabled; re-enabled by hand, the POST is refused
    disabled = page.locator("#round-start button[type=submit]").is_disabled()
    note = page.locator("#round-start-note").inner_text()
    page.eval_on_selector("#round-start fieldset", "fieldset => { fieldset.disabled = false; }")
    with page.expect_navigation():
        page.click("#round-start button[type=submit]")
    # Assert
    assert disabled and "operator role" in note
    assert page.locator("h1").inner_text() == "403"
    assert "operator" in page.locator("p.error").inner_text()
    assert len(fleet.rounds.list_all()) == before


@pytest.mark.slow
def test_watch_a_deployment_progress(page: Page, console_server: ConsoleServer) -> None:
    """Devices come online one by one and install the model; the page follows without a reload, then stops
    polling once the deployment has succeeded."""
    # Prepare: four devices enrolled, offline: every target pending
    fleet = console_server.fleet
    ids = [f"roll-{i}" for i in range(4)]
    enroll(fleet, *ids, profile="raspberry-pi-5")
    register_starter(fleet, "roll-m1", STARTER)
    devices = [FakeDevice(console_server.broker_url, d, ok=True, connect=False) for d in ids]
    try:
        created = fleet.deployments.create(DeploymentCreate(model_version="roll-m1",
                                                            targets=Targets(device_ids=ids), waves=[50.0, 100.0]))
        login(page, console_server.tokens[Role.OPERATOR], next_path=f"/console/deployments/{created.id}")
        page.evaluate("() => { window.opsMarker = 'same page'; }")  # gone if the page reloads
        progress = page.locator("#deployment-progress")
        first = progress.inner_text()
        # Execute: the first device, then the rest
        devices[0].connect()
        page.locator('#deployment-targets tr[data-device="roll-0"] .ops-status-succeeded').wait_for(timeout=15_000)
        after_one = progress.inner_text()
        for device in devices[1:]:
            device.connect()
        page.locator('#deployment-live[data-status="succeeded"]').wait_for(timeout=20_000)
        final = progress.inner_text()
        statuses = page.locator("#deployment-targets .ops-target-status").all_inner_texts()
        polling = page.locator("#deployment-live").get_attribute("hx-trigger")
        marker = page.evaluate("() => window.opsMarker")
    finally:
        for device in devices:
            device.close()
    # Assert
    assert first == "0 of 4 devices done"
    assert after_one == "1 of 4 devices done"
    assert final == "4 of 4 devices done" and statuses == ["succeeded"] * 4
    assert marker == "same page"  # updated in place, never reloaded
    assert polling is None  # a finished deployment is not polled any more


def seed_demo(fleet: Fleet) -> dict[str, Any]:
    """What the screenshots show: rounds with curves (one with a burst step, one refused), their models, a schedule,
    a rollout half way (a device failed its self-test, the second wave pending) and burst jobs."""
    ids = [f"demo-ops-{i:02d}" for i in range(8)]
    profiles = ["raspberry-pi-5", "jetson-orin-nano", "raspberry-pi-4", "coral-dev-board"]
    for i, device_id in enumerate(ids):
        fleet.devices.enroll(DeviceCreate(device_id=device_id, profile=profiles[i % 4], tags=["demo-ops"]))
    first = seed_round(fleet, model_version="demo-r1", prefix="demo-ops", hostile="")
    seed_model(fleet, "demo-r1", source_kind="round", source_id=str(first))
    second = seed_round(fleet, model_version="demo-r2-qat", initial_model="demo-r1", schedule_id="nightly-ops",
                        prefix="demo-ops", hostile="")
    job = seed_job(fleet, status=JobStatus.SUCCEEDED, round_id=second, model_version="demo-r2-qat", epoch=5,
                   hostile="")
    seed_model(fleet, "demo-r2-qat", source_kind="burst", source_id=str(job))
    seed_round(fleet, status=RoundStatus.FAILED, reason="1 eligible device(s), min_clients is 2", prefix="demo-ops",
               hostile="")
    seed_job(fleet, status=JobStatus.RUNNING, hostile="")
    fleet.schedules.create(ScheduleCreate(id="nightly-ops", cron="0 2 * * *"))
    deployment = fleet.deployments.create(DeploymentCreate(
        model_version="demo-r2-qat", targets=Targets(tags=["demo-ops"]), waves=[50.0, 100.0], failure_threshold=0.5))
    with Session(fleet.engine) as session:  # the first wave answered (as the devices' acks would have it)
        for target in session.exec(select(DeploymentTargetRecord).where(
                DeploymentTargetRecord.deployment_id == deployment.id, DeploymentTargetRecord.wave == 0)):
            failed = target.device_id == ids[1]
            target.status = TargetStatus.FAILED if failed else TargetStatus.SUCCEEDED
            target.reason = "self-test failed: output differs by 0.4 (tolerance 0.001)" if failed else None
            session.add(target)
        session.commit()
    return {"round": second, "deployment": deployment.id, "job": job, "model": "demo-r2-qat"}


@pytest.mark.slow
def test_screenshots_of_the_ops_pages(page: Page, console_server: ConsoleServer) -> None:
    """docs/console/{rounds,round,models,deployments,deployment,jobs}.png from a seeded demo (with EDGEFLEET_SCREENSHOTS=1)."""
    # Prepare
    seeded = seed_demo(console_server.fleet)
    problems: list[str] = []  # script errors, CSP refusals, failed loads
    page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(str(error)))
    login(page, console_server.tokens[Role.OPERATOR], next_path="/console/rounds")
    # Execute
    screenshot(page, "rounds")
    page.goto(f"/console/rounds/{seeded['round']}")
    page.locator('#round-chart[data-ops-drawn="true"]').wait_for()
    series = page.locator("#round-chart .u-legend .u-series").count()
    screenshot(page, "round")
    page.goto("/console/models")
    screenshot(page, "models")
    page.goto("/console/deployments")
    screenshot(page, "deployments")
    page.goto(f"/console/deployments/{seeded['deployment']}")
    wave_rows = page.locator("#deployment-waves tbody tr").count()
    screenshot(page, "deployment")
    page.goto("/console/jobs")
    screenshot(page, "jobs")
    page.goto(f"/console/jobs/{seeded['job']}")
    page.goto(f"/console/models/{seeded['model']}")
    # Assert: the chart drew its two series (and the x axis); no page had a script error or a CSP refusal
    assert series == 3
    assert wave_rows == 2
    assert problems == []
