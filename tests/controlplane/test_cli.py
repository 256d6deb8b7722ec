"""The `edgefleet` CLI as an operator types it."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from controlplane.app import create_app
from controlplane.auth import Role, create_token, verify_token
from controlplane.cli import app
from controlplane.db import create_db_engine
from controlplane.demo import AppServer
from controlplane.wiring import Fleet
from tests._services import fleet_settings, free_port, port_open, wait_for

runner = CliRunner()


def test_tokens_create_prints_a_working_token(tmp_path: Path) -> None:
    # Prepare
    url = f"sqlite:///{tmp_path / 'cp.db'}"
    # Execute
    result = CliRunner(mix_stderr=False).invoke(app, ["tokens", "create", "--role", "operator", "--name", "ci",
                                                      "--database-url", url, "--create"])
    listed = runner.invoke(app, ["tokens", "list", "--database-url", url])
    # Assert
    assert result.exit_code == 0, result.output
    secret = result.stdout.strip().splitlines()[0]
    info = verify_token(create_db_engine(url), secret)
    assert info is not None and info.role is Role.OPERATOR and info.name == "ci"
    assert "operator" in listed.stdout and secret not in listed.stdout


def test_tokens_revoke(tmp_path: Path) -> None:
    # Prepare
    url = f"sqlite:///{tmp_path / 'cp.db'}"
    secret = CliRunner(mix_stderr=False).invoke(app, ["tokens", "create", "--role", "viewer", "--database-url", url,
                                                      "--create"]).stdout.split()[0]
    # Execute
    revoked = runner.invoke(app, ["tokens", "revoke", "1", "--database-url", url])
    missing = runner.invoke(app, ["tokens", "revoke", "99", "--database-url", url])
    # Assert
    assert revoked.exit_code == 0
    assert verify_token(create_db_engine(url), secret) is None
    assert missing.exit_code == 1 and "no token #99" in missing.output


def test_invalid_role_is_rejected(tmp_path: Path) -> None:
    result = runner.invoke(app, ["tokens", "create", "--role", "root", "--database-url", f"sqlite:///{tmp_path}/x.db"])
    assert result.exit_code == 2
    assert "root" in result.output


def test_profiles_list_and_show() -> None:
    # Execute
    listed = runner.invoke(app, ["profiles", "list"])
    as_json = runner.invoke(app, ["profiles", "list", "--json"])
    shown = runner.invoke(app, ["profiles", "show", "coral-dev-board"])
    unknown = runner.invoke(app, ["profiles", "show", "toaster"])
    # Assert
    assert listed.exit_code == 0 and "raspberry-pi-4" in listed.stdout
    assert {p["name"] for p in json.loads(as_json.stdout)} >= {"raspberry-pi-5", "esp32-s3"}
    assert json.loads(shown.stdout)["variants"] == ["full-int8"]
    assert unknown.exit_code == 2 and "unknown profile 'toaster'" in unknown.output


def test_agent_refuses_an_export_only_profile(tmp_path: Path) -> None:
    result = runner.invoke(app, ["agent", "run", "--device-id", "mcu-1", "--profile", "esp32-s3",
                                 "--data-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "export target" in result.output


@pytest.mark.parametrize(("extra", "warned"), [
    (["--password", "pw"], True),
    (["--broker", "mqtt://d1:pw@127.0.0.1:1"], True),
    ([], False),  # the password from EDGEFLEET_MQTT_PASSWORD
])
def test_agent_warns_about_a_password_on_the_command_line(tmp_path: Path, extra: list[str], warned: bool,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEFLEET_MQTT_PASSWORD", "pw")
    result = runner.invoke(app, ["agent", "run", "--device-id", "d1", "--profile", "esp32-s3",
                                 "--data-dir", str(tmp_path), *extra])
    assert result.exit_code == 2  # an export-only profile: the agent stops after the check
    assert ("password is on the command line" in result.output) is warned


def test_agent_rejects_a_bad_broker_url(tmp_path: Path) -> None:
    result = runner.invoke(app, ["agent", "run", "--device-id", "d1", "--profile", "raspberry-pi-5",
                                 "--broker", "http://x", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "scheme must be mqtt" in result.output


@contextlib.contextmanager
def served(mosquitto_url: str, tmp_path: Path) -> Iterator[tuple[Fleet, list[str]]]:
    """A served control plane, as `edgefleet controlplane serve` gives, and the CLI options to reach it."""
    fleet = Fleet(fleet_settings(mosquitto_url, tmp_path / "cp")).start()
    _, token = create_token(fleet.engine, Role.OPERATOR, "cli")
    port = free_port()
    try:
        with AppServer(create_app(fleet=fleet), port):
            yield fleet, ["--url", f"http://127.0.0.1:{port}", "--token", token]
    finally:
        fleet.stop()


@pytest.mark.integration
@pytest.mark.slow
def test_jobs_commands_against_a_running_control_plane(mosquitto_url: str, tmp_path: Path) -> None:
    with served(mosquitto_url, tmp_path) as (_, common):
        # Execute
        submitted = runner.invoke(app, ["jobs", "submit", "finetune", "--epochs", "3", "--placement", "local",
                                        *common])
        listed = runner.invoke(app, ["jobs", "list", *common])
        shown = runner.invoke(app, ["jobs", "show", "1", *common])
        cancel_done = runner.invoke(app, ["jobs", "cancel", "1", *common])
        long_job = runner.invoke(app, ["jobs", "submit", "finetune", "--epochs", "500", "--no-wait", *common])
        cancelled = runner.invoke(app, ["jobs", "cancel", "2", *common])
        refused = runner.invoke(app, ["jobs", "submit", "qat", "--gpus", "1", "--placement", "local", *common])
        no_token = runner.invoke(app, ["jobs", "list", "--url", common[1]], env={"EDGEFLEET_TOKEN": ""})
    # Assert
    assert not (tmp_path / "cp" / "ray" / "head.json").exists()  # no Ray head outlives the control plane
    assert submitted.exit_code == 0, submitted.output
    assert "job #1: local — placement=local requested" in submitted.stdout
    assert "#1    finetune  succeeded" in submitted.stdout and "model job-1-finetune accuracy 0." in submitted.stdout
    assert listed.exit_code == 0 and "#1    finetune  succeeded" in listed.stdout
    job = json.loads(shown.stdout)
    assert job["status"] == "succeeded" and job["metrics"]["accuracy"] > 0.5 and "EDGEFLEET_PROGRESS" in job["logs_tail"]
    assert cancel_done.exit_code == 1 and "409: job 1 is already succeeded" in cancel_done.output
    assert long_job.exit_code == 0 and "job #2:" in long_job.stdout
    assert cancelled.exit_code == 0 and "#2    finetune  cancelled" in cancelled.stdout
    assert refused.exit_code == 1 and "400: placement=local cannot provide 1 GPU" in refused.output
    assert no_token.exit_code != 0 and "an API token is needed" in no_token.output


@pytest.mark.integration
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
@pytest.mark.slow
def test_serve_never_leaves_its_embedded_broker_behind(tmp_path: Path, sig: signal.Signals) -> None:
    # Prepare: `edgefleet controlplane serve` with its embedded broker
    port, broker_port = free_port(), free_port()
    server = subprocess.Popen([sys.executable, "-m", "controlplane._entry", "controlplane", "serve", "--port", str(port),
                               "--data-dir", str(tmp_path / "cp"), "--embedded-broker-port", str(broker_port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: port_open("127.0.0.1", port) and port_open("127.0.0.1", broker_port), timeout=60,
                 what="control plane up")
        # Execute: stopped (SIGTERM: a graceful stop; SIGKILL: a crash)
        server.send_signal(sig)
        code = server.wait(30)
        # Assert: the broker went with it, so the next start can take the port
        wait_for(lambda: not port_open("127.0.0.1", broker_port), timeout=10, what="broker port free")
        assert code == -sig
    finally:
        server.kill()



@pytest.mark.integration
@pytest.mark.slow
def test_rounds_and_schedules_commands(mosquitto_url: str, tmp_path: Path) -> None:
    with served(mosquitto_url, tmp_path) as (fleet, common):
        # Execute
        created = runner.invoke(app, ["schedules", "create", "nightly", "--cron", "0 2 * * *", "--burst", "qat",
                                      "--eligibility", '{"min_battery_percent": 30}', "--deploy", *common])
        (stored,) = fleet.schedules.list_all()
        listed = runner.invoke(app, ["schedules", "list", *common])
        bad_cron = runner.invoke(app, ["schedules", "create", "bad", "--cron", "61 * * * *", *common])
        bad_json = runner.invoke(app, ["schedules", "create", "bad", "--interval", "60", "--eligibility", "{no",
                                       *common])
        started = runner.invoke(app, ["rounds", "start", "--rounds", "1", *common])
        rounds = runner.invoke(app, ["rounds", "list", *common])
        shown = runner.invoke(app, ["rounds", "show", "1", *common])
        deleted = runner.invoke(app, ["schedules", "delete", "nightly", *common])
        again = runner.invoke(app, ["schedules", "delete", "nightly", *common])
        remaining = fleet.schedules.list_all()
    # Assert
    assert created.exit_code == 0 and "schedule nightly: next run 20" in created.stdout, created.output
    assert "nightly" in listed.stdout and "0 2 * * *" in listed.stdout
    assert bad_cron.exit_code == 1 and "400: invalid cron expression '61 * * * *'" in bad_cron.output
    assert bad_json.exit_code != 0 and "--eligibility is not JSON" in bad_json.output
    # no device is enrolled: the round fails at once, saying why
    assert started.exit_code == 1 and "0 eligible device(s), min_clients is 2" in started.stdout
    assert "#1    failed" in rounds.stdout
    assert json.loads(shown.stdout)["config"]["rounds"] == 1
    assert deleted.exit_code == 0 and again.exit_code == 1 and "404" in again.output
    assert remaining == []
    assert stored.round["burst"]["kind"] == "qat" and stored.round["deploy"] is True
    assert stored.round["eligibility"]["min_battery_percent"] == 30
