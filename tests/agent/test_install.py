"""`edgefleet agent install`: the config and its secrets under /etc/edgefleet, and a hardened unit systemd accepts.

Everything goes under a temporary --root: its own etc/passwd and etc/group (useradd --prefix creates the dedicated
user there, never on this machine), and the venv's real `edgefleet` script at the path the unit runs it from.
"""

from __future__ import annotations

import argparse
import configparser
import os
import secrets
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from agent import install
from tests._services import service_missing

ROOT = Path(__file__).resolve().parents[2]
VENV_EDGEFLEET = Path(os.path.abspath(sys.executable)).parent / "edgefleet"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
CONFIG = """\
device_id = "pi-0001"
profile = "raspberry-pi-4"
controlplane = "https://cp.example:8443"
broker = "mqtts://cp.example:8883"
ca_file = "ca.pem"
task = "digits"
signing_key = "Ym9ndXMtYnV0LTMyLWJ5dGVzLWxvbmctLS0tLS0tLS0="

[tls]
cert_file = "pki/device.crt"
key_file = "pki/device.key"

[mqtt]
username = "pi-0001"
password_file = "mqtt-password"

[flower]
auth_key_file = "supernode.key"
"""
# name in the enrolment directory -> (installed name, secret)
FILES = {"ca.pem": ("ca.pem", False), "pki/device.crt": ("device.crt", False),
         "pki/device.key": ("device.key", True), "mqtt-password": ("mqtt-password", True),
         "supernode.key": ("supernode.key", True)}


@pytest.fixture(name="enrolled")
def fx_enrolled(tmp_path: Path) -> Path:
    """What `edgefleet agent enroll --data-dir DIR` leaves: the config and the files it names, relative to it."""
    directory = tmp_path / "enrol"
    (directory / "pki").mkdir(parents=True)
    for name in FILES:
        (directory / name).write_bytes(secrets.token_bytes(48))
    (directory / "agent.toml").write_text(CONFIG)
    return directory / "agent.toml"


@pytest.fixture(name="root")
def fx_root(tmp_path: Path) -> Path:
    """A device file system with root's account entries and this venv's `edgefleet` where the unit runs it."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (root / "etc/group").write_text("root:x:0:\n")
    script = root / str(VENV_EDGEFLEET).lstrip("/")
    script.parent.mkdir(parents=True)
    shutil.copy2(VENV_EDGEFLEET, script)
    return root


def _agent_install(*argv: str) -> int:
    # As `edgefleet agent install` runs it: the subcommand registered on the agent CLI's subparsers.
    parser = argparse.ArgumentParser(prog="edgefleet agent")
    install.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["install", *argv])
    code: int = args.handler(args)
    return code


def _unit(root: Path) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    unit.read_string((root / "etc/systemd/system/edgefleet-agent.service").read_text())
    return unit


def _account(root: Path, name: str) -> tuple[int, int]:
    entry = next(line.split(":") for line in (root / "etc/passwd").read_text().splitlines()
                 if line.startswith(f"{name}:"))
    return int(entry[2]), int(entry[3])


def _snapshot(root: Path) -> dict[str, tuple[bytes, int, int, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mode, p.stat().st_uid, p.stat().st_gid)
            for p in sorted((root / "etc").rglob("*")) if p.is_file()}


def test_install_writes_a_unit_that_systemd_analyze_verifies(enrolled: Path, root: Path) -> None:
    if not Path(SYSTEMD_ANALYZE).exists():
        service_missing("systemd-analyze")
    # Execute
    code = _agent_install("--config", str(enrolled), "--root", str(root), "--python", sys.executable)
    unit_file = root / "etc/systemd/system/edgefleet-agent.service"
    verify = subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", str(unit_file)],
                            capture_output=True, text=True, check=False, timeout=60)
    exposure = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=yes", "--threshold=20", str(unit_file)],
                              capture_output=True, text=True, check=False, timeout=60)
    # Assert: systemd loads it without a word about it, and rates its exposure low (0 best, 100 worst)
    assert code == 0
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "edgefleet" not in verify.stdout + verify.stderr, verify.stdout + verify.stderr
    assert exposure.returncode == 0, exposure.stdout[-3000:]
    service = _unit(root)["Service"]
    assert service["ExecStart"] == (f"{VENV_EDGEFLEET} agent run --config /etc/edgefleet/agent.toml "
                                    "--data-dir /var/lib/edgefleet")
    assert (service["User"], service["Group"]) == ("edgefleet", "edgefleet")
    assert service["StateDirectory"] == "edgefleet"
    assert service["LogsDirectory"] == "edgefleet"
    assert service["Restart"] == "on-failure"
    assert service["RestartSec"]
    assert service["RestrictAddressFamilies"] == "AF_INET AF_INET6 AF_UNIX AF_NETLINK"
    assert service["CapabilityBoundingSet"] == ""
    for directive in ("ProtectHome", "PrivateTmp", "NoNewPrivileges", "ProtectKernelTunables",
                      "ProtectKernelModules", "ProtectControlGroups", "LockPersonality"):
        assert service[directive] == "yes", directive
    assert service["ProtectSystem"] == "strict"
    assert "MemoryDenyWriteExecute" not in service  # not checked against LiteRT/XNNPACK: see the unit's comment


@pytest.mark.skipif(os.geteuid() != 0, reason="creating a system user and chown need root")
def test_secrets_are_0600_and_owned_by_a_new_system_user(enrolled: Path, root: Path) -> None:
    # Execute
    code = _agent_install("--config", str(enrolled), "--root", str(root), "--python", sys.executable)
    # Assert: the user exists in the device's accounts only, as a system user without a login
    assert code == 0
    uid, gid = _account(root, "edgefleet")
    assert uid < 1000
    assert (root / "etc/passwd").read_text().rstrip().endswith(":/var/lib/edgefleet:/usr/sbin/nologin")
    etc = root / "etc/edgefleet"
    assert (stat.S_IMODE(etc.stat().st_mode), etc.stat().st_uid, etc.stat().st_gid) == (0o750, 0, gid)
    for source, (name, secret) in FILES.items():
        installed = (etc / name).stat()
        assert (etc / name).read_bytes() == (enrolled.parent / source).read_bytes()
        if secret:
            assert (stat.S_IMODE(installed.st_mode), installed.st_uid, installed.st_gid) == (0o600, uid, gid), name
        else:
            assert (stat.S_IMODE(installed.st_mode), installed.st_uid) == (0o644, 0), name
    config = (etc / "agent.toml").stat()
    assert (stat.S_IMODE(config.st_mode), config.st_uid, config.st_gid) == (0o640, 0, gid)


def test_the_installed_config_is_self_contained(enrolled: Path, root: Path) -> None:
    # Execute
    code = _agent_install("--config", str(enrolled), "--root", str(root), "--python", sys.executable,
                          "--no-create-user", "--user", "root")
    shutil.rmtree(enrolled.parent)  # the enrolment directory may go (it was under /tmp)
    # Assert: the same settings, every path now a file next to the installed config
    installed = tomllib.loads((root / "etc/edgefleet/agent.toml").read_text())
    original = tomllib.loads(CONFIG)
    assert code == 0
    assert (installed["ca_file"], installed["tls"], installed["mqtt"]["password_file"],
            installed["flower"]["auth_key_file"]) == (
        "ca.pem", {"cert_file": "device.crt", "key_file": "device.key"}, "mqtt-password", "supernode.key")
    for key in ("device_id", "profile", "controlplane", "broker", "task", "signing_key"):
        assert installed[key] == original[key]
    assert installed["mqtt"]["username"] == "pi-0001"
    for name in ("ca.pem", "device.crt", "device.key", "mqtt-password", "supernode.key"):
        assert (root / "etc/edgefleet" / name).is_file()


def test_a_missing_secret_fails_naming_it_and_writes_nothing(enrolled: Path, root: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    (enrolled.parent / "mqtt-password").unlink()
    # Execute
    code = _agent_install("--config", str(enrolled), "--root", str(root), "--python", sys.executable)
    # Assert
    assert code == 2
    error = capsys.readouterr().err
    assert "mqtt.password_file" in error
    assert str(enrolled.parent / "mqtt-password") in error
    assert not (root / "etc/edgefleet").exists()
    assert not (root / "etc/systemd").exists()
    assert "edgefleet:" not in (root / "etc/passwd").read_text()


def test_a_missing_edgefleet_script_or_user_is_an_error(enrolled: Path, root: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    # Execute
    no_script = _agent_install("--config", str(enrolled), "--root", str(root), "--python", "/nowhere/bin/python")
    no_script_error = capsys.readouterr().err
    no_user = (_agent_install("--config", str(enrolled), "--root", str(root), "--python", sys.executable,
                              "--no-create-user") if os.geteuid() == 0 else 2)
    no_user_error = capsys.readouterr().err
    # Assert
    assert no_script == 2
    assert "/nowhere/bin/edgefleet does not exist" in no_script_error
    assert no_user == 2
    if os.geteuid() == 0:
        assert "'edgefleet' does not exist" in no_user_error


def test_running_twice_is_idempotent(enrolled: Path, root: Path) -> None:
    # Prepare
    argv = ("--config", str(enrolled), "--root", str(root), "--python", sys.executable)
    assert _agent_install(*argv) == 0
    first = _snapshot(root)
    # Execute
    code = _agent_install(*argv)
    # Assert: the same files, bytes, modes and owners, and one user
    assert code == 0
    assert _snapshot(root) == first
    assert (root / "etc/passwd").read_text().count("\nedgefleet:") <= 1


def test_installing_from_the_installed_config_changes_nothing(enrolled: Path, root: Path) -> None:
    # Prepare: what an upgrade does (deploy/agent/README.md), after the enrolment directory is gone
    argv = ("--root", str(root), "--python", sys.executable)
    assert _agent_install("--config", str(enrolled), *argv) == 0
    shutil.rmtree(enrolled.parent)
    first = _snapshot(root)
    # Execute
    code = _agent_install("--config", str(root / "etc/edgefleet/agent.toml"), *argv)
    # Assert
    assert code == 0
    assert _snapshot(root) == first


def test_an_unknown_file_reference_is_copied_as_a_secret(enrolled: Path, root: Path) -> None:
    # Prepare: a key enrolment may add later
    (enrolled.parent / "root-ca.pem").write_bytes(b"x")
    enrolled.write_text(CONFIG.replace('[flower]\n', '[flower]\nroot_certificates_file = "root-ca.pem"\n'))
    # Execute
    code = _agent_install("--config", str(enrolled), "--root", str(root), "--python", sys.executable,
                          "--no-create-user", "--user", "root")
    # Assert
    installed = tomllib.loads((root / "etc/edgefleet/agent.toml").read_text())
    assert code == 0
    assert installed["flower"]["root_certificates_file"] == "flower.root_certificates"
    copy = root / "etc/edgefleet/flower.root_certificates"
    assert (copy.read_bytes(), stat.S_IMODE(copy.stat().st_mode)) == (b"x", 0o600)


def test_the_committed_unit_is_what_install_writes(enrolled: Path, root: Path) -> None:
    # Prepare: the venv where deploy/agent/README.md installs the agent
    script = root / "opt/edgefleet/bin/edgefleet"
    script.parent.mkdir(parents=True)
    shutil.copy2(VENV_EDGEFLEET, script)
    # Execute
    code = _agent_install("--config", str(enrolled), "--root", str(root), "--python", "/opt/edgefleet/bin/python")
    # Assert
    assert code == 0
    written = (root / "etc/systemd/system/edgefleet-agent.service").read_text()
    assert (ROOT / "deploy/agent/edgefleet-agent.service").read_text() == written, (
        "deploy/agent/edgefleet-agent.service drifted from agent/install.py: regenerate it "
        "(deploy/agent/README.md says how)")
