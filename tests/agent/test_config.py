"""The device config file (`edgefleet agent run --config FILE`): paths relative to the file, a bad key named with
the file, and `agent run` refusing a bad config with one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent._errors import ConfigError
from agent.config import load_device_config

CONFIG = """\
device_id = "pi-0001"
profile = "raspberry-pi-4"
controlplane = "https://cp.example:8443"
broker = "mqtts://cp.example:8883"
ca_file = "ca.pem"
task = "digits"
signing_key = "AAAA"
superlink_host = "cp.example"
future_key = 1
[tls]
cert_file = "device.crt"
key_file = "/abs/device.key"
[mqtt]
username = "pi-0001"
password_file = "mqtt-password"
[flower]
auth_key_file = "supernode.key"
"""


def test_config_paths_are_relative_to_its_directory(tmp_path: Path) -> None:
    # Prepare
    (tmp_path / "etc").mkdir()
    path = tmp_path / "etc" / "agent.toml"
    path.write_text(CONFIG)
    (tmp_path / "etc" / "mqtt-password").write_text("s3cret\n")
    # Execute
    config = load_device_config(path)
    # Assert
    assert (config.device_id, config.profile, config.broker) == ("pi-0001", "raspberry-pi-4", "mqtts://cp.example:8883")
    assert config.ca_file == tmp_path / "etc" / "ca.pem"
    assert config.tls_cert_file == tmp_path / "etc" / "device.crt"
    assert config.tls_key_file == Path("/abs/device.key")
    assert config.flower_auth_key_file == tmp_path / "etc" / "supernode.key"
    assert config.mqtt_username == "pi-0001" and config.mqtt_password() == "s3cret"
    assert config.superlink_host == "cp.example"
    assert config.unknown == ("future_key",)


@pytest.mark.parametrize(("text", "named"), [
    ('device_id = 7\n', "device_id"),
    ('[tls]\ncert_file = ""\nkey_file = "k"\n', "tls.cert_file"),
    ('[tls]\ncert_file = "c"\n', "[tls] needs both"),
    ('tls = "yes"\n', "[tls] must be a table"),
    ('device_id = "a\n', "not valid TOML"),
])
def test_a_bad_config_names_the_file_and_the_key(tmp_path: Path, text: str, named: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=str(path)) as refused:
        load_device_config(path)
    assert named in str(refused.value)


def test_agent_run_refuses_a_bad_config_in_one_line(tmp_path: Path) -> None:
    # Prepare: the password file the config names does not exist
    path = tmp_path / "agent.toml"
    path.write_text('device_id = "pi-1"\nprofile = "raspberry-pi-5"\n[mqtt]\npassword_file = "missing"\n')
    # Execute
    result = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--config", str(path),
                             "--data-dir", str(tmp_path / "data")], check=False, capture_output=True, text=True,
                            timeout=60)
    # Assert
    assert result.returncode == 2
    assert f"config file {path}: mqtt.password_file" in result.stderr, result.stderr


def test_agent_run_refuses_a_client_certificate_without_tls(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--device-id", "pi-1", "--profile",
                             "raspberry-pi-5", "--broker", "mqtt://127.0.0.1:1", "--tls-cert", "c", "--tls-key", "k",
                             "--data-dir", str(tmp_path / "data")], check=False, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert "--tls-cert needs an mqtts:// broker" in result.stderr, result.stderr


def test_agent_run_does_not_import_the_enrolment_and_install_commands() -> None:
    # The device process stays light: `agent run` leaves out what `agent enroll`/`agent install` import; the full
    # parser offers them when their modules are installed.
    code = ("import sys; from agent.cli import _parser; _parser('run'); run = set(sys.modules); "
            "_, plugged = _parser(None); print(sorted(m for m in ('agent.enroll', 'agent.install') if m in run), "
            "sorted(plugged))")
    result = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60)
    assert result.stdout.split("] ")[0] == "["


@pytest.mark.integration
def test_run_with_a_config_keeps_its_state_beside_it(tmp_path: Path) -> None:
    """Two enrolments started from one working directory never share an outbox or a model store: without
    --data-dir the state lives in state/ beside the config file, not in ./edgefleet-agent."""
    import signal
    import time

    from tests._services import free_port

    # Prepare: an enrolment directory (a plaintext broker nobody listens on: the agent runs on its outbox)
    enrolled = tmp_path / "enrolled"
    enrolled.mkdir()
    (enrolled / "agent.toml").write_text(f'device_id = "pi-0002"\nprofile = "raspberry-pi-5"\n'
                                         f'broker = "mqtt://127.0.0.1:{free_port()}"\n')
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    # Execute
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(enrolled / "agent.toml")],
                            cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    try:
        deadline = time.monotonic() + 60
        while not any((enrolled / "state").glob("*")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    # Assert
    assert any((enrolled / "state").glob("*")), "no state written beside the config"
    assert not (cwd / "edgefleet-agent").exists()
