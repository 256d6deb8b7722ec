"""`edgefleet agent enroll` end to end: a real control plane over HTTPS with its fleet CA, real CSR signing, the
written files, and the credentials connecting to real brokers (the embedded one by password, mosquitto by
certificate)."""

from __future__ import annotations

import argparse
import getpass
import hashlib
import json
import stat
import subprocess
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion
from sqlmodel import Session
from typer.testing import CliRunner

from agent import enroll as agent_enroll
from agent import protocol as wire
from controlplane.app import create_app
from controlplane.auth import Role, create_token
from controlplane.cli import app as cli_app
from controlplane.db import Device
from controlplane.settings import Settings
from controlplane.wiring import Fleet
from tests._services import free_port, service_missing, wait_for
from tests.controlplane.test_provisioning import connect
from tests.processes import mosquitto_binary, stop_process, wait_for_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@dataclass
class Served:
    fleet: Fleet
    https: str
    http: str
    admin_token: str


def _serve(app: Any, port: int, **ssl: Any) -> tuple[Any, threading.Thread]:
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **ssl))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 15, "the control plane's HTTP server")
    return server, thread


@pytest.fixture(name="served", scope="module")
def fx_served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A control plane on its embedded broker, served over HTTPS (its own server certificate) and plain http,
    both on loopback."""
    pytest.importorskip("amqtt")
    data_dir = tmp_path_factory.mktemp("cp")
    fleet = Fleet(Settings(data_dir=data_dir, embedded_broker_port=free_port())).start(ingest=False)
    identity = fleet.pki.server
    https_port, http_port = free_port(), free_port()
    servers = [
        _serve(create_app(fleet=fleet), https_port, ssl_certfile=str(identity.cert_file),
               ssl_keyfile=str(identity.key_file)),
        _serve(create_app(fleet=fleet), http_port),
    ]
    _, admin = create_token(fleet.engine, Role.ADMIN, "installer-admin")
    try:
        yield Served(fleet, f"https://127.0.0.1:{https_port}", f"http://127.0.0.1:{http_port}", admin)
    finally:
        for server, thread in servers:
            server.should_exit = True
            thread.join(10)
        fleet.stop()


def provisioning_token(served: Served, *extra: str) -> str:
    result = CliRunner().invoke(cli_app, ["provisioning", "create", "--profile", "raspberry-pi-4", "--tags", "lab,a",
                                          "--url", served.http, "--token", served.admin_token, *extra])
    assert result.exit_code == 0, result.output
    [token] = [line for line in result.stdout.splitlines() if line.startswith("efp_")]
    return token


def agent_enroll_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="edgefleet agent")
    agent_enroll.add_parser(parser.add_subparsers(dest="command", required=True))
    return agent_enroll.run(parser.parse_args(["enroll", *argv]))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_enroll_over_https_writes_a_config_whose_credentials_connect(
        served: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: the operator makes a token and takes the fleet CA to the device
    ca = tmp_path / "fleet-ca.pem"
    token = provisioning_token(served, "--max-uses", "3", "--expires", "1h", "--ca-out", str(ca))
    data_dir = tmp_path / "device"
    # Execute
    code = agent_enroll_cli("--controlplane", served.https, "--token", token, "--device-id", "pi-0001",
                            "--data-dir", str(data_dir), "--ca-file", str(ca), "--train")
    # Assert: the files, their modes, and a config naming them
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"edgefleet agent run --config {data_dir / 'agent.toml'}" in out
    assert mode(data_dir) == 0o700
    for name in ("device.key", "mqtt-password", "supernode.key"):
        assert mode(data_dir / name) == 0o600, name
    config = tomllib.loads((data_dir / "agent.toml").read_text())
    assert config["device_id"] == config["mqtt"]["username"] == "pi-0001"
    assert config["profile"] == "raspberry-pi-4" and config["task"] == "digits"
    assert config["controlplane"] == served.https
    assert config["signing_key"] == served.fleet.signer.public_key_b64
    for name in (config["ca_file"], config["mqtt"]["password_file"], config["flower"]["auth_key_file"]):
        assert (data_dir / name).is_file(), name
    # the embedded broker here is plaintext (loopback): the certificate is written but not named as an identity
    assert config["broker"].startswith("mqtt://") and "tls" not in config
    assert not list(data_dir.glob(".*.tmp"))
    # the certificate names this device, is the fleet CA's, and is for the key generated here
    cert = x509.load_pem_x509_certificate((data_dir / "device.crt").read_bytes())
    key = serialization.load_pem_private_key((data_dir / "device.key").read_bytes(), password=None)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "pi-0001"
    cert.verify_directly_issued_by(x509.load_pem_x509_certificates((data_dir / "ca.pem").read_bytes())[0])
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]
    # the SuperNode key is what flower-supernode loads, P-384, and its public half is registered
    supernode = serialization.load_ssh_private_key((data_dir / "supernode.key").read_bytes(), password=None)
    assert isinstance(supernode, ec.EllipticCurvePrivateKey) and supernode.curve.name == "secp384r1"
    with Session(served.fleet.engine) as session:
        device = session.get(Device, "pi-0001")
        assert device is not None and device.flower_public_key == supernode.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    # the password connects to the control plane's embedded broker as this device
    password = (data_dir / "mqtt-password").read_text()
    assert connect(config["broker"], "pi-0001", password) == 0


def test_enroll_refuses_to_replace_an_enrolment_without_force(
        served: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    token = provisioning_token(served, "--max-uses", "3")
    data_dir = tmp_path / "device"
    assert agent_enroll_cli("--controlplane", served.http, "--token", token, "--device-id", "pi-0002",
                            "--data-dir", str(data_dir)) == 0
    before = (data_dir / "agent.toml").read_bytes(), (data_dir / "device.key").read_bytes()
    capsys.readouterr()
    # Execute
    refused = agent_enroll_cli("--controlplane", served.http, "--token", token, "--device-id", "pi-0003",
                               "--data-dir", str(data_dir))
    err = capsys.readouterr().err
    forced = agent_enroll_cli("--controlplane", served.http, "--token", token, "--device-id", "pi-0003",
                              "--data-dir", str(data_dir), "--force")
    # Assert: nothing was touched (nor enrolled) until --force
    assert refused == 2 and "--force" in err
    assert forced == 0
    assert tomllib.loads((data_dir / "agent.toml").read_text())["device_id"] == "pi-0003"
    assert (data_dir / "agent.toml").read_bytes() != before[0]
    assert (data_dir / "device.key").read_bytes() != before[1]


def test_https_without_the_ca_says_to_pass_ca_file_and_writes_nothing(
        served: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    token = provisioning_token(served)
    code = agent_enroll_cli("--controlplane", served.https, "--token", token, "--device-id", "pi-0004",
                            "--data-dir", str(tmp_path / "device"))
    err = capsys.readouterr().err
    assert code == 1
    assert "--ca-file" in err and "verify" in err
    assert not (tmp_path / "device" / "agent.toml").exists()
    assert served.fleet.devices.find(limit=1000) and all(
        d.device_id != "pi-0004" for d in served.fleet.devices.find(limit=1000))


def test_refusals_are_reported_with_the_server_reason(
        served: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: a used-up token, and a plain-http URL that is not loopback
    token = provisioning_token(served)
    assert agent_enroll_cli("--controlplane", served.http, "--token", token, "--device-id", "pi-0005",
                            "--data-dir", str(tmp_path / "a")) == 0
    capsys.readouterr()
    # Execute / Assert
    assert agent_enroll_cli("--controlplane", served.http, "--token", token, "--device-id", "pi-0006",
                            "--data-dir", str(tmp_path / "b")) == 1
    assert "403" in (err := capsys.readouterr().err) and "max_uses" in err
    assert agent_enroll_cli("--controlplane", served.http, "--token", served.admin_token, "--device-id", "pi-0006",
                            "--data-dir", str(tmp_path / "b")) == 1
    assert "401" in capsys.readouterr().err
    assert agent_enroll_cli("--controlplane", "http://192.0.2.1:8080", "--token", token,
                            "--data-dir", str(tmp_path / "c")) == 2
    assert "in clear" in capsys.readouterr().err
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_device_id_defaults_to_a_hash_of_the_machine_id(served: Served, tmp_path: Path) -> None:
    machine_id = Path("/etc/machine-id")
    if not machine_id.is_file() or not machine_id.read_text().strip():
        pytest.skip("this machine has no /etc/machine-id")
    expected = "dev-" + hashlib.sha256(machine_id.read_text().strip().encode()).hexdigest()[:12]
    if served.fleet.devices.find(limit=100_000) and any(
            d.device_id == expected for d in served.fleet.devices.find(limit=100_000)):
        pytest.skip(f"{expected} is enrolled already on this module's control plane")
    # Execute
    code = agent_enroll_cli("--controlplane", served.http, "--token", provisioning_token(served),
                            "--data-dir", str(tmp_path / "device"))
    # Assert
    assert code == 0
    assert tomllib.loads((tmp_path / "device" / "agent.toml").read_text())["device_id"] == expected
    assert agent_enroll.default_device_id((machine_id,)) == expected


def test_provisioning_cli_lists_and_revokes(served: Served) -> None:
    runner = CliRunner()
    common = ["--url", served.http, "--token", served.admin_token]
    token = provisioning_token(served, "--max-uses", "7", "--expires", "2d")
    listed = runner.invoke(cli_app, ["provisioning", "list", *common, "--json"])
    mine = [t for t in json.loads(listed.stdout) if t["max_uses"] == 7]
    assert token not in listed.stdout and len(mine) == 1 and mine[0]["state"] == "active"
    revoked = runner.invoke(cli_app, ["provisioning", "revoke", str(mine[0]["id"]), *common])
    table = runner.invoke(cli_app, ["provisioning", "list", *common])
    assert revoked.exit_code == 0, revoked.output
    assert any(line.split()[:2] == [str(mine[0]["id"]), "revoked"] for line in table.stdout.splitlines())
    assert runner.invoke(cli_app, ["provisioning", "revoke", "999999", *common]).exit_code == 1
    assert runner.invoke(cli_app, ["provisioning", "create", "--profile", "raspberry-pi-4", "--expires", "soon",
                                   *common]).exit_code == 2


@pytest.fixture(name="tls_mosquitto")
def fx_tls_mosquitto(served: Served, tmp_path: Path) -> Iterator[int]:
    """mosquitto with a TLS listener that takes the fleet CA's client certificates as identities."""
    binary = mosquitto_binary()
    if binary is None:
        service_missing("the mosquitto binary")
    assert binary is not None
    identity = served.fleet.pki.server
    port = free_port()
    config = tmp_path / "mosquitto.conf"
    config.write_text(f"user {getpass.getuser()}\nlistener {port} 127.0.0.1\ncafile {identity.ca_file}\n"
                      f"certfile {identity.cert_file}\nkeyfile {identity.key_file}\nrequire_certificate true\n"
                      "use_identity_as_username true\nallow_anonymous false\n")
    process = subprocess.Popen([binary, "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert wait_for_port("127.0.0.1", port, 10.0, process), "mosquitto (TLS) did not start"
        yield port
    finally:
        stop_process(process)


def test_config_names_the_certificate_for_a_tls_broker() -> None:
    # Prepare
    enrolled = {"device_id": "pi-1", "profile": "raspberry-pi-4", "broker_url": "mqtts://cp.example:8883",
                "signing_public_key": 'k"\\\n', "mqtt_username": "pi-1"}
    # Execute
    config = tomllib.loads(agent_enroll.toml_config(enrolled, controlplane="https://cp.example:8443", task="digits",
                                                    certificate=True, train=False))
    # Assert: escaped strings read back as written
    assert config["tls"] == {"cert_file": "device.crt", "key_file": "device.key"}
    assert config["signing_key"] == 'k"\\\n' and "flower" not in config


def test_enrolled_certificate_is_a_broker_identity(served: Served, tls_mosquitto: int, tmp_path: Path) -> None:
    # Prepare
    ca = tmp_path / "ca.pem"
    token = provisioning_token(served, "--ca-out", str(ca))
    data_dir = tmp_path / "device"
    assert agent_enroll_cli("--controlplane", served.https, "--token", token, "--device-id", "pi-tls",
                            "--data-dir", str(data_dir), "--ca-file", str(ca)) == 0
    # Execute
    with_cert = tls_connect(tls_mosquitto, data_dir, with_certificate=True)
    without = tls_connect(tls_mosquitto, data_dir, with_certificate=False)
    # Assert: the certificate alone is accepted (mosquitto maps its CN to the user); no certificate, no session
    assert with_cert == 0
    assert without != 0


def tls_connect(port: int, data_dir: Path, *, with_certificate: bool) -> int:
    """0 when the broker accepted the session and a publish to the device's own topic, else non-zero."""
    result: dict[str, int] = {}
    done = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="pi-tls", protocol=mqtt.MQTTv5)
    client.tls_set(ca_certs=str(data_dir / "ca.pem"),
                   certfile=str(data_dir / "device.crt") if with_certificate else None,
                   keyfile=str(data_dir / "device.key") if with_certificate else None)

    def on_connect(c: mqtt.Client, u: Any, flags: Any, reason: Any, props: Any) -> None:
        result["rc"] = int(reason.value)
        done.set()

    client.on_connect = on_connect
    try:
        client.connect("127.0.0.1", port)
    except OSError:
        return -1
    client.loop_start()
    try:
        if not done.wait(5):
            return -2
        if result["rc"] == 0:
            info = client.publish(wire.topic("pi-tls", wire.Channel.TELEMETRY), b"{}", qos=1)
            info.wait_for_publish(5)
            return 0 if info.is_published() else -3
        return result["rc"]
    finally:
        client.disconnect()
        client.loop_stop()


def test_a_redirect_is_refused_and_the_token_goes_nowhere_else(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: a "control plane" that redirects the enrolment to another server, which records what it gets
    import http.server

    seen: list[dict[str, str]] = []

    class Elsewhere(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(dict(self.headers))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"{}")

        do_POST = do_GET

        def log_message(self, *_: Any) -> None:
            pass

    elsewhere = http.server.HTTPServer(("127.0.0.1", 0), Elsewhere)
    target = f"http://127.0.0.1:{elsewhere.server_address[1]}/steal"

    class Redirecting(Elsewhere):
        def do_POST(self) -> None:
            self.send_response(302)
            self.send_header("Location", target)
            self.end_headers()

    redirecting = http.server.HTTPServer(("127.0.0.1", 0), Redirecting)
    servers = [elsewhere, redirecting]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for thread in threads:
        thread.start()
    try:
        # Execute
        code = agent_enroll_cli("--controlplane", f"http://127.0.0.1:{redirecting.server_address[1]}",
                                "--token", "ef_prov_secret", "--device-id", "pi-0100",
                                "--data-dir", str(tmp_path / "d"))
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
    # Assert
    assert code == 1
    err = capsys.readouterr().err
    assert "redirects the enrolment to" in err and target in err
    assert seen == []  # neither the token nor anything else reached the redirect target
    assert not (tmp_path / "d").exists()
