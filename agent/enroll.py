"""`edgefleet agent enroll`: enrol this device with a provisioning token and write what `agent run --config` needs.

The device's keys are made here and never leave it: an EC P-256 key for its TLS client certificate (the control
plane signs the CSR; CN = the enrolled device id) and, for a training device (``--train``), an EC P-384 key for
its Flower SuperNode (only the public half is sent). The data directory (0700) then holds::

    agent.toml      the device config (relative paths: relative to its directory)
    ca.pem          the fleet CA bundle: what the broker and the control plane are verified against
    device.key      0600, the TLS client key          device.crt   its certificate (named in agent.toml's [tls]
                    when the broker is mqtts://: a plaintext broker has no use for it)
    mqtt-password   0600, the broker password (the simpler identity; it works alongside the certificate)
    supernode.key   0600, OpenSSH EC P-384 (``flower-supernode --auth-supernode-private-key``), with --train

Trust: with ``--ca-file`` the server is verified against that CA; over https without it, against the system
store (and a failure says to pass ``--ca-file``); verification is never turned off. Plain http is for a control
plane on this machine only (development) and warns. Standard library plus ``cryptography`` (an agent dependency):
this runs on the device.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import os
import ssl
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from agent.fsutil import write_atomic
from agent.protocol import DeviceIdError, validate_device_id

__all__ = ["add_parser", "default_device_id", "run", "toml_config"]

CONFIG: Final = "agent.toml"
CA_FILE: Final = "ca.pem"
CERT_FILE: Final = "device.crt"
KEY_FILE: Final = "device.key"
PASSWORD_FILE: Final = "mqtt-password"
SUPERNODE_KEY: Final = "supernode.key"
_MACHINE_ID_FILES: Final = (Path("/etc/machine-id"), Path("/var/lib/dbus/machine-id"))
_MAX_RESPONSE: Final = 1024 * 1024


class EnrollError(Exception):
    """Enrolment cannot go on; the message says why and what to do. ``code``: the exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def default_device_id(machine_id_files: tuple[Path, ...] = _MACHINE_ID_FILES) -> str:
    """``dev-`` and the first 12 hex digits of the SHA-256 of the machine id: stable across reboots and
    re-installs of the agent, and not the machine id itself (which systemd says to keep private)."""
    for path in machine_id_files:
        try:
            machine_id = path.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            continue
        if machine_id:
            return "dev-" + hashlib.sha256(machine_id.encode()).hexdigest()[:12]
    raise EnrollError("this machine has no machine id (/etc/machine-id): pass --device-id", 2)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``enroll`` on ``edgefleet agent``'s subparsers."""
    env = os.environ.get
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "enroll", help="Enrol this device with a provisioning token and write its config.",
        description="Enrol this device with a provisioning token (`edgefleet provisioning create`): its keys are "
                    "generated here and never sent; the control plane signs its certificate and returns its "
                    "broker credentials, the fleet CA and the model-signing key, written to --data-dir with "
                    "agent.toml for `edgefleet agent run --config`.")
    parser.add_argument("--controlplane", default=env("EDGEFLEET_CONTROLPLANE_URL"),
                        help="https://HOST:PORT of the control plane (http only on this machine, for "
                             "development) [EDGEFLEET_CONTROLPLANE_URL]")
    parser.add_argument("--token", default=env("EDGEFLEET_PROVISIONING_TOKEN"),
                        help="the provisioning token; prefer the variable, which other users cannot read "
                             "[EDGEFLEET_PROVISIONING_TOKEN]")
    parser.add_argument("--device-id", default=env("EDGEFLEET_DEVICE_ID"),
                        help="this device's id [EDGEFLEET_DEVICE_ID; default: dev-<first 12 hex digits of the "
                             "SHA-256 of /etc/machine-id>, stable for this machine]")
    parser.add_argument("--data-dir", type=Path, default=Path(env("EDGEFLEET_DATA_DIR", "./edgefleet-agent")),
                        help="where the config, keys and credentials are written (0700) [EDGEFLEET_DATA_DIR]")
    parser.add_argument("--ca-file", type=Path, default=env("EDGEFLEET_CA_FILE"),
                        help="the fleet CA to verify the control plane with (from `edgefleet provisioning "
                             "create --ca-out`, or $DATA_DIR/pki/ca-bundle.pem on the control plane) "
                             "[EDGEFLEET_CA_FILE; default: the system store]")
    parser.add_argument("--train", action="store_true",
                        help="a training device: also create its Flower SuperNode key (EC P-384)")
    parser.add_argument("--task", default=env("EDGEFLEET_TASK", "digits"),
                        help="the task this device runs (default: digits) [EDGEFLEET_TASK]")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing enrolment in --data-dir (its keys and credentials)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the control plane")
    return parser


def run(args: argparse.Namespace) -> int:
    """Enrol; 0 when done, 1 when the control plane refused or could not be reached, 2 for a usage error."""
    try:
        config = _enroll(args)
    except EnrollError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    print(f"enrolled; next:\n  edgefleet agent run --config {config}")
    return 0


# -- the steps ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Keys:
    device_key_pem: bytes
    csr_pem: str
    public_key_der: bytes
    supernode_key: bytes | None
    supernode_public: str | None


def _enroll(args: argparse.Namespace) -> Path:
    base = _controlplane_url(args.controlplane)
    if not args.token:
        raise EnrollError("a provisioning token is needed: --token or EDGEFLEET_PROVISIONING_TOKEN "
                          "(`edgefleet provisioning create` on the control plane)", 2)
    try:
        device_id = validate_device_id(args.device_id) if args.device_id else default_device_id()
    except DeviceIdError as exc:
        raise EnrollError(str(exc), 2) from None
    data_dir: Path = args.data_dir.expanduser().absolute()
    config = data_dir / CONFIG
    if config.exists() and not args.force:
        raise EnrollError(f"{data_dir} holds an enrolment already ({config}): pass --force to replace it "
                          "(its keys and credentials), or choose another --data-dir", 2)
    context = _tls_context(base, args.ca_file)
    keys = _make_keys(device_id, train=args.train)
    answer = _post(base, args.token.strip(), context, args.timeout, {
        "device_id": device_id, "csr": keys.csr_pem, "flower_public_key": keys.supernode_public,
        "agent_version": _agent_version()}, ca_given=args.ca_file is not None)
    enrolled = _check_answer(answer, device_id, keys)
    _write(data_dir, enrolled, keys, controlplane=base, task=args.task)
    certificate = "a client certificate and " if enrolled.get("client_certificate_pem") else ""
    print(f"device {device_id} enrolled as profile {enrolled['profile']} "
          f"(tags: {', '.join(enrolled['tags']) or 'none'}); {certificate}broker credentials written to {data_dir}")
    return config


def _controlplane_url(url: str | None) -> str:
    if not url:
        raise EnrollError("--controlplane https://HOST:PORT is needed (or EDGEFLEET_CONTROLPLANE_URL)", 2)
    parts = urlsplit(url.strip())
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise EnrollError(f"--controlplane {url!r}: expected https://HOST:PORT", 2)
    if parts.scheme == "http":
        if not _loopback(parts.hostname):
            raise EnrollError(f"--controlplane {url}: plain http would send the token and this device's "
                              "credentials across the network in clear; use https://", 2)
        print("warning: plain http to a control plane on this machine (development only); use https:// "
              "anywhere else", file=sys.stderr)
    return f"{parts.scheme}://{parts.netloc}"


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _tls_context(base: str, ca_file: Path | None) -> ssl.SSLContext | None:
    if not base.startswith("https://"):
        return None
    if ca_file is None:
        return ssl.create_default_context()
    try:
        return ssl.create_default_context(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise EnrollError(f"--ca-file {ca_file}: not a readable PEM CA file ({exc})", 2) from None


def _make_keys(device_id: str, *, train: bool) -> _Keys:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
           .sign(key, hashes.SHA256()))
    supernode_key = supernode_public = None
    if train:
        flower = ec.generate_private_key(ec.SECP384R1())
        supernode_key = flower.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                             serialization.NoEncryption())
        supernode_public = flower.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                            serialization.PublicFormat.OpenSSH).decode()
    return _Keys(
        device_key_pem=key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()),
        csr_pem=csr.public_bytes(serialization.Encoding.PEM).decode(),
        public_key_der=key.public_key().public_bytes(serialization.Encoding.DER,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo),
        supernode_key=supernode_key, supernode_public=supernode_public)


def _agent_version() -> str:
    from agent import __version__

    return __version__


class _Redirected(Exception):
    def __init__(self, target: str) -> None:
        super().__init__(target)
        self.target = target


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """An enrolment is never redirected: the provisioning token goes to the address the operator named only."""

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> urllib.request.Request | None:
        raise _Redirected(newurl[:200])


def _post(base: str, token: str, context: ssl.SSLContext | None, timeout: float, body: dict[str, Any], *,
          ca_given: bool) -> Any:
    request = urllib.request.Request(
        f"{base}/api/v1/enroll", method="POST",
        data=json.dumps({k: v for k, v in body.items() if v is not None}).encode(),
        headers={"Content-Type": "application/json", "Accept": "application/json"})
    request.add_unredirected_header("Authorization", f"Bearer {token}")
    opener = urllib.request.build_opener(_RefuseRedirects(), urllib.request.HTTPSHandler(context=context))
    try:
        with opener.open(request, timeout=timeout) as response:
            payload = response.read(_MAX_RESPONSE + 1)
    except _Redirected as exc:
        raise EnrollError(f"the control plane at {base} redirects the enrolment to {exc.target}: enrol with "
                          "--controlplane naming the final address (a redirect is never followed: it would "
                          "carry the token elsewhere, and turn the POST into a GET)") from None
    except urllib.error.HTTPError as exc:
        detail = _detail(exc)
        raise EnrollError(f"the control plane refused the enrolment ({exc.code}): {detail}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, ssl.SSLCertVerificationError):
            hint = ("is --ca-file the CA of this control plane?" if ca_given else
                    "pass --ca-file with the fleet CA (written by `edgefleet provisioning create --ca-out FILE`, "
                    "or $DATA_DIR/pki/ca-bundle.pem on the control plane)")
            raise EnrollError(f"cannot verify the control plane's certificate at {base} "
                              f"({reason.verify_message}): {hint}") from None
        raise EnrollError(f"cannot reach the control plane at {base}: {reason}") from None
    except (TimeoutError, OSError) as exc:
        raise EnrollError(f"cannot reach the control plane at {base}: {exc}") from None
    if len(payload) > _MAX_RESPONSE:
        raise EnrollError(f"the control plane's answer is larger than {_MAX_RESPONSE} bytes")
    try:
        return json.loads(payload)
    except ValueError:
        raise EnrollError(f"the control plane at {base} did not answer JSON: is it an EdgeFleet control "
                          "plane?") from None


def _detail(exc: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(exc.read(64 * 1024))
        return str(body.get("detail") or body)
    except (ValueError, AttributeError, OSError):
        return str(exc.reason)


def _check_answer(answer: Any, device_id: str, keys: _Keys) -> dict[str, Any]:
    """The answer, once it is what was asked for: this device's id, and a certificate for this device's key."""
    required = ("device_id", "profile", "tags", "broker_url", "mqtt_username", "mqtt_password", "ca_bundle_pem",
                "signing_public_key")
    if not isinstance(answer, dict) or any(k not in answer for k in required):
        raise EnrollError("the control plane's answer lacks enrolment fields: is it an EdgeFleet control plane "
                          "of this version?")
    if answer["device_id"] != device_id:
        raise EnrollError(f"the control plane enrolled {answer['device_id']!r}, not {device_id!r}")
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        x509.load_pem_x509_certificates(str(answer["ca_bundle_pem"]).encode())
        cert_pem = answer.get("client_certificate_pem")
        if cert_pem:
            cert = x509.load_pem_x509_certificate(str(cert_pem).encode())
            public = cert.public_key().public_bytes(serialization.Encoding.DER,
                                                    serialization.PublicFormat.SubjectPublicKeyInfo)
            if public != keys.public_key_der:
                raise EnrollError("the certificate the control plane returned is not for this device's key")
    except ValueError as exc:
        raise EnrollError(f"the control plane returned an unreadable certificate: {exc}") from None
    return answer


def _write(data_dir: Path, enrolled: dict[str, Any], keys: _Keys, *, controlplane: str, task: str) -> None:
    """Every file whole and atomically; the config last, so that a directory without one holds no enrolment."""
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(data_dir, 0o700)
    public = 0o644
    write_atomic(data_dir / CA_FILE, str(enrolled["ca_bundle_pem"]).encode(), mode=public)
    write_atomic(data_dir / KEY_FILE, keys.device_key_pem, mode=0o600)
    cert_pem = enrolled.get("client_certificate_pem")
    if cert_pem:
        write_atomic(data_dir / CERT_FILE, str(cert_pem).encode(), mode=public)
    write_atomic(data_dir / PASSWORD_FILE, str(enrolled["mqtt_password"]).encode(), mode=0o600)
    if keys.supernode_key is not None:
        write_atomic(data_dir / SUPERNODE_KEY, keys.supernode_key, mode=0o600)
    # The certificate is an identity on a TLS broker only: on a plaintext one (loopback development) the config
    # names the password alone, which `agent run` accepts there.
    tls_broker = str(enrolled["broker_url"]).lower().startswith("mqtts://")
    text = toml_config(enrolled, controlplane=controlplane, task=task, certificate=bool(cert_pem) and tls_broker,
                       train=keys.supernode_key is not None)
    write_atomic(data_dir / CONFIG, text.encode(), mode=public)


def toml_config(enrolled: dict[str, Any], *, controlplane: str, task: str, certificate: bool, train: bool) -> str:
    """The device config ``agent run --config`` reads (see agent.config)."""
    lines = [
        "# Written by `edgefleet agent enroll`; paths are relative to this file's directory.",
        f"device_id = {_toml_str(enrolled['device_id'])}",
        f"profile = {_toml_str(enrolled['profile'])}",
        f"controlplane = {_toml_str(controlplane)}",
        f"broker = {_toml_str(enrolled['broker_url'])}",
        f"ca_file = {_toml_str(CA_FILE)}",
        f"task = {_toml_str(task)}",
        f"signing_key = {_toml_str(enrolled['signing_public_key'])}",
    ]
    if certificate:
        lines += ["", "[tls]", f"cert_file = {_toml_str(CERT_FILE)}", f"key_file = {_toml_str(KEY_FILE)}"]
    lines += ["", "[mqtt]", f"username = {_toml_str(enrolled['mqtt_username'])}",
              f"password_file = {_toml_str(PASSWORD_FILE)}"]
    if train:
        lines += ["", "[flower]", f"auth_key_file = {_toml_str(SUPERNODE_KEY)}"]
    return "\n".join(lines) + "\n"


_TOML_ESCAPES: Final = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_str(value: object) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped."""
    out = []
    for ch in str(value):
        if ch in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'
