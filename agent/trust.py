"""The device's trust store: which model-signing keys it accepts, and the signing-key rotation commands.

``<data_dir>/trust.json`` (written atomically, 0600)::

    {"version": 1, "rotation": 2,
     "keys":    {"<key id>": {"public_key": "<base64>", "rotation": 2}},
     "retired": {"<key id>": 1}}

``rotation`` is the highest rotation number the device has accepted a key transition for: a statement with a
number not above it is a replay and is refused (unless it is exactly the one already applied, which a re-sent
command repeats: acked ok again, nothing changes). Each trusted key records the rotation that introduced it (0:
the enrolment key); ``retired`` maps each retired key id to the rotation that retired it, so that a release signed
by it is refused with a reason that names it.

The store starts from the enrolment key (``AgentSettings.signing_key``). The agent's configuration keeps naming
that key after it is retired, so a configured key that the store already knows, trusted or retired, adds nothing;
a configured key the store has never seen is trusted too (the device was re-enrolled by whoever writes its
configuration, the same authority as this file).

Commands (quick, answered in the agent's loop, in order, so a retirement sent right after its transition finds the
new key trusted): ``trust_signing_key`` takes a :class:`agent.manifest.SignedKeyTransition` signed by a key the
device trusts now; ``retire_signing_key`` a :class:`agent.manifest.SignedKeyRetirement` signed by the new key of
the rotation it ends. Both ack with ``trusted_key_ids``, ``retired_key_ids`` and ``rotation``: the control plane
stores the ack's result as what the device trusts.

Fleet CA renewal (issue 10 §5) uses the same store and the same signing keys. ``trust_ca`` carries a
:class:`SignedCaBundle`: the CA certificates the broker, the control plane and the SuperLink are verified against
from now on, with a bundle number, signed by a model-signing key the device trusts. The device accepts it only with
a valid signature and a number above the one it holds (``"ca_bundle"`` in ``trust.json``; exactly that number
again is a re-sent command: acked ok, nothing changes), and replaces its CA file atomically; every TLS client of
the agent reads that file when it connects, so the next connection verifies against the new bundle. During a
renewal the bundle holds the old CA and the new one: the server is trusted under either.

``renew_certificate`` asks for a CSR: the device makes a new EC P-256 key beside the one in use
(``<key file>.pending``, 0600; a repeated request reuses it) and answers with a CSR for it; the key in use stays
until ``install_certificate`` brings the certificate, which is accepted only for this device's id, for the pending
key, and issued by a CA of the device's CA file. It is written before its key (both atomically); a crash between
the two leaves the new certificate with the pending key, which :meth:`agent.mqtt.BrokerAddress.ssl_context` then
uses, and the re-sent command finishes the swap.

The active model is not re-verified against the trust store at start-up (the start-up pick checks the sha256 the
pointer recorded when the release was verified and installed), so retiring the key that signed it does not stop it.
"""

from __future__ import annotations

import base64
import json
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import msgspec

from agent import protocol as wire
from agent.fsutil import write_atomic
from agent.logsetup import get_logger
from agent.manifest import (
    ManifestError,
    SignedKeyRetirement,
    SignedKeyTransition,
    TrustedKeys,
    key_id,
    verify_key_retirement,
    verify_key_transition,
)

if TYPE_CHECKING:
    from agent.commands import CommandContext, CommandResult

__all__ = ["CA_COMMANDS", "TRUST_FILE", "CaBundle", "SignedCaBundle", "TrustStore", "TrustStoreError",
           "apply_ca_command", "apply_key_command", "ca_bundle_bytes", "handle_ca_command", "handle_key_command",
           "pending_key_file", "trust_store_for"]

log = get_logger("edgefleet.agent.trust")

TRUST_FILE: Final = "trust.json"
_VERSION: Final = 1
_CA_BUNDLE_DOMAIN: Final = b"edgefleet-ca-bundle-v1\n"
_MAX_BUNDLE_CAS: Final = 16
CA_COMMANDS: Final = (wire.CommandKind.TRUST_CA, wire.CommandKind.RENEW_CERTIFICATE,
                      wire.CommandKind.INSTALL_CERTIFICATE)


class CaBundle(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """"Verify the broker and the control plane against exactly these CAs": signed by a model-signing key."""

    schema_version: int = 1
    number: int  # the bundle's version: strictly increasing; a device refuses one not above the one it holds
    bundle_pem: str  # the CA certificates, PEM, in order
    fingerprints: list[str]  # SHA-256 of each CA certificate's DER (hex), in the bundle's order
    issued_at: int  # unix seconds


class SignedCaBundle(msgspec.Struct, forbid_unknown_fields=True):
    statement: CaBundle
    signature: str  # base64 ed25519 signature of ca_bundle_bytes(statement)
    key_id: str


def ca_bundle_bytes(statement: CaBundle) -> bytes:
    """The exact bytes a CA-bundle signature covers: a domain prefix, then JSON with sorted keys."""
    return _CA_BUNDLE_DOMAIN + msgspec.json.encode(msgspec.to_builtins(statement), order="sorted")


class TrustStoreError(ValueError):
    """A key statement was refused (the message says why), or the trust store file is unreadable."""


class TrustStore:
    """The keys one device trusts, kept in ``path`` and seeded with its enrolment key (see the module docstring).

    Safe to use from several threads of one agent (the loop answers rotation commands, a deployment verifies).
    """

    def __init__(self, path: Path, enrolment_key: bytes | None) -> None:
        self.path = Path(path)
        self._enrolment_key = enrolment_key
        self._lock = threading.Lock()

    # -- reading -----------------------------------------------------------------------------------------------
    def _load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            data = {"version": _VERSION, "rotation": 0, "keys": {}, "retired": {}}
        except (OSError, ValueError) as exc:
            # Never fall back to "trust the enrolment key": that would undo a retirement.
            raise TrustStoreError(f"unreadable trust store {self.path}: {exc}") from exc
        if not isinstance(data, dict) or not isinstance(data.get("keys"), dict) \
                or not isinstance(data.get("retired"), dict) or not isinstance(data.get("rotation"), int):
            raise TrustStoreError(f"malformed trust store {self.path}")
        enrolment = self._enrolment_key
        if enrolment is not None:
            kid = key_id(enrolment)
            if kid not in data["keys"] and kid not in data["retired"]:
                data["keys"][kid] = {"public_key": base64.b64encode(enrolment).decode("ascii"), "rotation": 0}
        return data

    def _save(self, data: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps(data, sort_keys=True, indent=1).encode(), mode=0o600)

    def trusted(self) -> TrustedKeys:
        """The keys signatures are checked against now (and the retired ids, for the refusal's reason)."""
        with self._lock:
            return _trusted(self._load())

    def summary(self) -> dict[str, Any]:
        """What the device reports in its acks: trusted and retired key ids and the highest rotation accepted."""
        with self._lock:
            return self._summary(self._load())

    @staticmethod
    def _summary(data: dict[str, Any]) -> dict[str, Any]:
        return {"trusted_key_ids": sorted(data["keys"]), "retired_key_ids": sorted(data["retired"]),
                "rotation": data["rotation"]}

    # -- changing ----------------------------------------------------------------------------------------------
    def apply_transition(self, signed: SignedKeyTransition) -> dict[str, Any]:
        """Trust the statement's new key. TrustStoreError when it is not signed by a trusted key (the old key it
        names), or is not newer than every transition accepted before."""
        with self._lock:
            data = self._load()
            trusted = _trusted(data)
            statement = signed.statement
            known = data["keys"].get(statement.new_key_id)
            if known is not None and known.get("rotation") == statement.number == data["rotation"]:
                return self._summary(data)  # the latest statement again (a re-sent command): nothing changes
            try:
                statement, new_key = verify_key_transition(signed, trusted)
            except ManifestError as exc:
                raise TrustStoreError(f"key transition refused: {exc}") from exc
            if statement.number <= data["rotation"]:
                raise TrustStoreError(f"key transition refused: rotation {statement.number} is not newer than "
                                      f"rotation {data['rotation']}, which this device already accepted (replay)")
            if statement.new_key_id in data["retired"]:
                raise TrustStoreError(f"key transition refused: key {statement.new_key_id} was retired")
            data["keys"][statement.new_key_id] = {"public_key": base64.b64encode(new_key).decode("ascii"),
                                                  "rotation": statement.number}
            data["rotation"] = statement.number
            self._save(data)
            return self._summary(data)

    def apply_retirement(self, signed: SignedKeyRetirement) -> dict[str, Any]:
        """Drop the statement's retired key. TrustStoreError unless signed by the (trusted) new key of the
        rotation it names."""
        with self._lock:
            data = self._load()
            statement = signed.statement
            if data["retired"].get(statement.retired_key_id) == statement.number \
                    and statement.new_key_id in data["keys"]:
                return self._summary(data)  # already applied
            try:
                statement = verify_key_retirement(signed, _trusted(data))
            except ManifestError as exc:
                raise TrustStoreError(f"key retirement refused: {exc}") from exc
            introduced = data["keys"][statement.new_key_id].get("rotation")
            if introduced != statement.number:
                raise TrustStoreError(f"key retirement refused: it is for rotation {statement.number}, key "
                                      f"{statement.new_key_id} came with rotation {introduced}")
            data["keys"].pop(statement.retired_key_id, None)
            data["retired"][statement.retired_key_id] = statement.number
            self._save(data)
            return self._summary(data)

    def apply_ca_bundle(self, signed: SignedCaBundle, ca_file: Path) -> dict[str, Any]:
        """Replace ``ca_file`` with the statement's bundle. TrustStoreError unless it is signed by a trusted key,
        newer than the bundle accepted before, and a bundle of CA certificates its fingerprints name."""
        with self._lock:
            data = self._load()
            statement = signed.statement
            held = int(data.get("ca_bundle", 0))
            _verify_ca_signature(signed, _trusted(data))
            pem = statement.bundle_pem.encode("ascii", "replace")
            if statement.number == held and _read(ca_file) == pem:
                return _ca_summary(statement)  # the same statement again (a re-sent command): nothing changes
            if statement.number <= held:
                raise TrustStoreError(f"CA bundle {statement.number} refused: not newer than bundle {held}, which "
                                      "this device already accepted (replay)")
            _check_bundle(statement)
            # The file first: a crash before the number is saved lets the same statement be applied again.
            write_atomic(ca_file, pem, mode=0o644)
            data["ca_bundle"] = statement.number
            self._save(data)
            return _ca_summary(statement)


def _trusted(data: dict[str, Any]) -> TrustedKeys:
    return TrustedKeys({kid: base64.b64decode(entry["public_key"]) for kid, entry in data["keys"].items()},
                       {kid: int(number) for kid, number in data["retired"].items()})


def trust_store_for(data_dir: Path, enrolment_key: bytes | None) -> TrustStore:
    """The trust store of the agent whose data directory is ``data_dir``."""
    return TrustStore(Path(data_dir) / TRUST_FILE, enrolment_key)


def handle_key_command(ctx: CommandContext, command: wire.Command) -> CommandResult:
    """``trust_signing_key`` / ``retire_signing_key``: ``(ok, reason, result)`` with what the device trusts."""
    settings = ctx.settings
    return apply_key_command(trust_store_for(settings.data_dir, settings.signing_key), command, ctx.device_id)


def apply_key_command(store: TrustStore, command: wire.Command, device_id: str | None = None) -> CommandResult:
    """A signing-key command applied to ``store``: ``(ok, reason, result)``, the result saying what the device
    trusts afterwards (also when the statement is refused)."""
    bound = log.bind(device_id=device_id, command_id=command.command_id)
    try:
        if command.kind == wire.CommandKind.TRUST_SIGNING_KEY:
            result = store.apply_transition(_statement(command, SignedKeyTransition))
        elif command.kind == wire.CommandKind.RETIRE_SIGNING_KEY:
            result = store.apply_retirement(_statement(command, SignedKeyRetirement))
        else:
            return False, f"not a signing-key command: {command.kind!r}", {}
    except TrustStoreError as exc:
        bound.warning("trust.refused", kind=command.kind, reason=str(exc))
        try:
            summary = store.summary()
        except TrustStoreError:
            summary = {}
        return False, str(exc), summary
    bound.info("trust.changed", kind=command.kind, **result)
    return True, None, result


def _statement(command: wire.Command, kind: type[SignedKeyTransition | SignedKeyRetirement]) -> Any:
    try:
        return msgspec.convert(command.args.get("statement"), kind)
    except msgspec.ValidationError as exc:
        raise TrustStoreError(f"malformed {command.kind} statement: {exc}") from exc


# -- fleet CA renewal ------------------------------------------------------------------------------------------------
def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _ca_summary(statement: CaBundle) -> dict[str, Any]:
    return {"ca_bundle": statement.number, "ca_fingerprints": list(statement.fingerprints)}


def _verify_ca_signature(signed: SignedCaBundle, keys: TrustedKeys) -> None:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    what = f"CA bundle {signed.statement.number}"
    try:
        public = keys.public_key(signed.key_id, what)
    except ManifestError as exc:
        raise TrustStoreError(f"{what} refused: {exc}") from exc
    try:
        signature = base64.b64decode(signed.signature, validate=True)
        Ed25519PublicKey.from_public_bytes(public).verify(signature, ca_bundle_bytes(signed.statement))
    except (InvalidSignature, ValueError) as exc:
        raise TrustStoreError(f"{what} refused: bad signature") from exc


def _check_bundle(statement: CaBundle) -> None:
    """The bundle is PEM CA certificates, the ones its fingerprints name, in order."""
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    what = f"CA bundle {statement.number} refused"
    try:
        certs = x509.load_pem_x509_certificates(statement.bundle_pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise TrustStoreError(f"{what}: not PEM certificates ({exc})") from None
    if not 1 <= len(certs) <= _MAX_BUNDLE_CAS:
        raise TrustStoreError(f"{what}: {len(certs)} certificates (1 to {_MAX_BUNDLE_CAS})")
    prints = [hashlib.sha256(c.public_bytes(serialization.Encoding.DER)).hexdigest() for c in certs]
    if prints != list(statement.fingerprints):
        raise TrustStoreError(f"{what}: its certificates are not the ones its fingerprints name")
    for cert in certs:
        try:
            ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            ca = False
        if not ca:
            raise TrustStoreError(f"{what}: {cert.subject.rfc4514_string()} is not a CA certificate")


def pending_key_file(key_file: Path) -> Path:
    """Where a new client key waits for its certificate (beside the key in use)."""
    return key_file.with_name(key_file.name + ".pending")


def _public_der(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))


def _renew(device_id: str, key_file: Path) -> dict[str, Any]:
    """A CSR for a new key (the pending one if a CSR was asked for before: the control plane may ask again)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    pending = pending_key_file(key_file)
    key: Any = None
    data = _read(pending)
    if data is not None:
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except ValueError:
            key = None  # unreadable: replaced by a new one below
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        key = ec.generate_private_key(ec.SECP256R1())
        write_atomic(pending, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()), mode=0o600)
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
           .sign(key, hashes.SHA256()))
    return {"client_certificate": True, "csr": csr.public_bytes(serialization.Encoding.PEM).decode("ascii")}


def _install(device_id: str, cert_pem: str, cert_file: Path, key_file: Path, ca_file: Path | None) -> dict[str, Any]:
    """Check the certificate (this device, the pending key, a CA of the CA file) and swap it in with its key."""
    import datetime as dt

    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import NameOID

    try:
        cert = x509.load_pem_x509_certificate(cert_pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise TrustStoreError(f"certificate refused: not a PEM certificate ({exc})") from None
    names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if names != [device_id]:
        raise TrustStoreError(f"certificate refused: it names {names}, this device is {device_id!r}")
    now = dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise TrustStoreError(f"certificate refused: valid {cert.not_valid_before_utc} to "
                              f"{cert.not_valid_after_utc}, not now")
    roots_pem = _read(ca_file) if ca_file is not None else None
    try:
        roots = x509.load_pem_x509_certificates(roots_pem) if roots_pem else []
    except ValueError:
        roots = []
    issuer = None
    for root in roots:
        try:
            cert.verify_directly_issued_by(root)
        except (ValueError, TypeError, InvalidSignature):
            continue
        issuer = root
        break
    if issuer is None:
        raise TrustStoreError(f"certificate refused: not issued by a CA of this device's CA file {ca_file}")
    pending = pending_key_file(key_file)
    new = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = _read(pending)
    if key_pem is None:
        if _read(cert_file) == new and _pairs(_read(key_file), cert):
            return _cert_summary(cert)  # installed already (a re-sent command)
        raise TrustStoreError("certificate refused: no new key is waiting for a certificate on this device "
                              "(renew_certificate makes one)")
    if not _pairs(key_pem, cert):
        raise TrustStoreError("certificate refused: it is not for the key this device made for the renewal")
    # The certificate first, then its key: between the two the pending key still pairs with it (ssl_context
    # falls back to it), and the old pair is never mixed with a half of the new one.
    write_atomic(cert_file, new, mode=0o644)
    write_atomic(key_file, key_pem, mode=0o600)
    pending.unlink(missing_ok=True)
    return _cert_summary(cert)


def _pairs(key_pem: bytes | None, cert: Any) -> bool:
    from cryptography.hazmat.primitives import serialization

    if key_pem is None:
        return False
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except ValueError:
        return False
    return _public_der(key.public_key()) == _public_der(cert.public_key())


def _cert_summary(cert: Any) -> dict[str, Any]:
    return {"installed": True, "serial": format(cert.serial_number, "x"), "issuer": cert.issuer.rfc4514_string(),
            "not_after": cert.not_valid_after_utc.isoformat()}


def handle_ca_command(ctx: CommandContext, command: wire.Command) -> CommandResult:
    """``trust_ca`` / ``renew_certificate`` / ``install_certificate`` for the agent ``ctx``."""
    settings = ctx.settings
    ca_file = settings.ca_file or (Path(settings.broker.ca_file) if settings.broker.ca_file else None)
    cert_file = Path(settings.broker.cert_file) if settings.broker.cert_file else None
    key_file = Path(settings.broker.key_file) if settings.broker.key_file else None
    return apply_ca_command(trust_store_for(settings.data_dir, settings.signing_key), command, ctx.device_id,
                            ca_file=ca_file, cert_file=cert_file, key_file=key_file)


def apply_ca_command(store: TrustStore, command: wire.Command, device_id: str, *, ca_file: Path | None,
                     cert_file: Path | None, key_file: Path | None) -> CommandResult:
    """A CA-renewal command applied to this device's files: ``(ok, reason, result)``."""
    bound = log.bind(device_id=device_id, command_id=command.command_id)
    try:
        if command.kind == wire.CommandKind.TRUST_CA:
            if ca_file is None:
                raise TrustStoreError("this device verifies its servers against the system store (no CA file): "
                                      "a fleet CA bundle has nowhere to go")
            try:
                signed = msgspec.convert(command.args.get("statement"), SignedCaBundle)
            except msgspec.ValidationError as exc:
                raise TrustStoreError(f"malformed trust_ca statement: {exc}") from exc
            result = store.apply_ca_bundle(signed, ca_file)
        elif command.kind == wire.CommandKind.RENEW_CERTIFICATE:
            if cert_file is None or key_file is None:
                return True, None, {"client_certificate": False}  # a password identity: nothing to renew
            result = _renew(device_id, key_file)
        elif command.kind == wire.CommandKind.INSTALL_CERTIFICATE:
            certificate = command.args.get("certificate")
            if cert_file is None or key_file is None:
                raise TrustStoreError("this device has no client certificate configured ([tls] in its config)")
            if not isinstance(certificate, str):
                raise TrustStoreError("install_certificate needs args.certificate (PEM)")
            result = _install(device_id, certificate, cert_file, key_file, ca_file)
        else:
            return False, f"not a CA-renewal command: {command.kind!r}", {}
    except (TrustStoreError, OSError) as exc:
        reason = str(exc) if isinstance(exc, TrustStoreError) else f"cannot write: {exc}"
        bound.warning("trust.ca_refused", kind=command.kind, reason=reason)
        return False, reason, {}
    bound.info("trust.ca_changed", kind=command.kind,
               **{k: v for k, v in result.items() if k != "csr"})
    return True, None, result
