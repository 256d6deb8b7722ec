"""Renewing the fleet CA with the fleet online (issue 10 §5): a real control plane served with TLS on loopback
(its embedded MQTTS broker), a real agent enrolled through provisioning with a device certificate; the CA is
renewed, completed and the old one retired, and the same device — never re-provisioned — keeps reporting over
MQTTS across two restarts of the control plane. A forged bundle is refused by the device; after retirement the
broker refuses a certificate of the old CA. The device-side checks (signature, replay, certificate for its own key
and id) run on real files and keys too."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from agent import protocol as wire
from agent.manifest import key_id
from agent.trust import (
    CaBundle,
    SignedCaBundle,
    apply_ca_command,
    ca_bundle_bytes,
    pending_key_file,
    trust_store_for,
)
from controlplane.pki import FleetPKI
from tests._services import free_port, wait_for

NAME = "localhost"


def _source(module: Any, name: str) -> str:
    return (Path(module.__file__).parent / name).read_text()


# -- device side: real files, real keys -----------------------------------------------------------------------------
def _raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _signed_bundle(signing: Ed25519PrivateKey, pem: bytes, number: int,
                   prints: list[str] | None = None) -> dict[str, Any]:
    if prints is None:
        prints = [hashlib.sha256(c.public_bytes(serialization.Encoding.DER)).hexdigest()
                  for c in x509.load_pem_x509_certificates(pem)]
    statement = CaBundle(number=number, bundle_pem=pem.decode(), fingerprints=prints, issued_at=int(time.time()))
    signed = SignedCaBundle(statement=statement, key_id=key_id(_raw(signing)),
                            signature=base64.b64encode(signing.sign(ca_bundle_bytes(statement))).decode())
    return msgspec.to_builtins(signed)  # type: ignore[no-any-return]


def _command(kind: str, **args: Any) -> wire.Command:
    return wire.Command(command_id=os.urandom(8).hex(), kind=kind, args=args)


def _public(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def test_the_device_takes_only_a_newer_bundle_signed_by_a_key_it_trusts(tmp_path: Path) -> None:
    # Prepare: a device trusting one signing key, with the fleet CA file of before the renewal
    pki = FleetPKI(tmp_path / "pki").ensure()
    old_bundle = pki.ca_bundle_pem
    ca_file = tmp_path / "device" / "ca.pem"
    ca_file.parent.mkdir()
    ca_file.write_bytes(old_bundle)
    trusted, forger = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    store = trust_store_for(tmp_path / "device", _raw(trusted))
    pki.begin_ca_renewal()
    both = pki.ca_bundle_pem

    def apply(statement: dict[str, Any]) -> tuple[bool, str | None, dict[str, Any]]:
        return apply_ca_command(store, _command("trust_ca", statement=statement), "pi-1", ca_file=ca_file,
                                cert_file=None, key_file=None)

    # Execute / Assert: a bundle signed by an untrusted key is refused and the CA file is untouched
    ok, reason, _ = apply(_signed_bundle(forger, both, 2))
    assert not ok and "signed by key" in (reason or "")
    assert ca_file.read_bytes() == old_bundle
    # a tampered statement (the bundle swapped after signing) is refused
    tampered = _signed_bundle(trusted, both, 2)
    tampered["statement"]["bundle_pem"] = FleetPKI(tmp_path / "other").ensure().ca_bundle_pem.decode()
    ok, reason, _ = apply(tampered)
    assert not ok and "bad signature" in (reason or "")
    # (signed) fingerprints that do not name the bundle's certificates are refused
    ok, reason, _ = apply(_signed_bundle(trusted, both, 2, prints=["0" * 64, "1" * 64]))
    assert not ok and "fingerprints" in (reason or "")
    # the real statement is taken: the CA file holds both CAs, written whole
    ok, reason, result = apply(_signed_bundle(trusted, both, 2))
    assert ok, reason
    assert ca_file.read_bytes() == both and len(result["ca_fingerprints"]) == 2
    assert json.loads((tmp_path / "device" / "trust.json").read_bytes())["ca_bundle"] == 2
    # the same one again (a re-sent command) is fine; an older number (replay) is refused
    assert apply(_signed_bundle(trusted, both, 2))[0]
    ok, reason, _ = apply(_signed_bundle(trusted, old_bundle, 1))
    assert not ok and "replay" in (reason or "")
    assert ca_file.read_bytes() == both


def test_the_device_installs_only_a_certificate_for_its_new_key_its_id_and_a_ca_it_trusts(tmp_path: Path) -> None:
    # Prepare: an enrolled device (key + certificate of CA 0); the renewal's bundle is its CA file
    pki = FleetPKI(tmp_path / "pki").ensure()
    device = tmp_path / "device"
    device.mkdir()
    cert_file, key_file, ca_file = device / "device.crt", device / "device.key", device / "ca.pem"
    old_key = ec.generate_private_key(ec.SECP256R1())
    key_file.write_bytes(_key_pem(old_key))
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(
        NameOID.COMMON_NAME, "pi-1")])).sign(old_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(pki.issue_device_certificate(csr, "pi-1").cert_pem)
    pki.begin_ca_renewal()
    ca_file.write_bytes(pki.ca_bundle_pem)
    store = trust_store_for(device, None)

    def run(kind: str, **args: Any) -> tuple[bool, str | None, dict[str, Any]]:
        return apply_ca_command(store, _command(kind, **args), "pi-1", ca_file=ca_file, cert_file=cert_file,
                                key_file=key_file)

    # Execute: the control plane asks for a CSR (twice: a re-sent command reuses the waiting key)
    ok, reason, first = run("renew_certificate", renewal=1)
    assert ok, reason
    ok, reason, again = run("renew_certificate", renewal=1)
    def public(csr_pem: str) -> bytes:
        return x509.load_pem_x509_csr(csr_pem.encode()).public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)

    assert public(again["csr"]) == public(first["csr"]) != _public(old_key)
    # Assert: a new key waits beside the old one (0600); the one in use is untouched
    pending = pending_key_file(key_file)
    assert pending.stat().st_mode & 0o777 == 0o600
    assert key_file.read_bytes() == _key_pem(old_key)
    new_cert = pki.issue_device_certificate(first["csr"], "pi-1", ca=1).cert_pem.decode()
    # refused: another device's certificate, one for another key, one of a CA the device does not trust
    other_id = pki.issue_device_certificate(first["csr"], "pi-2", ca=1).cert_pem.decode()
    ok, reason, _ = run("install_certificate", renewal=1, certificate=other_id)
    assert not ok and "this device is 'pi-1'" in (reason or "")
    ok, reason, _ = run("install_certificate", renewal=1, certificate=pki.issue_device_certificate(
        csr, "pi-1", ca=1).cert_pem.decode())
    assert not ok and "not for the key" in (reason or "")
    foreign = FleetPKI(tmp_path / "foreign").ensure().issue_device_certificate(first["csr"], "pi-1")
    ok, reason, _ = run("install_certificate", renewal=1, certificate=foreign.cert_pem.decode())
    assert not ok and "not issued by a CA" in (reason or "")
    assert key_file.read_bytes() == _key_pem(old_key)
    # taken: the certificate of the new CA for the new key; the pair is what TLS loads, the old key is gone
    ok, reason, _result = run("install_certificate", renewal=1, certificate=new_cert)
    assert ok, reason
    assert cert_file.read_text() == new_cert and not pending.exists()
    assert key_file.stat().st_mode & 0o777 == 0o600
    ssl.create_default_context().load_cert_chain(cert_file, key_file)
    x509.load_pem_x509_certificate(new_cert.encode()).verify_directly_issued_by(
        x509.load_pem_x509_certificate((tmp_path / "pki" / "ca.1.pem").read_bytes()))
    assert run("install_certificate", renewal=1, certificate=new_cert)[0]  # re-sent: already installed


def test_a_device_without_a_client_certificate_says_so_and_one_without_a_ca_file_refuses(tmp_path: Path) -> None:
    store = trust_store_for(tmp_path, None)
    ok, _, result = apply_ca_command(store, _command("renew_certificate", renewal=1), "pi-1", ca_file=None,
                                     cert_file=None, key_file=None)
    assert ok and result == {"client_certificate": False}
    ok, reason, _ = apply_ca_command(store, _command("trust_ca", statement={}), "pi-1", ca_file=None,
                                     cert_file=None, key_file=None)
    assert not ok and "system store" in (reason or "")


# -- end to end: a served control plane and a real agent -----------------------------------------------------------
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


@dataclass
class ControlPlane:
    """`edgefleet controlplane serve --tls on` on loopback that can be restarted on the same data and ports."""

    data: Path
    port: int
    broker_port: int
    token: str
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def api(self) -> str:
        return f"https://{NAME}:{self.port}"

    @property
    def bundle(self) -> Path:
        return self.data / "pki" / "ca-bundle.pem"

    @property
    def db(self) -> Path:
        return self.data / "edgefleet.db"

    def call(self, method: str, path: str, body: object = None) -> tuple[int, Any]:
        request = urllib.request.Request(f"{self.api}{path}", method=method,
                                         data=None if body is None else json.dumps(body).encode(),
                                         headers={"Authorization": f"Bearer {self.token}",
                                                  "Content-Type": "application/json"})
        context = ssl.create_default_context(cafile=str(self.bundle))
        try:
            with urllib.request.urlopen(request, timeout=15, context=context) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "EDGEFLEET_CA_FILE": str(self.bundle)}
        return subprocess.run(_entry(*args, "--url", self.api, "--token", self.token), env=env, check=False,
                              capture_output=True, text=True, timeout=60)

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                _entry("controlplane", "serve", "--host", "127.0.0.1", "--port", str(self.port), "--tls", "on",
                       "--tls-name", NAME, "--data-dir", str(self.data), "--embedded-broker-port",
                       str(self.broker_port)), stdout=out, stderr=subprocess.STDOUT)
        proc = self.proc

        def up() -> bool:
            assert proc.poll() is None, self.log.read_text()[-3000:]
            try:
                return self.call("GET", "/healthz")[0] == 200
            except (OSError, ssl.SSLError):
                return False

        wait_for(up, timeout=60, what=f"the control plane over https (log {self.log})")

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)
            self.proc = None

    def server_certificate(self) -> x509.Certificate:
        context = ssl.create_default_context(cafile=str(self.bundle))
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname=NAME) as tls:
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der)


@pytest.fixture(name="cp")
def fx_cp(tmp_path: Path) -> Iterator[ControlPlane]:
    data = tmp_path / "cp"
    token = subprocess.run(_entry("tokens", "create", "--role", "admin", "--data-dir", str(data), "--create"),
                           capture_output=True, text=True, check=True).stdout.strip()
    cp = ControlPlane(data, free_port(), free_port(), token, tmp_path / "cp.log")
    try:
        cp.start()
        yield cp
    finally:
        cp.stop()


def _rows(db: Path, sql: str, *params: object) -> list[tuple[Any, ...]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
        return list(conn.execute(sql, params))


def _max_seq(cp: ControlPlane, device_id: str) -> int:
    return int(_rows(cp.db, "SELECT COALESCE(MAX(seq), -1) FROM telemetry WHERE device_id = ?", device_id)[0][0])


def _commands(cp: ControlPlane, device_id: str, kind: str) -> list[tuple[str, str | None, Any]]:
    return [(status, reason, json.loads(result) if result else None) for status, reason, result in _rows(
        cp.db, "SELECT status, reason, result FROM command WHERE device_id = ? AND kind = ? ORDER BY created_at",
        device_id, kind)]


def _acked(cp: ControlPlane, device_id: str, kind: str) -> bool:
    return any(status == "ok" for status, _, _ in _commands(cp, device_id, kind))


def _subjects(pem: bytes) -> list[x509.Name]:
    return [c.subject for c in x509.load_pem_x509_certificates(pem)]


def _mqtt_accepts(port: int, device_id: str, ca: Path, cert: Path, key: Path) -> bool:
    """Whether the broker lets this certificate in (a CONNACK accepting it), over a verified MQTTS connection."""
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(cert, key)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv311)
    client.tls_set_context(context)
    accepted = threading.Event()
    client.on_connect = lambda c, u, f, reason, p: accepted.set() if not reason.is_failure else None
    try:
        client.connect(NAME, port, keepalive=10)
    except (OSError, ssl.SSLError):
        return False
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not accepted.is_set():
        if client.loop(timeout=0.2) != mqtt.MQTT_ERR_SUCCESS:
            break
    client.disconnect()
    return accepted.is_set()


@pytest.mark.integration
@pytest.mark.slow
def test_the_ca_is_renewed_completed_and_retired_while_a_real_device_keeps_reporting(
        cp: ControlPlane, tmp_path: Path) -> None:
    # Prepare: a device enrolled through provisioning (its key made on the device, a certificate of CA 0), running
    provisioned = cp.cli("provisioning", "create", "--profile", "raspberry-pi-5", "--max-uses", "1")
    assert provisioned.returncode == 0, provisioned.stderr
    [token] = [line for line in provisioned.stdout.splitlines() if line.startswith("efp_")]
    device_id, etc = "pi-ca", tmp_path / "device"
    enrolled = subprocess.run(_entry("agent", "enroll", "--controlplane", cp.api, "--token", token, "--device-id",
                                     device_id, "--data-dir", str(etc), "--ca-file", str(cp.bundle)),
                              capture_output=True, text=True, timeout=60, check=False)
    assert enrolled.returncode == 0, enrolled.stderr
    assert "[tls]" in (etc / "agent.toml").read_text()
    old_cert, old_key = tmp_path / "old.crt", tmp_path / "old.key"
    old_cert.write_bytes((etc / "device.crt").read_bytes())
    old_key.write_bytes((etc / "device.key").read_bytes())
    old_key.chmod(0o600)
    old_ca = x509.load_pem_x509_certificate((cp.data / "pki" / "ca.pem").read_bytes())
    # a second device that is away the whole time (enrolled, never connected)
    assert cp.call("POST", "/api/v1/devices", {"device_id": "pi-away", "profile": "raspberry-pi-5"})[0] == 201
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    log = tmp_path / "agent.log"
    with log.open("wb") as out:
        device = subprocess.Popen(_entry("agent", "run", "--config", str(etc / "agent.toml"), "--data-dir",
                                         str(tmp_path / "agent"), "--telemetry-interval", "0.5", "--log-level",
                                         "info"), env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: _max_seq(cp, device_id) >= 0, timeout=60, what=f"telemetry over mqtts (log {log})")

        # Execute: renew
        renewed = cp.cli("keys", "renew-ca")
        assert renewed.returncode == 0, renewed.stderr
        assert "renewal 1: in_progress" in renewed.stdout
        new_ca = x509.load_pem_x509_certificate((cp.data / "pki" / "ca.1.pem").read_bytes())
        # Assert: the device acknowledges the bundle (its CA file holds both CAs) and sends a CSR
        wait_for(lambda: _acked(cp, device_id, "trust_ca") and _acked(cp, device_id, "renew_certificate"),
                 timeout=60, what=f"the device to take the bundle and send a CSR (log {log})")
        assert _subjects((etc / "ca.pem").read_bytes()) == [old_ca.subject, new_ca.subject]
        # ... the certificate waits for listeners that trust the new CA (this one loaded the old bundle)
        status = cp.cli("keys", "renew-ca", "--status", "--json")
        pending = {d["device_id"]: d for d in json.loads(status.stdout)["renewal"]["pending"]}
        assert pending[device_id]["step"] == "install_certificate"
        assert "restart the control plane" in pending[device_id]["reason"]
        assert pending["pi-away"]["step"] == "trust_ca"
        # a forged bundle (an operator's command, signed by a key the device does not trust) is refused
        forger = Ed25519PrivateKey.generate()
        status_code, sent = cp.call("POST", f"/api/v1/devices/{device_id}/commands", {
            "kind": "trust_ca", "args": {"statement": _signed_bundle(forger, old_ca.public_bytes(
                serialization.Encoding.PEM), 99)}})
        assert status_code in (200, 201, 202), sent
        wait_for(lambda: any(s == "error" and "signed by key" in (r or "")
                             for s, r, _ in _commands(cp, device_id, "trust_ca")),
                 timeout=30, what="the device to refuse the forged bundle")
        assert _subjects((etc / "ca.pem").read_bytes()) == [old_ca.subject, new_ca.subject]

        # Execute: complete — refused while pi-away does not hold the new CA, then forced
        refused = cp.cli("keys", "renew-ca", "--complete")
        assert refused.returncode != 0 and "pi-away" in refused.stdout + refused.stderr
        completed = cp.cli("keys", "renew-ca", "--complete", "--force")
        assert completed.returncode == 0, completed.stderr
        assert "restart the control plane" in completed.stdout
        seq = _max_seq(cp, device_id)
        cp.stop()
        cp.start()
        # Assert: the server certificate is the new CA's; the same device reconnects and reports
        cp.server_certificate().verify_directly_issued_by(new_ca)
        wait_for(lambda: _max_seq(cp, device_id) > seq, timeout=60,
                 what=f"telemetry after the restart (log {log})")
        # ... and now gets its certificate of the new CA, for a key it made (the old one is gone)
        wait_for(lambda: _acked(cp, device_id, "install_certificate"), timeout=60,
                 what=f"the device to install its new certificate (log {log})")
        x509.load_pem_x509_certificate((etc / "device.crt").read_bytes()).verify_directly_issued_by(new_ca)
        assert (etc / "device.key").read_bytes() != old_key.read_bytes()
        assert not pending_key_file(etc / "device.key").exists()

        # Execute: retire the old CA (pi-away still needs it: forced), restart
        assert cp.cli("keys", "renew-ca", "--retire-old").returncode != 0
        retired = cp.cli("keys", "renew-ca", "--retire-old", "--force")
        assert retired.returncode == 0, retired.stderr
        wait_for(lambda: _subjects((etc / "ca.pem").read_bytes()) == [new_ca.subject], timeout=60,
                 what="the device to take the bundle without the old CA")
        seq = _max_seq(cp, device_id)
        cp.stop()
        cp.start()
        # Assert: the device (new certificate, new bundle) reports again; the old CA's certificate is refused
        wait_for(lambda: _max_seq(cp, device_id) > seq, timeout=60,
                 what=f"telemetry with the new certificate (log {log})")
    finally:
        _stop(device)
    assert not _mqtt_accepts(cp.broker_port, device_id, etc / "ca.pem", old_cert, old_key)
    assert _mqtt_accepts(cp.broker_port, device_id, etc / "ca.pem", etc / "device.crt", etc / "device.key")
