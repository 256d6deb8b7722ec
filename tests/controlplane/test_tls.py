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
    token = subprocess.run(_entry("tokens", "create", "--role", "admin", "--data-dir", str(data)),
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
@pytest.mark.parametrize("identity", ["password"])
def test_a_real_agent_reports_over_mqtts_and_downloads_over_https(served: Served, tmp_path: Path,
                                                                  identity: str) -> None:
    # Prepare: an enrolled device; its identity is its password, or a certificate of the fleet CA (key made here)
    device_id = f"pi-{identity[:4]}"
    status, enrolled = served.call("POST", "/api/v1/devices", {"device_id": device_id, "profile": "raspberry-pi-5"})
    assert status == 201, enrolled
    argv = _entry("agent", "run", "--device-id", device_id, "--profile", "raspberry-pi-5",
                  "--broker", enrolled["broker_url"], "--controlplane", served.api, "--ca-file", str(served.ca),
                  "--signing-key", enrolled["signing_public_key"], "--data-dir", str(tmp_path / "agent"),
                  "--telemetry-interval", "0.5", "--log-level", "info")
    env = dict(os.environ)
    env.pop("EDGEFLEET_MQTT_PASSWORD", None)
    if identity == "password":
        env["EDGEFLEET_MQTT_PASSWORD"] = enrolled["mqtt_password"]
    else:
        cert, key = _write_device_identity(tmp_path / "device", FleetPKI(served.data / "pki"), device_id)
        argv += ["--tls-cert", str(cert), "--tls-key", str(key)]
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
