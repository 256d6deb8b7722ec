"""TLS everywhere with the fleet's own CA (issue 10 §2), on real processes: `edgefleet controlplane serve` speaks
HTTPS only and its embedded broker MQTTS only once TLS is on; plaintext and other CAs get nothing; a real agent
with the fleet CA (and a password or a device certificate) reports telemetry over mqtts and downloads a deployed
model over https."""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import sqlite3
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID

from controlplane.pki import FleetPKI
from controlplane.settings import Settings, TlsMode
from tests._services import free_port, wait_for

NAME = "localhost"  # what the server certificate covers (--tls-name) and devices connect to


# -- settings ------------------------------------------------------------------------------------------------------
def test_tls_settings_auto_on_off() -> None:
    # auto: plaintext on loopback (development), TLS beyond it; on: always; off beyond loopback: refused
    assert not Settings(host="127.0.0.1").tls_enabled
    assert Settings(host="10.66.0.2").tls_enabled
    assert Settings(host="0.0.0.0").tls_enabled
    assert Settings(host="127.0.0.1", tls=TlsMode.ON).tls_enabled
    assert Settings(host="::1", tls=TlsMode.OFF).tls_enabled is False
    with pytest.raises(ValueError, match="plaintext is served on loopback only"):
        _ = Settings(host="0.0.0.0", tls=TlsMode.OFF).tls_enabled
    # the broker's default port follows: MQTTS 8883 with TLS, 1883 without
    assert Settings(host="10.66.0.2").broker_port == 8883
    assert Settings(host="127.0.0.1").broker_port == 1883
    assert Settings(host="10.66.0.2", embedded_broker_port=9000).broker_port == 9000


def test_tls_names_and_mode_from_the_environment() -> None:
    settings = Settings.from_env({"EDGEFLEET_TLS_NAMES": "cp.example, 10.0.0.2,,", "EDGEFLEET_TLS": "on"})
    assert settings.tls_names == ("cp.example", "10.0.0.2")
    assert settings.tls is TlsMode.ON
    with pytest.raises(ValueError, match="EDGEFLEET_TLS="):
        Settings.from_env({"EDGEFLEET_TLS": "maybe"})


def test_serve_refuses_plaintext_beyond_loopback_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run(_entry("controlplane", "serve", "--host", "0.0.0.0", "--tls", "off", "--port",
                                   str(free_port()), "--data-dir", str(tmp_path / "cp")),
                            check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "plaintext is served on loopback only" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


# -- a served control plane ------------------------------------------------------------------------------------------
@dataclass
class Served:
    data: Path
    api: str
    port: int
    broker_port: int
    token: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def ca(self) -> Path:
        return self.data / "pki" / "ca-bundle.pem"

    @property
    def db(self) -> Path:
        return self.data / "edgefleet.db"

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))

    def call(self, method: str, path: str, body: object = None) -> tuple[int, Any]:
        request = urllib.request.Request(f"{self.api}{path}", method=method,
                                         data=None if body is None else json.dumps(body).encode(),
                                         headers={"Authorization": f"Bearer {self.token}",
                                                  "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=15, context=self.context()) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")


def _entry(*args: str) -> list[str]:
    return [sys.executable, "-m", "controlplane._entry", *args]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(name="served")
def fx_served(tmp_path: Path) -> Iterator[Served]:
    """`edgefleet controlplane serve --tls on` on loopback (a name the certificate covers), embedded broker."""
    data = tmp_path / "cp"
    token = subprocess.run(_entry("tokens", "create", "--role", "admin", "--data-dir", str(data), "--create"),
                           capture_output=True, text=True, check=True).stdout.strip()
    port, broker_port = free_port(), free_port()
    log = tmp_path / "cp.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(_entry("controlplane", "serve", "--host", "127.0.0.1", "--port", str(port),
                                       "--tls", "on", "--tls-name", NAME, "--data-dir", str(data),
                                       "--embedded-broker-port", str(broker_port)),
                                stdout=out, stderr=subprocess.STDOUT)
    served = Served(data, f"https://{NAME}:{port}", port, broker_port, token, proc, log)
    try:
        def up() -> bool:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                return served.call("GET", "/healthz")[0] == 200
            except (OSError, ssl.SSLError):
                return False

        wait_for(up, timeout=60, what=f"the control plane over https (log {log})")
        yield served
    finally:
        _stop(proc)


def _plaintext_http_answer(port: int) -> str | None:
    """The status line a plaintext HTTP request gets, or None when no HTTP answer comes."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/healthz")
        return str(conn.getresponse().status)
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


@pytest.mark.integration
@pytest.mark.slow
def test_serve_with_tls_speaks_https_only(served: Served) -> None:
    # Positive control: verified against the fleet CA, the API answers (and says who it is)
    status, body = served.call("GET", "/healthz")
    assert status == 200 and body["status"] == "ok"
    # The startup line names https and the CA file devices need
    line = next(x for x in served.log.read_text().splitlines() if x.startswith("control plane on"))
    assert f"https://127.0.0.1:{served.port}" in line and str(served.ca) in line, line
    # Plaintext HTTP gets no HTTP answer on the same port
    assert _plaintext_http_answer(served.port) is None
    # A client that does not trust the fleet CA refuses the server (no silent fallback to another trust store)
    with pytest.raises(urllib.error.URLError) as refused:
        urllib.request.urlopen(f"{served.api}/healthz", timeout=10,
                               context=ssl.create_default_context())
    assert isinstance(refused.value.reason, ssl.SSLCertVerificationError)
    # Devices are told mqtts:// on the certificate's name
    status, enrolled = served.call("POST", "/api/v1/devices", {"device_id": "pi-tls", "profile": "raspberry-pi-5"})
    assert status == 201, enrolled
    assert enrolled["broker_url"] == f"mqtts://{NAME}:{served.broker_port}?protocol=3.1.1"


@pytest.mark.integration
@pytest.mark.slow
def test_the_operator_cli_verifies_the_control_plane_with_the_fleet_ca(served: Served) -> None:
    argv = _entry("deployments", "list", "--url", served.api, "--token", served.token, "--json")
    env = {k: v for k, v in os.environ.items() if k != "EDGEFLEET_CA_FILE"}
    # Without the fleet CA the server is not trusted (no fallback to plaintext or to no verification) ...
    refused = subprocess.run(argv, env=env, check=False, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "CERTIFICATE_VERIFY_FAILED" in refused.stderr, refused.stderr[-2000:]
    assert "EDGEFLEET_CA_FILE" in refused.stderr and "Traceback" not in refused.stderr
    # ... with it, the API answers
    trusted = subprocess.run(argv, env={**env, "EDGEFLEET_CA_FILE": str(served.ca)}, check=False,
                             capture_output=True, text=True, timeout=60)
    assert trusted.returncode == 0, trusted.stderr[-2000:]
    assert json.loads(trusted.stdout) == []


# -- the embedded broker over TLS ----------------------------------------------------------------------------------
def _write_device_identity(directory: Path, pki: FleetPKI, device_id: str, cn: str | None = None) -> tuple[Path, Path]:
    """A device key made here (as on the device) and the certificate the CA issues for its CSR."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn or device_id)]))
           .sign(key, hashes.SHA256()))
    cert = pki.issue_device_certificate(csr.public_bytes(serialization.Encoding.PEM), device_id)
    cert_file, key_file = directory / f"{device_id}.crt", directory / f"{device_id}.key"
    cert_file.write_bytes(cert.cert_pem)
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_file.chmod(0o600)
    return cert_file, key_file


def mqtt_connect(port: int, client_id: str, *, tls: ssl.SSLContext | None, username: str | None = None,
                 password: str | None = None, subscribe: str | None = None, publish: str | None = None
                 ) -> dict[str, Any]:
    """One MQTT 3.1.1 connection: {"connack": "success" | reason | "error: ...", "suback": [...]}."""
    out: dict[str, Any] = {}
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    if tls is not None:
        client.tls_set_context(tls)
    if username is not None:
        client.username_pw_set(username, password)

    def on_connect(c: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        out["connack"] = "success" if not reason.is_failure else str(reason)
        if not reason.is_failure and subscribe:
            c.subscribe(subscribe, qos=1)

    def on_subscribe(c: mqtt.Client, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        out["suback"] = ["granted" if not r.is_failure else str(r) for r in reasons]

    client.on_connect, client.on_subscribe = on_connect, on_subscribe
    try:
        client.connect("127.0.0.1" if tls is None else NAME, port, keepalive=10)
    except (OSError, ssl.SSLError) as exc:
        return {"connack": f"error: {exc}"}
    deadline = time.monotonic() + 8
    try:
        while time.monotonic() < deadline:
            if client.loop(0.1) not in (mqtt.MQTT_ERR_SUCCESS,):
                out.setdefault("connack", "error: connection lost")
            if "connack" in out and (out["connack"] != "success" or not subscribe or "suback" in out):
                break
        if publish and out.get("connack") == "success":
            info = client.publish(publish, b"{}", qos=1)
            info.wait_for_publish(5)
    except (OSError, ssl.SSLError, ValueError, RuntimeError) as exc:
        out.setdefault("connack", f"error: {exc}")
    finally:
        client.disconnect()
    out.setdefault("connack", "no answer")
    return out


@pytest.mark.integration
@pytest.mark.slow
def test_the_tls_broker_refuses_plaintext_other_cas_and_no_credentials(served: Served, tmp_path: Path) -> None:
    status, enrolled = served.call("POST", "/api/v1/devices", {"device_id": "pi-b", "profile": "raspberry-pi-5"})
    assert status == 201, enrolled
    ours = served.context()
    # Positive control: TLS verified against the fleet CA with the device's password gets in
    assert mqtt_connect(served.broker_port, "pi-b", tls=ours, username="pi-b",
                        password=enrolled["mqtt_password"])["connack"] == "success"
    # Plaintext on the MQTTS port: not even a CONNACK
    plain = mqtt_connect(served.broker_port, "pi-b", tls=None, username="pi-b", password=enrolled["mqtt_password"])
    assert plain["connack"] != "success", plain
    # TLS without credentials, and with a guessed password: refused by the broker
    assert mqtt_connect(served.broker_port, "pi-b", tls=ours)["connack"] != "success"
    assert mqtt_connect(served.broker_port, "pi-b", tls=ours, username="pi-b",
                        password="guess")["connack"] != "success"
    # A client certificate of another CA: the handshake fails
    other = FleetPKI(tmp_path / "other-ca", server_names=[NAME]).ensure()
    cert, key = _write_device_identity(tmp_path / "other", other, "pi-b")
    theirs = served.context()
    theirs.load_cert_chain(cert, key)
    assert mqtt_connect(served.broker_port, "pi-b", tls=theirs, username="pi-b")["connack"] != "success"
    # A client trusting only another CA refuses our broker (it is not that CA's server)
    assert mqtt_connect(served.broker_port, "pi-b",
                        tls=ssl.create_default_context(cafile=str(other.server.ca_file)))["connack"] != "success"


@pytest.mark.integration
@pytest.mark.slow
def test_the_embedded_broker_takes_a_device_certificate_for_its_enrolled_id_only(served: Served,
                                                                                 tmp_path: Path) -> None:
    # Prepare: pi-c enrolled; fleet certificates for it and for an id nobody enrolled
    status, _ = served.call("POST", "/api/v1/devices", {"device_id": "pi-c", "profile": "raspberry-pi-5"})
    assert status == 201
    pki = FleetPKI(served.data / "pki")
    cert, key = _write_device_identity(tmp_path / "c", pki, "pi-c")
    ghost_cert, ghost_key = _write_device_identity(tmp_path / "g", pki, "pi-ghost")

    def tls(cert_file: Path, key_file: Path) -> ssl.SSLContext:
        context = served.context()
        context.load_cert_chain(cert_file, key_file)
        return context

    # Execute / Assert: the certificate alone is pi-c (no password), with or without its username; its own
    # commands only
    assert mqtt_connect(served.broker_port, "pi-c", tls=tls(cert, key), subscribe="edgefleet/v1/devices/pi-c/cmd") \
        == {"connack": "success", "suback": ["granted"]}
    assert mqtt_connect(served.broker_port, "pi-c", tls=tls(cert, key), username="pi-c")["connack"] == "success"
    theirs = mqtt_connect(served.broker_port, "pi-c", tls=tls(cert, key), subscribe="edgefleet/v1/devices/x/cmd")
    assert theirs["connack"] == "success" and theirs["suback"] != ["granted"], theirs
    # Refused: another username than the certificate's id (even the control plane's), another client id, a
    # certificate of an id that is not enrolled
    assert mqtt_connect(served.broker_port, "pi-c", tls=tls(cert, key), username="edgefleet-controlplane",
                        password="x")["connack"] != "success"
    assert mqtt_connect(served.broker_port, "pi-x", tls=tls(cert, key))["connack"] != "success"
    assert mqtt_connect(served.broker_port, "pi-ghost", tls=tls(ghost_cert, ghost_key))["connack"] != "success"
    # A removed device is refused with its still valid certificate, and its live connection is ended
    live = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="pi-c", protocol=mqtt.MQTTv311)
    live.tls_set_context(tls(cert, key))
    live.connect(NAME, served.broker_port)
    live.loop_start()
    try:
        wait_for(live.is_connected, timeout=10, what="pi-c connected by certificate")
        status, _ = served.call("DELETE", "/api/v1/devices/pi-c")
        assert status in (200, 204)
        live.reconnect_delay_set(0.2, 0.5)
        wait_for(lambda: not live.is_connected(), timeout=15, what="the removed device's session ended")
    finally:
        live.disconnect()
        live.loop_stop()
    assert mqtt_connect(served.broker_port, "pi-c", tls=tls(cert, key))["connack"] != "success"


# -- a real agent over TLS -------------------------------------------------------------------------------------------
def _register_starter(served: Served, version: str) -> None:
    """A model version whose variants are the shipped starter models (golden output what they compute), registered
    in the control plane's database the way a build does."""
    from agent.manifest import (
        Golden,
        ModelManifest,
        ModelSource,
        SignedManifest,
        canonical_bytes,
        file_sha256,
        key_id,
    )
    from agent.runtime import TFLiteModel, starter_model_path
    from controlplane.db import create_db_engine
    from controlplane.models import ModelService

    signing = Ed25519PrivateKey.generate()
    raw = signing.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    published = []
    for variant, file_variant in (("fp32", "fp32"), ("full-int8", "int8")):
        path = starter_model_path(file_variant)
        output = TFLiteModel.load(path).predict(np.zeros((1, 64), dtype=np.float32)).tolist()
        manifest = ModelManifest(
            model_version=version, task="digits", variant=variant, file_name=f"{version}-{variant}.tflite",
            sha256=file_sha256(path), size_bytes=path.stat().st_size,
            runtimes={"ai-edge-litert": "2.3.0", "tflite-runtime": "2.14.0"}, source=ModelSource(kind="test", id="1"),
            metrics={"accuracy": 0.9}, input_scale=1 / 16,
            golden=Golden(input=[[0.0] * 64], output=output, tolerance=1.0),
        )
        published.append((SignedManifest(manifest=manifest, key_id=key_id(raw),
                                         signature=base64.b64encode(signing.sign(canonical_bytes(manifest))).decode()),
                          path))
    engine = create_db_engine(f"sqlite:///{served.db}")
    try:
        models = ModelService(engine, served.data / "models")
        models.start_version(version, "digits", "test", "1")
        models.register_build(version, published, {}, {"accuracy": 0.9})
    finally:
        engine.dispose()


def _rows(db: Path, sql: str, *params: object) -> list[tuple[Any, ...]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
        return list(conn.execute(sql, params))


def _reported_state(served: Served, device_id: str) -> dict[str, Any]:
    status, device = served.call("GET", f"/api/v1/devices/{device_id}")
    assert status == 200, device
    return dict(device.get("reported_state") or {})


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("identity", ["password", "certificate"])
def test_a_real_agent_reports_over_mqtts_and_downloads_over_https(served: Served, tmp_path: Path,
                                                                  identity: str) -> None:
    # Prepare: an enrolled device; its identity is its password, or a certificate of the fleet CA (key made here)
    # (flags), or a certificate of the fleet CA whose key was made here, named by a device config file
    device_id = f"pi-{identity[:4]}"
    status, enrolled = served.call("POST", "/api/v1/devices", {"device_id": device_id, "profile": "raspberry-pi-5"})
    assert status == 201, enrolled
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    if identity == "password":
        argv = _entry("agent", "run", "--device-id", device_id, "--profile", "raspberry-pi-5",
                      "--broker", enrolled["broker_url"], "--controlplane", served.api, "--ca-file", str(served.ca),
                      "--signing-key", enrolled["signing_public_key"])
        env["EDGEFLEET_MQTT_PASSWORD"] = enrolled["mqtt_password"]
    else:
        etc = tmp_path / "etc"
        _write_device_identity(etc, FleetPKI(served.data / "pki"), device_id)
        (etc / "ca.pem").write_bytes(served.ca.read_bytes())
        (etc / "agent.toml").write_text(
            f'device_id = "{device_id}"\nprofile = "raspberry-pi-5"\ncontrolplane = "{served.api}"\n'
            f'broker = "{enrolled["broker_url"]}"\nca_file = "ca.pem"\ntask = "digits"\n'
            f'signing_key = "{enrolled["signing_public_key"]}"\n'
            f'[tls]\ncert_file = "{device_id}.crt"\nkey_file = "{device_id}.key"\n')
        argv = _entry("agent", "run", "--config", str(etc / "agent.toml"))
    argv += ["--data-dir", str(tmp_path / "agent"), "--telemetry-interval", "0.5", "--log-level", "info"]
    log = tmp_path / "agent.log"
    with log.open("wb") as out:
        agent = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        # Execute / Assert: telemetry over mqtts reaches the database
        wait_for(lambda: bool(_rows(served.db, "SELECT seq FROM telemetry WHERE device_id = ?", device_id)),
                 timeout=60, what=f"telemetry from the agent over mqtts (log {log})")
        # ... and a deployed model is downloaded over https (verified against the fleet CA) and activated
        _register_starter(served, "tls-1")
        status, created = served.call("POST", "/api/v1/deployments",
                                      {"model_version": "tls-1", "targets": {"device_ids": [device_id]}})
        assert status == 201, created
        wait_for(lambda: served.call("GET", f"/api/v1/deployments/{created['id']}")[1]["status"] != "running",
                 timeout=90, what="the rollout to finish")
        status, result = served.call("GET", f"/api/v1/deployments/{created['id']}")
        assert result["status"] == "succeeded", (result, log.read_text()[-3000:])
        wait_for(lambda: _reported_state(served, device_id).get("active_model") == "tls-1", timeout=30,
                 what="the agent to report the deployed model")
        assert f"{served.api}/api/v1/deployments/" in log.read_text()  # it was fetched over https
    finally:
        _stop(agent)


# -- mosquitto with deploy/mosquitto/mosquitto.conf ------------------------------------------------------------------
DEPLOY_CONF = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto" / "mosquitto.conf"


@dataclass
class TlsMosquitto:
    local: int  # plaintext, loopback: the control plane
    certs: int  # mutual TLS: certificate devices
    passwords: int  # TLS: password devices
    admin_url: str
    admin_password: str
    pki: FleetPKI
    proc: subprocess.Popen[bytes]
    log: Path


@pytest.fixture(name="tls_mosquitto")
def fx_tls_mosquitto(tmp_path: Path) -> Iterator[TlsMosquitto]:
    """A private mosquitto running the shipped config, with only its paths and ports changed to this test's (the
    fleet CA's files in place of /etc/mosquitto/certs)."""
    from tests.conftest import find_mosquitto
    from tests.processes import stop_process, wait_for_port

    mosquitto, ctrl, plugin = find_mosquitto()
    # The fleet CA where a control plane with data dir tmp_path/cp keeps it
    pki = FleetPKI(tmp_path / "cp" / "pki", server_names=[NAME, "127.0.0.1"]).ensure()
    dynsec = tmp_path / "dynamic-security.json"
    admin_password = base64.urlsafe_b64encode(os.urandom(12)).decode()
    subprocess.run([ctrl, "dynsec", "init", str(dynsec), "edgefleet-admin", admin_password], check=True,
                   stdin=subprocess.DEVNULL, capture_output=True)
    ports = {"1883": free_port(), "8883": free_port(), "8884": free_port()}
    lines = []
    for line in DEPLOY_CONF.read_text().splitlines():
        words = line.split()
        if words[:1] == ["listener"]:
            line = f"listener {ports[words[1]]} 127.0.0.1"
        elif words[:1] == ["plugin"]:
            line = f"plugin {plugin}"
        elif words[:1] == ["plugin_opt_config_file"]:
            line = f"plugin_opt_config_file {dynsec}"
        elif words[:1] in (["persistence"], ["persistence_location"], ["autosave_interval"]):
            continue
        lines.append(line.replace("/etc/mosquitto/certs/", f"{pki.directory}/"))
    if os.geteuid() == 0:
        lines.append("user root")  # else mosquitto drops to 'mosquitto', which cannot read our tmp dir
    config = tmp_path / "mosquitto.conf"
    config.write_text("\n".join(lines) + "\npersistence false\n")
    assert "require_certificate true" in config.read_text() and "use_identity_as_username true" in config.read_text()
    log = tmp_path / "mosquitto.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([mosquitto, "-c", str(config)], stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        for port in ports.values():
            assert wait_for_port("127.0.0.1", port, 10.0, proc), log.read_text()[-3000:]
        yield TlsMosquitto(ports["1883"], ports["8883"], ports["8884"],
                           f"mqtt://edgefleet-admin:{admin_password}@127.0.0.1:{ports['1883']}", admin_password,
                           pki, proc, log)
    finally:
        stop_process(proc)


class _Watcher:
    """The control plane's view: subscribed to every device topic as the broker admin; what arrives, by topic."""

    def __init__(self, port: int, password: str) -> None:
        self.seen: list[str] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="watcher", protocol=mqtt.MQTTv5)
        self.client.username_pw_set("edgefleet-admin", password)
        self.client.on_message = lambda c, u, m: self.seen.append(m.topic)
        subscribed: list[int] = []
        self.client.on_subscribe = lambda c, u, mid, reasons, p: subscribed.append(mid)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe("edgefleet/v1/devices/#", qos=1)
        wait_for(lambda: bool(subscribed), timeout=10, what="the watcher's subscription")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.integration
@pytest.mark.slow
def test_mosquitto_tls_config_maps_device_certificates_to_their_ids(tls_mosquitto: TlsMosquitto,
                                                                     tmp_path: Path) -> None:
    # Prepare: pi-1 enrolled through dynsec as the control plane does it; certificates from the fleet CA for pi-1
    # and for an id nobody enrolled, and one for pi-1 from another CA
    from controlplane.broker import MosquittoDynsecAuth

    broker = tls_mosquitto
    auth = MosquittoDynsecAuth.from_url(broker.admin_url)
    try:
        auth.prepare()
        auth.ensure_device("pi-1", "pi-1-password")
        auth.ensure_device("pi-2", "pi-2-password")
    finally:
        auth.close()
    cert, key = _write_device_identity(tmp_path / "dev", broker.pki, "pi-1")
    ghost_cert, ghost_key = _write_device_identity(tmp_path / "ghost", broker.pki, "pi-ghost")
    other = FleetPKI(tmp_path / "other-ca", server_names=[NAME]).ensure()
    foreign_cert, foreign_key = _write_device_identity(tmp_path / "foreign", other, "pi-1")

    def tls(cert_file: Path | None = None, key_file: Path | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(broker.pki.server.ca_file))
        if cert_file is not None:
            context.load_cert_chain(cert_file, key_file)
        return context

    watcher = _Watcher(broker.local, broker.admin_password)
    try:
        # Execute / Assert: the certificate alone is the identity (no username, no password, any client id):
        # it may subscribe to its own commands, not another device's
        own = mqtt_connect(broker.certs, "anything", tls=tls(cert, key), subscribe="edgefleet/v1/devices/pi-1/cmd")
        assert own == {"connack": "success", "suback": ["granted"]}, (own, broker.log.read_text()[-2000:])
        theirs = mqtt_connect(broker.certs, "x", tls=tls(cert, key), subscribe="edgefleet/v1/devices/pi-2/cmd")
        assert theirs["connack"] == "success" and theirs["suback"] != ["granted"], theirs
        # ... and publish its own telemetry; a publish as another device goes nowhere
        mqtt_connect(broker.certs, "x", tls=tls(cert, key), publish="edgefleet/v1/devices/pi-1/telemetry")
        mqtt_connect(broker.certs, "x", tls=tls(cert, key), publish="edgefleet/v1/devices/pi-2/telemetry")
        wait_for(lambda: "edgefleet/v1/devices/pi-1/telemetry" in watcher.seen, timeout=10,
                 what="pi-1's own telemetry at the control plane")
        time.sleep(0.5)
        assert "edgefleet/v1/devices/pi-2/telemetry" not in watcher.seen
        # Naming another device's client id takes nothing from it: the certificate's id is the client id
        victim = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="pi-2", protocol=mqtt.MQTTv311)
        victim.tls_set_context(tls())
        victim.username_pw_set("pi-2", "pi-2-password")
        dropped: list[object] = []
        victim.on_disconnect = lambda *args: dropped.append(args)
        victim.connect(NAME, broker.passwords)
        victim.loop_start()
        try:
            wait_for(victim.is_connected, timeout=10, what="pi-2 connected")
            assert mqtt_connect(broker.certs, "pi-2", tls=tls(cert, key))["connack"] == "success"
            time.sleep(1)
            assert victim.is_connected() and not dropped
        finally:
            victim.disconnect()
            victim.loop_stop()
        # A valid fleet certificate of a device nobody enrolled gets nothing
        ghost = mqtt_connect(broker.certs, "x", tls=tls(ghost_cert, ghost_key),
                             subscribe="edgefleet/v1/devices/pi-ghost/cmd")
        assert ghost.get("suback") != ["granted"], ghost
        # Refused on the certificate port: plaintext, TLS without a certificate, a certificate of another CA
        assert mqtt_connect(broker.certs, "pi-1", tls=None)["connack"] != "success"
        assert mqtt_connect(broker.certs, "pi-1", tls=tls(), username="pi-1",
                            password="pi-1-password")["connack"] != "success"
        assert mqtt_connect(broker.certs, "pi-1", tls=tls(foreign_cert, foreign_key))["connack"] != "success"
        # The password port: TLS with the password (the control), not without it, never plaintext
        assert mqtt_connect(broker.passwords, "pi-1", tls=tls(), username="pi-1",
                            password="pi-1-password")["connack"] == "success"
        assert mqtt_connect(broker.passwords, "pi-1", tls=tls(), username="pi-1",
                            password="guess")["connack"] != "success"
        assert mqtt_connect(broker.passwords, "pi-1", tls=None, username="pi-1",
                            password="pi-1-password")["connack"] != "success"
    finally:
        watcher.close()


@pytest.mark.integration
@pytest.mark.slow
def test_a_control_plane_over_mqtts_to_mosquitto_and_a_certificate_agent(tls_mosquitto: TlsMosquitto,
                                                                         tmp_path: Path) -> None:
    """The production path: the control plane reaches mosquitto over TLS (the password listener, verified against
    the fleet CA) and manages dynsec there; a device with a fleet certificate reports through the certificate
    listener."""
    from controlplane.devices.schemas import DeviceCreate
    from controlplane.settings import BrokerAuthMode
    from controlplane.wiring import Fleet

    broker = tls_mosquitto
    fleet = Fleet(Settings(data_dir=tmp_path / "cp", broker_url=f"mqtts://edgefleet-admin@{NAME}:{broker.passwords}",
                           broker_password=broker.admin_password, broker_auth=BrokerAuthMode.DYNSEC,
                           device_broker_url=f"mqtts://{NAME}:{broker.certs}")).start()
    agent: subprocess.Popen[bytes] | None = None
    try:
        assert fleet.broker.tls and fleet.broker.ca_file == str(fleet.pki.server.ca_file)
        enrolled = fleet.devices.enroll(DeviceCreate(device_id="pi-9", profile="raspberry-pi-5"))
        cert, key = _write_device_identity(tmp_path / "dev", fleet.pki, "pi-9")
        log = tmp_path / "agent.log"
        with log.open("wb") as out:
            agent = subprocess.Popen(
                _entry("agent", "run", "--device-id", "pi-9", "--profile", "raspberry-pi-5", "--broker",
                       enrolled.broker_url, "--ca-file", str(fleet.pki.server.ca_file), "--tls-cert", str(cert),
                       "--tls-key", str(key), "--data-dir", str(tmp_path / "agent"), "--telemetry-interval", "0.5"),
                env={k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")},
                stdout=out, stderr=subprocess.STDOUT)
        wait_for(lambda: bool(fleet.devices.telemetry("pi-9", since=None, until=None, limit=10)), timeout=60,
                 what=f"telemetry of the certificate agent through mosquitto (log {log}, {broker.log})")
        assert fleet.devices.get("pi-9").online
    finally:
        if agent is not None:
            _stop(agent)
        fleet.stop()


@pytest.mark.integration
@pytest.mark.parametrize("mode", [TlsMode.ON, TlsMode.AUTO])
def test_the_flower_superlink_follows_the_tls_rule(tmp_path: Path, mode: TlsMode) -> None:
    """With TLS the round runner's SuperLink gets the fleet's server identity and SuperNode authentication, and
    devices are sent to the Fleet API proxy on the control plane's address; plaintext on loopback otherwise."""
    pytest.importorskip("flwr")
    from controlplane.wiring import Fleet

    fleet = Fleet(Settings(data_dir=tmp_path / "cp", tls=mode, tls_names=(NAME,),
                           embedded_broker_port=free_port())).start(ingest=False)
    try:
        runner = fleet.runner
        assert runner is not None
        if mode is TlsMode.ON:
            assert runner.tls == fleet.pki.server and runner.supernode_auth
            assert runner.unregister in fleet.devices.before_delete
        else:
            assert runner.tls is None and not runner.supernode_auth
        assert runner.superlink_host == "127.0.0.1"
    finally:
        fleet.stop()
