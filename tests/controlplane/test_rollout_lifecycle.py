"""Rollouts as desired state, over a real broker and a real database (SQLite and PostgreSQL): offline devices are
pending (not failed) and get their command when they come back, a deadline ends the waiting as timed_out (not a
failure), the record follows what devices report afterwards, operators pause, resume, cancel and roll back (API
and CLI), a newer deployment supersedes an older one per device, and a withdrawn command cannot install."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient
from typer.testing import CliRunner

from agent.manifest import decode_signed_release, verify_release
from controlplane.app import create_app
from controlplane.auth import Role, create_token
from controlplane.cli import app as cli
from controlplane.deployments.schemas import DeploymentCreate, Targets
from controlplane.devices.schemas import DeviceCreate
from controlplane.statuses import DeploymentStatus, TargetStatus
from controlplane.wiring import Fleet
from tests._services import fx_fleet, wait_for  # noqa: F401 - fx_fleet
from tests.controlplane.test_models_deployments import FakeDevice, register_starter
from tests.controlplane.test_ota_releases import Device, bearer

pytestmark = pytest.mark.integration

STARTER = {"fp32": 0.975, "full-int8": 0.975}


def enroll(fleet: Fleet, *device_ids: str) -> None:
    for device_id in device_ids:
        fleet.devices.enroll(DeviceCreate(device_id=device_id, profile="raspberry-pi-5"))


def online(fleet: Fleet, *device_ids: str) -> None:
    wait_for(lambda: all(fleet.devices.get(d).online for d in device_ids), what=f"{device_ids} online")


def steps(fleet: Fleet, n: int = 2) -> None:
    """Let the rollout loop go round ``n`` times (the loop runs every second; these run now)."""
    for _ in range(n):
        fleet.deployments.step()


def status_of(fleet: Fleet, deployment_id: int) -> str:
    return fleet.deployments.get(deployment_id).status


def targets(fleet: Fleet, deployment_id: int) -> dict[str, tuple[str, str | None]]:
    return {t.device_id: (t.status, t.reason) for t in fleet.deployments.get(deployment_id).targets}


@pytest.mark.slow  # 3-5 s each on two databases: in `make test`, out of the fast loop
def test_an_offline_device_is_pending_and_gets_its_model_when_it_comes_back(fleet: Fleet, mosquitto_url: str) -> None:
    # Prepare: one device online, one enrolled but offline (it has never connected)
    register_starter(fleet, "m1", STARTER)
    enroll(fleet, "pi-on", "pi-off")
    on = FakeDevice(mosquitto_url, "pi-on", ok=True)
    off = FakeDevice(mosquitto_url, "pi-off", ok=True, connect=False)
    try:
        online(fleet, "pi-on")
        # Execute: a rollout that halts on any failure
        created = fleet.deployments.create(DeploymentCreate(model_version="m1", targets=Targets(all=True)))
        wait_for(lambda: targets(fleet, created.id)["pi-on"][0] == TargetStatus.SUCCEEDED, what="pi-on updated")
        steps(fleet)  # the offline device must stay pending, the deployment running
        waiting = fleet.deployments.get(created.id)
        off.connect()
        wait_for(lambda: status_of(fleet, created.id) != DeploymentStatus.RUNNING, what="the rollout to end")
        done = fleet.deployments.get(created.id)
    finally:
        on.close()
        off.close()
    # Assert: offline was pending (never sent, not failed, not halted); back online it got the command and the
    # record followed its answer
    assert waiting.status == DeploymentStatus.RUNNING, waiting
    assert targets(fleet, created.id)["pi-on"][0] == TargetStatus.SUCCEEDED
    pending = {t.device_id: t for t in waiting.targets}["pi-off"]
    assert (pending.status, pending.reason, pending.command_id) == (TargetStatus.PENDING, "offline: never connected",
                                                                    None)
    assert waiting.reason == "every wave sent; waiting for 1 offline device(s)"
    assert off.seen == 1 and on.seen == 1
    assert done.status == DeploymentStatus.SUCCEEDED, done
    assert done.counts == {"succeeded": 2}
    assert fleet.devices.get("pi-off").reported_state["active_model"] == "m1"  # type: ignore[index]


@pytest.mark.slow  # 3-5 s each on two databases: in `make test`, out of the fast loop
def test_a_wave_waits_for_reachable_devices_only(fleet: Fleet, mosquitto_url: str) -> None:
    # Prepare: four devices in two waves; one device of each wave offline
    register_starter(fleet, "m1", STARTER)
    ids = ["a-on", "b-off", "c-on", "d-off"]
    enroll(fleet, *ids)
    fakes = {d: FakeDevice(mosquitto_url, d, ok=True, connect=d.endswith("on")) for d in ids}
    try:
        online(fleet, "a-on", "c-on")
        # Execute
        created = fleet.deployments.create(DeploymentCreate(model_version="m1", targets=Targets(all=True),
                                                            waves=[50.0, 100.0]))
        wait_for(lambda: targets(fleet, created.id)["c-on"][0] == TargetStatus.SUCCEEDED, what="wave 2 reached")
        result = fleet.deployments.get(created.id)
    finally:
        for fake in fakes.values():
            fake.close()
    # Assert: wave 1's offline device did not hold wave 2 back; the offline ones are pending, not failed
    assert result.status == DeploymentStatus.RUNNING and result.current_wave == 1
    assert {t.device_id: (t.wave, t.status) for t in result.targets} == {
        "a-on": (0, "succeeded"), "b-off": (0, "pending"), "c-on": (1, "succeeded"), "d-off": (1, "pending")}


@pytest.mark.slow  # 3-5 s each on two databases: in `make test`, out of the fast loop
def test_a_deadline_times_out_offline_devices_and_the_record_follows_a_late_install(fleet: Fleet,
                                                                                    mosquitto_url: str) -> None:
    # Prepare: one good device, one failing, one offline; half of the answering devices may fail
    register_starter(fleet, "m1", STARTER)
    enroll(fleet, "pi-good", "pi-bad", "pi-off")
    good, bad = FakeDevice(mosquitto_url, "pi-good", ok=True), FakeDevice(mosquitto_url, "pi-bad", ok=False)
    off = FakeDevice(mosquitto_url, "pi-off", ok=True, connect=False)
    try:
        online(fleet, "pi-good", "pi-bad")
        # Execute
        created = fleet.deployments.create(DeploymentCreate(model_version="m1", targets=Targets(all=True),
                                                            failure_threshold=0.5, deadline_s=3))
        wait_for(lambda: status_of(fleet, created.id) != DeploymentStatus.RUNNING, what="the deadline")
        ended = fleet.deployments.get(created.id)
        # the offline device comes back running the model (installed another way, e.g. a queued command)
        off.active_model, off.active_variant = "m1", "full-int8"
        off.connect()
        wait_for(lambda: targets(fleet, created.id)["pi-off"][0] != TargetStatus.TIMED_OUT, what="the late install")
        late = fleet.deployments.get(created.id)
    finally:
        for fake in (good, bad, off):
            fake.close()
    # Assert: timed_out is separate from failed and does not count as one; then the record follows the device
    assert ended.status == DeploymentStatus.TIMED_OUT, ended
    assert ended.counts == {"succeeded": 1, "failed": 1, "timed_out": 1}
    assert ended.reason == "the deadline passed: 1 failed, 1 succeeded, 1 timed_out"
    assert {t.device_id: t for t in ended.targets}["pi-off"].reason == "offline: never connected (deadline passed)"
    assert ended.deadline is not None and ended.deadline > ended.created_at
    assert late.counts == {"succeeded": 2, "failed": 1}
    assert targets(fleet, created.id)["pi-off"] == (
        TargetStatus.SUCCEEDED, "the device reports the model active (after the deadline)")
    assert late.status == DeploymentStatus.SUCCEEDED and late.reason == "1 failed, 2 succeeded"


@pytest.mark.slow
def test_pause_resume_and_cancel_over_the_api_and_a_cancelled_command_cannot_install(
        fleet: Fleet, mosquitto_url: str) -> None:
    # Prepare: a device that holds its commands (acks when told), one offline
    register_starter(fleet, "m1", STARTER)
    enroll(fleet, "pi-0", "pi-1")
    held = Device(mosquitto_url, "pi-0")
    late = Device(mosquitto_url, "pi-1")
    late.close()  # offline, with its retained state saying so
    _, operator = create_token(fleet.engine, Role.OPERATOR)
    _, viewer = create_token(fleet.engine, Role.VIEWER)
    ops = bearer(operator)
    try:
        online(fleet, "pi-0")
        with TestClient(app=create_app(fleet=fleet)) as client:
            created = client.post("/api/v1/deployments", headers=ops,
                                  json={"model_version": "m1", "targets": {"all": True}}).json()
            dep = created["id"]
            wait_for(lambda: held.commands, what="pi-0's command")
            command = held.commands[0]
            # Execute: pause; the offline device comes back while paused
            as_viewer = client.post(f"/api/v1/deployments/{dep}/pause", headers=bearer(viewer))
            paused = client.post(f"/api/v1/deployments/{dep}/pause", headers=ops)
            paused_again = client.post(f"/api/v1/deployments/{dep}/pause", headers=ops)
            resume_running = None
            download_paused = client.get(command.args["artifact_url"], headers=bearer(command.args["bearer"]))
            late.connect()
            online(fleet, "pi-1")
            steps(fleet)  # nothing is sent while paused
            while_paused = (list(late.commands), targets(fleet, dep)["pi-1"])
            resumed = client.post(f"/api/v1/deployments/{dep}/resume", headers=ops)
            resume_running = client.post(f"/api/v1/deployments/{dep}/resume", headers=ops)
            wait_for(lambda: late.commands, what="pi-1's command after the resume")  # the positive control
            cancelled = client.post(f"/api/v1/deployments/{dep}/cancel", headers=ops)
            cancel_again = client.post(f"/api/v1/deployments/{dep}/cancel", headers=ops)
            download_cancelled = client.get(command.args["artifact_url"], headers=bearer(command.args["bearer"]))
            manifest_cancelled = client.get(command.args["manifest_url"], headers=bearer(command.args["bearer"]))
            # the device receives the withdrawn command late and fails to download it, as the agent does
            held.ack(ok=False, reason=f"manifest: HTTP 401 Unauthorized from {command.args['manifest_url']}")
            wait_for(lambda: "HTTP 401" in (targets(fleet, dep)["pi-0"][1] or ""), what="pi-0's answer recorded")
            unknown = [client.post(f"/api/v1/deployments/9999/{action}", headers=ops)
                       for action in ("pause", "resume", "cancel", "rollback")]
    finally:
        held.close()
        late.close()
    # Assert
    assert as_viewer.status_code == 403
    assert paused.status_code == 200 and paused.json()["status"] == "paused"
    assert paused_again.status_code == 409
    assert paused_again.json()["detail"] == f"deployment {dep} is paused: only a running deployment can be paused"
    assert download_paused.status_code == 200  # a paused deployment's sent devices may finish
    assert while_paused == ([], ("pending", "paused"))
    assert resumed.status_code == 200 and resumed.json()["status"] == "running"
    assert resume_running is not None and resume_running.status_code == 409
    assert resume_running.json()["detail"] == (f"deployment {dep} is running: only a paused deployment can be "
                                               f"resumed")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["counts"] == {"cancelled": 2}
    assert cancel_again.status_code == 409 and "is already cancelled" in cancel_again.json()["detail"]
    for refused in (download_cancelled, manifest_cancelled):
        assert refused.status_code == 401 and f"deployment {dep} is cancelled" in refused.text, refused.text
    status, reason = targets(fleet, dep)["pi-0"]
    assert status == TargetStatus.CANCELLED  # not failed: the command was withdrawn
    assert reason is not None and reason.startswith(f"deployment {dep} cancelled before the device answered; "
                                                    "the device answered: manifest: HTTP 401")
    assert status_of(fleet, dep) == DeploymentStatus.CANCELLED
    assert [r.status_code for r in unknown] == [404, 404, 404, 404]
    assert unknown[0].json()["detail"] == "no deployment 9999"


@pytest.mark.slow
def test_a_newer_deployment_supersedes_an_older_one_per_device(fleet: Fleet, mosquitto_url: str) -> None:
    # Prepare: m1 sent to pi-0, which has not answered; pi-1 is not part of the newer deployment
    register_starter(fleet, "m1", STARTER)
    register_starter(fleet, "m2", STARTER)
    enroll(fleet, "pi-0", "pi-1")
    pi0, pi1 = Device(mosquitto_url, "pi-0"), Device(mosquitto_url, "pi-1")
    try:
        online(fleet, "pi-0", "pi-1")
        first = fleet.deployments.create(DeploymentCreate(model_version="m1", targets=Targets(all=True)))
        wait_for(lambda: pi0.commands and pi1.commands, what="m1's commands")
        old = pi0.commands[0]
        # Execute: m2 to pi-0 only; then m2 to pi-1 as well
        second = fleet.deployments.create(DeploymentCreate(model_version="m2", targets=Targets(device_ids=["pi-0"])))
        after_second = fleet.deployments.get(first.id)
        wait_for(lambda: len(pi0.commands) == 2, what="m2's command")
        with TestClient(app=create_app(fleet=fleet)) as client:
            withdrawn = client.get(old.args["manifest_url"], headers=bearer(old.args["bearer"]))
        third = fleet.deployments.create(DeploymentCreate(model_version="m2", targets=Targets(device_ids=["pi-1"])))
        pi0.ack()  # both of pi-0's commands: the superseded one and m2's
        wait_for(lambda: status_of(fleet, second.id) == DeploymentStatus.SUCCEEDED, what="m2 on pi-0")
        final_first = fleet.deployments.get(first.id)
    finally:
        pi0.close()
        pi1.close()
    # Assert: pi-0's old target gave way at once, the old deployment kept running for pi-1, then ended superseded
    assert after_second.status == DeploymentStatus.RUNNING
    assert {t.device_id: (t.status, t.reason) for t in after_second.targets} == {
        "pi-0": ("superseded", f"superseded by deployment {second.id}"), "pi-1": ("sent", None)}
    assert withdrawn.status_code == 401 and "was superseded" in withdrawn.text, withdrawn.text
    assert final_first.status == DeploymentStatus.SUPERSEDED
    assert final_first.reason == f"superseded by deployment {third.id}: 2 superseded"
    assert targets(fleet, second.id)["pi-0"][0] == TargetStatus.SUCCEEDED


@pytest.mark.slow
def test_rollback_redeploys_each_devices_previous_model_signed_as_a_rollback(fleet: Fleet,
                                                                             mosquitto_url: str) -> None:
    # Prepare: the devices run m-old; m-new is rolled out to them and installed
    register_starter(fleet, "m-old", STARTER)
    register_starter(fleet, "m-new", STARTER)
    enroll(fleet, "pi-0", "pi-1", "pi-off")
    fakes = [FakeDevice(mosquitto_url, d, ok=True, active_model="m-old") for d in ("pi-0", "pi-1")]
    _, operator = create_token(fleet.engine, Role.OPERATOR)
    try:
        online(fleet, "pi-0", "pi-1")
        new = fleet.deployments.create(DeploymentCreate(model_version="m-new",
                                                        targets=Targets(device_ids=["pi-0", "pi-1"])))
        wait_for(lambda: status_of(fleet, new.id) == DeploymentStatus.SUCCEEDED, what="m-new installed")
        nothing = fleet.deployments.create(DeploymentCreate(model_version="m-new",
                                                            targets=Targets(device_ids=["pi-off"])))
        with TestClient(app=create_app(fleet=fleet)) as client:
            # Execute
            rolled = client.post(f"/api/v1/deployments/{new.id}/rollback", headers=bearer(operator))
            assert rolled.status_code == 201, rolled.text
            back = rolled.json()[0]
            wait_for(lambda: status_of(fleet, back["id"]) == DeploymentStatus.SUCCEEDED, what="the rollback")
            signed = client.get(f"/api/v1/deployments/{back['id']}/variants/full-int8/manifest",
                                headers=bearer(operator))
            refused = client.post(f"/api/v1/deployments/{nothing.id}/rollback", headers=bearer(operator))
    finally:
        for fake in fakes:
            fake.close()
    # Assert: one rollback deployment to both devices, of m-old, signed as a rollback from m-new's release
    assert len(rolled.json()) == 1
    assert (back["model_version"], back["rollback"], back["rollback_of"]) == ("m-old", True, new.id)
    assert {t["device_id"]: t["previous_model"] for t in back["targets"]} == {"pi-0": "m-new", "pi-1": "m-new"}
    assert {t.previous_model for t in fleet.deployments.get(new.id).targets} == {"m-old"}
    release = verify_release(decode_signed_release(signed.content), fleet.signer.public_key_raw)
    assert (release.model_version, release.rollback, release.rollback_from) == (
        "m-old", True, fleet.models.get("m-new").release)
    assert all(f.active_model == "m-old" for f in fakes)
    assert fleet.deployments.get(new.id).reason == f"rolled back by deployment {back['id']}"
    # nothing installed: 409 with the reason, and the deployment that still waited is cancelled
    assert refused.status_code == 409
    assert refused.json()["detail"] == f"deployment {nothing.id}: nothing to roll back (no device installed m-new)"
    assert status_of(fleet, nothing.id) == DeploymentStatus.CANCELLED


def test_bad_deadlines_are_400(fleet: Fleet) -> None:
    register_starter(fleet, "m1", STARTER)
    enroll(fleet, "pi-0")
    _, operator = create_token(fleet.engine, Role.OPERATOR)
    body = {"model_version": "m1", "targets": {"all": True}}
    with TestClient(app=create_app(fleet=fleet)) as client:
        both = client.post("/api/v1/deployments", headers=bearer(operator),
                           json={**body, "deadline_s": 60, "deadline": "2099-01-01T00:00:00Z"})
        past = client.post("/api/v1/deployments", headers=bearer(operator),
                           json={**body, "deadline": "2001-01-01T00:00:00Z"})
        negative = client.post("/api/v1/deployments", headers=bearer(operator), json={**body, "deadline_s": -1})
    assert both.status_code == 400 and both.json()["detail"] == "give either deadline_s or deadline, not both"
    assert past.status_code == 400 and "is in the past" in past.json()["detail"]
    assert negative.status_code == 400 and "deadline_s" in negative.text


runner = CliRunner()


def printed_json(output: str) -> Any:
    """The JSON a command printed (the served control plane in this process may log to the same stdout)."""
    start = min(i for i in (output.find("{\n"), output.find("[\n")) if i >= 0)
    return json.JSONDecoder().raw_decode(output[start:])[0]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.slow
def test_the_deployments_cli_against_a_served_control_plane(fleet: Fleet, mosquitto_url: str,
                                                            tmp_path: Path) -> None:
    # Prepare: a served control plane; pi-0 online (installs), pi-1 offline
    from controlplane.demo import AppServer
    from tests._services import free_port

    register_starter(fleet, "m-old", STARTER)
    register_starter(fleet, "m-new", STARTER)
    enroll(fleet, "pi-0", "pi-1")
    pi0 = FakeDevice(mosquitto_url, "pi-0", ok=True, active_model="m-old")
    _, token = create_token(fleet.engine, Role.OPERATOR, "cli")
    port = free_port()
    common = ["--url", f"http://127.0.0.1:{port}", "--token", token]
    try:
        online(fleet, "pi-0")
        with AppServer(create_app(fleet=fleet), port):
            # Execute
            created = runner.invoke(cli, ["deployments", "create", "m-new", "--device", "pi-0", "--device", "pi-1",
                                          "--deadline", "600", "--json", *common])
            dep = printed_json(created.stdout)["id"]
            wait_for(lambda: targets(fleet, dep)["pi-0"][0] == TargetStatus.SUCCEEDED, what="pi-0 updated")
            paused = runner.invoke(cli, ["deployments", "pause", str(dep), *common])
            paused_again = runner.invoke(cli, ["deployments", "pause", str(dep), *common])
            resumed = runner.invoke(cli, ["deployments", "resume", str(dep), "--json", *common])
            shown = runner.invoke(cli, ["deployments", "show", str(dep), *common])
            rolled = runner.invoke(cli, ["deployments", "rollback", str(dep), "--json", *common])
            listed = runner.invoke(cli, ["deployments", "list", *common])
            cancel_done = runner.invoke(cli, ["deployments", "cancel", str(dep), *common])
            no_targets = runner.invoke(cli, ["deployments", "create", "m-new", *common])
            bad_waves = runner.invoke(cli, ["deployments", "create", "m-new", "--all", "--waves", "50,x", *common])
            wait_for(lambda: pi0.active_model == "m-old", what="pi-0 rolled back")
    finally:
        pi0.close()
    # Assert
    assert created.exit_code == 0, created.output
    assert printed_json(created.stdout)["deadline"] is not None
    assert paused.exit_code == 0 and f"#{dep:<4} paused" in paused.stdout
    assert paused_again.exit_code == 1
    assert f"409: deployment {dep} is paused: only a running deployment can be paused" in paused_again.output
    assert resumed.exit_code == 0 and printed_json(resumed.stdout)["status"] == "running"
    assert shown.exit_code == 0
    assert "pi-0" in shown.stdout and "succeeded" in shown.stdout
    assert "pi-1" in shown.stdout and "pending" in shown.stdout and "offline: never connected" in shown.stdout
    assert rolled.exit_code == 0, rolled.output
    back = printed_json(rolled.stdout)[0]
    assert (back["model_version"], back["rollback"], back["rollback_of"]) == ("m-old", True, dep)
    assert listed.exit_code == 0
    assert f"#{dep:<4} cancelled" in listed.stdout and f"#{back['id']:<4}" in listed.stdout
    assert "rollback (of #" in listed.stdout
    assert cancel_done.exit_code == 1 and f"409: deployment {dep} is already cancelled" in cancel_done.output
    assert no_targets.exit_code == 2 and "say which devices" in no_targets.output
    assert bad_waves.exit_code == 2 and "--waves must be comma-separated numbers" in bad_waves.output


@pytest.mark.slow
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_real_agent_offline_at_the_rollout_installs_the_model_when_it_starts(fleet: Fleet, tmp_path: Path) -> None:
    # Prepare: a served control plane; the device is enrolled, its agent not started yet
    from controlplane.demo import AppServer
    from tests._services import free_port
    from tests.controlplane.test_rollout_e2e import start_agent, stop

    register_starter(fleet, "m1", STARTER, real_golden=True)
    creds = fleet.devices.enroll(DeviceCreate(device_id="pi5-late", profile="raspberry-pi-5"))
    port = free_port()
    with AppServer(create_app(fleet=fleet), port):
        created = fleet.deployments.create(DeploymentCreate(model_version="m1", targets=Targets(all=True)))
        steps(fleet)  # the offline device stays pending, nothing halts
        waiting = fleet.deployments.get(created.id)
        # Execute: the device comes online
        agent = start_agent(creds, f"http://127.0.0.1:{port}", tmp_path / "pi5")
        try:
            wait_for(lambda: status_of(fleet, created.id) != DeploymentStatus.RUNNING, timeout=90,
                     what="the rollout to end")
            wait_for(lambda: (fleet.devices.get("pi5-late").reported_state or {}).get("active_model") == "m1",
                     what="the agent reports the model")
        finally:
            stop(agent)
    # Assert
    assert waiting.status == DeploymentStatus.RUNNING
    assert [(t.status, t.reason) for t in waiting.targets] == [("pending", "offline: never connected")]
    result = fleet.deployments.get(created.id)
    assert result.status == DeploymentStatus.SUCCEEDED, result
    assert result.targets[0].status == TargetStatus.SUCCEEDED


@pytest.mark.slow
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_real_agent_that_gets_a_cancelled_command_late_is_not_wedged(fleet: Fleet, tmp_path: Path) -> None:
    # Prepare: a served control plane and a running agent, then frozen (SIGSTOP): still online as far as the
    # broker knows, so its command is sent, but it reads it only after the deployment was cancelled
    import os
    import signal

    from controlplane.demo import AppServer
    from tests._services import free_port
    from tests.controlplane.test_rollout_e2e import start_agent, stop

    register_starter(fleet, "m1", STARTER, real_golden=True)
    register_starter(fleet, "m2", STARTER, real_golden=True)
    creds = fleet.devices.enroll(DeviceCreate(device_id="pi5-frozen", profile="raspberry-pi-5"))
    port = free_port()
    with AppServer(create_app(fleet=fleet), port):
        agent = start_agent(creds, f"http://127.0.0.1:{port}", tmp_path / "pi5")
        try:
            online(fleet, "pi5-frozen")
            before = (fleet.devices.get("pi5-frozen").reported_state or {}).get("active_model")
            os.kill(agent.pid, signal.SIGSTOP)
            try:
                # Execute: a rollout, cancelled while the device holds its command unread
                first = fleet.deployments.create(DeploymentCreate(model_version="m1", targets=Targets(all=True)))
                wait_for(lambda: targets(fleet, first.id)["pi5-frozen"][0] == TargetStatus.SENT, what="sent")
                fleet.deployments.cancel(first.id)
            finally:
                os.kill(agent.pid, signal.SIGCONT)
            wait_for(lambda: "HTTP 401" in (targets(fleet, first.id)["pi5-frozen"][1] or ""), timeout=60,
                     what="the agent's answer to the withdrawn command")
            kept = (fleet.devices.get("pi5-frozen").reported_state or {}).get("active_model")
            # the next rollout reaches the same device
            second = fleet.deployments.create(DeploymentCreate(model_version="m2", targets=Targets(all=True)))
            wait_for(lambda: status_of(fleet, second.id) != DeploymentStatus.RUNNING, timeout=90,
                     what="the next rollout")
            wait_for(lambda: (fleet.devices.get("pi5-frozen").reported_state or {}).get("active_model") == "m2",
                     what="the agent reports m2")
        finally:
            stop(agent)
    # Assert: the withdrawn command was refused (its download token closed), recorded as cancelled, not failed;
    # the device kept its model and was free for the next rollout
    status, reason = targets(fleet, first.id)["pi5-frozen"]
    assert status == TargetStatus.CANCELLED, reason
    assert reason is not None and reason.startswith(f"deployment {first.id} cancelled before the device answered; "
                                                    "the device answered: "), reason
    assert "HTTP 401" in reason
    assert status_of(fleet, first.id) == DeploymentStatus.CANCELLED
    assert kept == before != "m1"
    assert status_of(fleet, second.id) == DeploymentStatus.SUCCEEDED


def test_a_cancel_never_overwrites_what_a_device_did(fleet: Fleet, mosquitto_url: str) -> None:
    # Prepare: the rollout loop stopped (steps run by hand), both devices hold their commands
    register_starter(fleet, "m1", STARTER)
    enroll(fleet, "pi-0", "pi-1")
    pi0, pi1 = Device(mosquitto_url, "pi-0"), Device(mosquitto_url, "pi-1")
    fleet.deployments.stop()
    try:
        online(fleet, "pi-0", "pi-1")
        created = fleet.deployments.create(DeploymentCreate(model_version="m1", targets=Targets(all=True)))
        wait_for(lambda: pi0.commands and pi1.commands, what="both commands")
        # Execute: pi-0 installs and acks before the cancel, pi-1 after it
        pi0.ack()
        command = pi0.commands[0].command_id
        wait_for(lambda: fleet.devices.get_command("pi-0", command).status == "ok", what="pi-0's ack stored")
        fleet.deployments.cancel(created.id)
        after_cancel = targets(fleet, created.id)
        pi1.ack()
        command = pi1.commands[0].command_id
        wait_for(lambda: fleet.devices.get_command("pi-1", command).status == "ok", what="pi-1's ack stored")
        steps(fleet, 1)
        final = targets(fleet, created.id)
    finally:
        pi0.close()
        pi1.close()
    # Assert: the record says what each device runs
    assert after_cancel == {"pi-0": ("succeeded", None),
                            "pi-1": ("cancelled", f"deployment {created.id} cancelled before the device answered")}
    installed = (f"installed although the target was cancelled (deployment {created.id} cancelled before the "
                 "device answered)")
    assert final["pi-1"] == ("succeeded", installed)
    assert status_of(fleet, created.id) == DeploymentStatus.CANCELLED
