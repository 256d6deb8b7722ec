"""Secrets at rest: the data directory and its database and key files are private to the control plane's user,
whatever the umask; the broker's admin password never has to be on the command line."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane.settings import Settings
from controlplane.wiring import Fleet
from tests._services import fleet_settings, free_port, port_open, wait_for
from tests.conftest import MosquittoInstance


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(name="loose_umask")
def fx_loose_umask() -> Iterator[None]:
    previous = os.umask(0o022)  # the common default: files 0644, directories 0755
    try:
        yield
    finally:
        os.umask(previous)


@pytest.mark.integration
@pytest.mark.usefixtures("loose_umask")
def test_a_new_data_dir_and_its_files_are_private(mosquitto_url: str, tmp_path: Path) -> None:
    # Prepare
    data_dir = tmp_path / "cp"
    # Execute
    fleet = Fleet(fleet_settings(mosquitto_url, data_dir)).start(ingest=False)
    try:
        with fleet.engine.begin() as conn:  # a write, so the WAL file exists
            conn.exec_driver_sql("CREATE TABLE IF NOT EXISTS t (x int)")
            conn.exec_driver_sql("INSERT INTO t VALUES (1)")
        modes = {p.name: _mode(p) for p in [data_dir, *data_dir.glob("edgefleet.db*"), *data_dir.glob("keys/*"),
                                            data_dir / "pki", *data_dir.glob("pki/*")]}
    finally:
        fleet.stop()
    # Assert
    assert modes["cp"] == 0o700
    assert modes["edgefleet.db"] == 0o600 and modes["edgefleet.db-wal"] == 0o600, modes
    assert modes["signing-key.pem"] == 0o600
    assert modes["pki"] == 0o700 and modes["ca.key"] == 0o600 and modes["server.key"] == 0o600, modes


@pytest.mark.integration
@pytest.mark.usefixtures("loose_umask")
def test_an_existing_world_readable_data_dir_is_tightened(mosquitto_url: str, tmp_path: Path) -> None:
    # Prepare: what an earlier version left under a 022 umask
    data_dir = tmp_path / "cp"
    Fleet(fleet_settings(mosquitto_url, data_dir)).start(ingest=False).stop()
    os.chmod(data_dir, 0o755)
    os.chmod(data_dir / "edgefleet.db", 0o644)
    # Execute
    Fleet(fleet_settings(mosquitto_url, data_dir)).start(ingest=False).stop()
    # Assert
    assert _mode(data_dir) == 0o700 and _mode(data_dir / "edgefleet.db") == 0o600


def test_the_broker_password_comes_from_the_environment_or_a_file(tmp_path: Path) -> None:
    # Prepare
    secret_file = tmp_path / "broker-password"
    secret_file.write_text("s3cret/with:odd@chars\n")
    # Execute
    from_env = Settings.from_env({"EDGEFLEET_BROKER_URL": "mqtt://admin@broker:1883",
                                  "EDGEFLEET_BROKER_PASSWORD": "pw"}).resolved()
    from_file = Settings(broker_url="mqtt://admin@broker:1883", broker_password_file=secret_file).resolved()
    in_url = Settings(broker_url="mqtt://admin:url-pw@broker:1883", broker_password="other").resolved()
    # Assert
    from agent.mqtt import parse_broker_url

    assert parse_broker_url(from_env.broker_url or "").password == "pw"
    assert parse_broker_url(from_file.broker_url or "").password == "s3cret/with:odd@chars"
    assert parse_broker_url(in_url.broker_url or "").password == "url-pw"
    assert "pw" not in repr(Settings(broker_password="pw"))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (lambda d: Settings(broker_url="mqtt://admin@b:1883", broker_password_file=d / "missing"),
         "broker password file .*missing: No such file"),
        (lambda d: Settings(broker_url="mqtt://b:1883", broker_password="pw"), "names no user"),
        (lambda d: Settings(broker_password="pw"), "no broker URL"),
    ],
)
def test_a_broker_password_that_cannot_be_used_is_a_clear_error(settings: object, message: str,
                                                                 tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=message):
        settings(tmp_path).resolved()  # type: ignore[operator]


@pytest.mark.integration
@pytest.mark.slow
def test_serve_on_dynsec_mosquitto_with_the_admin_password_only_in_a_file(dynsec_mosquitto: MosquittoInstance,
                                                                           tmp_path: Path) -> None:
    # Prepare: the admin password in a 0600 file; the command line names only the user
    broker = dynsec_mosquitto
    password_file = tmp_path / "broker-password"
    password_file.write_text(broker.admin_password)
    password_file.chmod(0o600)
    data_dir, port = tmp_path / "cp", free_port()
    cli = [sys.executable, "-m", "controlplane._entry"]
    token = subprocess.run([*cli, "tokens", "create", "--role", "admin", "--data-dir", str(data_dir), "--create"],
                           check=True, capture_output=True, text=True).stdout.strip()
    url = f"mqtt://{broker.admin_username}@{broker.host}:{broker.port}"
    server = subprocess.Popen([*cli, "controlplane", "serve", "--port", str(port), "--data-dir", str(data_dir),
                               "--broker", url, "--broker-auth", "dynsec", "--broker-password-file", str(password_file)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: port_open("127.0.0.1", port) or server.poll() is not None, timeout=60, what="control plane")
        assert server.poll() is None, server.stdout.read() if server.stdout else ""
        # Execute: enrolment writes the device account into dynsec with the admin's password
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/v1/devices", method="POST",
            data=json.dumps({"device_id": "pi-001", "profile": "raspberry-pi-5"}).encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            enrolled = json.load(response)
        cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes().decode()
    finally:
        server.terminate()
        output, _ = server.communicate(timeout=30)
    # Assert
    assert enrolled["mqtt_username"] == "pi-001"
    assert broker.admin_password not in cmdline
    assert broker.admin_password not in output
    assert "warning: --broker carries a password" not in output
