"""The fleet's own certificate authority: it signs the control plane's server certificate and the devices' client
certificates (CN = device id).

Kept in ``$DATA_DIR/pki`` (directory 0700, keys 0600)::

    ca.key          the CA's EC P-256 private key (never leaves the control plane)
    ca.pem          the CA certificate: what devices verify the server with
    ca-bundle.pem   every CA certificate devices should trust now (the current one, and during a CA renewal the
                    previous one too): served at enrolment and handed to the TLS listeners as client-cert roots
    server.key      the server certificate's private key
    server.pem      the server certificate (its SANs cover the names and addresses the control plane serves)
    ca.N.key        the CA created by renewal N (0600), beside every earlier one: a CA key is never overwritten
    ca.N.pem        its certificate
    ca-renewal.json which CA issues now, which ones the bundle holds, and every renewal (see below)

CA renewal (issue 10 §5), with the fleet online: :meth:`FleetPKI.begin_ca_renewal` creates CA N beside the one
in use and writes ``ca-bundle.pem`` = old + new (devices are sent it and trust the server under either; listeners
that load the bundle accept client certificates of either); :meth:`FleetPKI.complete_ca_renewal` makes CA N the
issuer (device certificates from then on) and re-issues the server certificate under it (listeners pick it up when
they restart); :meth:`FleetPKI.retire_old_ca` drops the old CA from the bundle, after which a certificate it
issued is refused wherever the bundle is loaded. Each change of the bundle gets a higher ``bundle_version``: the
number devices use to refuse an older bundle replayed to them.

Bring-your-own: :class:`FleetPKI` takes a certificate, key and CA file of the operator's instead; device client
certificates then need the CA's key too (``ca_key_file``), else enrolment hands out passwords only.

Files are created atomically (temp file 0600, fsync, rename) and never half-written; a second process creating
the CA at the same moment is serialised by ``flock`` on ``pki/.lock``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import enum
import hashlib
import ipaddress
import json
import os
import secrets
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.protocol import DeviceIdError, validate_device_id
from controlplane._errors import ControlPlaneError, InvalidInput

try:  # POSIX: serialise CA creation across processes
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["CaRenewal", "CaRenewalStatus", "CsrError", "FleetPKI", "IssuedCertificate", "PkiError",
           "ServerIdentity", "ca_fingerprint", "default_server_names"]

CA_KEY: Final = "ca.key"
CA_CERT: Final = "ca.pem"
CA_BUNDLE: Final = "ca-bundle.pem"
SERVER_KEY: Final = "server.key"
SERVER_CERT: Final = "server.pem"
RENEWAL_FILE: Final = "ca-renewal.json"

_CA_DAYS: Final = 10 * 365
_SERVER_DAYS: Final = 397  # what browsers accept for a server certificate
_DEVICE_DAYS: Final = 825
# A server certificate this close to expiry, or not covering a configured name, is issued anew on start.
_RENEW_BEFORE: Final = dt.timedelta(days=30)
_MAX_CSR_BYTES: Final = 16 * 1024


class PkiError(ControlPlaneError):
    """The PKI files cannot be created or read, or do not belong together."""


class CsrError(InvalidInput):
    """A certificate signing request that is malformed, not self-signed, or asks for a key we do not accept."""


@dataclass(frozen=True, slots=True)
class ServerIdentity:
    """The files a TLS listener is configured with."""

    cert_file: Path
    key_file: Path
    ca_file: Path  # CA bundle: the roots client certificates must chain to


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    device_id: str
    cert_pem: bytes
    serial: int
    not_after: dt.datetime


class CaRenewalStatus(enum.StrEnum):
    IN_PROGRESS = "in_progress"  # the new CA is in the bundle; the old one still issues; devices are learning it
    COMPLETE = "complete"  # the new CA issues (server and device certificates); the old one is still trusted
    RETIRED = "retired"  # the old CA is out of the bundle: what it issued is refused


@dataclass(frozen=True, slots=True)
class CaRenewal:
    """One renewal of the fleet CA as ``ca-renewal.json`` records it."""

    number: int  # the new CA's number (its files are ca.<number>.key / .pem)
    old: int  # the CA it replaces (0: ca.key / ca.pem)
    old_fingerprint: str
    new_fingerprint: str
    status: CaRenewalStatus
    issued_at: float
    bundle_version: int  # the bundle that first held the new CA (devices holding this one or later trust it)
    completed_at: float | None = None
    retired_at: float | None = None


@dataclass
class _CaState:
    active: int = 0  # the CA that issues now
    trusted: list[int] = field(default_factory=lambda: [0])  # the CAs in ca-bundle.pem, in order
    bundle_version: int = 1  # raised by every change of the bundle (devices refuse a lower one)
    renewals: list[CaRenewal] = field(default_factory=list)

    @classmethod
    def from_json(cls, data: Any) -> _CaState:
        renewals = [CaRenewal(**{**r, "status": CaRenewalStatus(r["status"])}) for r in data["renewals"]]
        return cls(active=int(data["active"]), trusted=[int(n) for n in data["trusted"]],
                   bundle_version=int(data["bundle_version"]), renewals=renewals)

    def to_json(self) -> bytes:
        renewals = [dataclasses.asdict(r) for r in self.renewals]
        return json.dumps({"version": 1, "active": self.active, "trusted": self.trusted,
                           "bundle_version": self.bundle_version, "renewals": renewals}, indent=1).encode()


def ca_fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER, hex: how the bundle's CAs are named in statements and the API."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def default_server_names(host: str) -> list[str]:
    """Names and addresses for the server certificate when none are configured: the host's names, loopback, and
    the bind address (every interface address when bound to all)."""
    import socket

    names = {"localhost", "127.0.0.1", "::1", socket.gethostname(), socket.getfqdn()}
    if host in ("0.0.0.0", "::", ""):
        import psutil

        for addresses in psutil.net_if_addrs().values():
            for address in addresses:
                if address.family in (socket.AF_INET, socket.AF_INET6):
                    ip = address.address.split("%", 1)[0]
                    if not ipaddress.ip_address(ip).is_link_local:
                        names.add(ip)
    else:
        names.add(host)
    return sorted(n for n in names if n)


def _san(names: Iterable[str]) -> list[x509.GeneralName]:
    result: list[x509.GeneralName] = []
    for name in names:
        try:
            result.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            result.append(x509.DNSName(name))
    return result


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class FleetPKI:
    """The fleet CA and the control plane's server certificate in ``directory``.

    Parameters
    ----------
    directory
        ``$DATA_DIR/pki``; created 0700.
    server_names
        DNS names and IP addresses the server certificate must cover.
    cert_file, key_file, ca_file
        Bring-your-own server certificate, its key and the CA (bundle) devices verify it with; all three or none.
    ca_key_file
        The key of the bring-your-own CA, to sign device certificates with (optional).
    """

    def __init__(self, directory: str | os.PathLike[str], *, server_names: Iterable[str] = (),
                 cert_file: Path | None = None, key_file: Path | None = None, ca_file: Path | None = None,
                 ca_key_file: Path | None = None) -> None:
        self.directory = Path(directory)
        self.server_names = sorted(set(server_names))
        given = [p for p in (cert_file, key_file, ca_file) if p is not None]
        if given and len(given) != 3:
            raise PkiError("a bring-your-own server certificate needs all three of cert, key and CA files")
        self._byo = (cert_file, key_file, ca_file) if given else None
        self._byo_ca_key = ca_key_file
        self._ca_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None = None
        self._ca_cert: x509.Certificate | None = None
        self._ca_number = 0  # which CA _ca_key / _ca_cert are
        # The bundle version the listeners this process started loaded (ensure() runs just before they start);
        # None until then.
        self._listeners_bundle: int | None = None

    # -- files -----------------------------------------------------------------------------------------------
    @property
    def bring_your_own(self) -> bool:
        return self._byo is not None

    @property
    def server(self) -> ServerIdentity:
        if self._byo is not None:
            cert, key, ca = self._byo
            assert cert is not None and key is not None and ca is not None
            return ServerIdentity(cert_file=cert, key_file=key, ca_file=ca)
        return ServerIdentity(cert_file=self.directory / SERVER_CERT, key_file=self.directory / SERVER_KEY,
                              ca_file=self.directory / CA_BUNDLE)

    @property
    def ca_bundle_pem(self) -> bytes:
        """The CA certificates devices trust (PEM): what enrolment hands out."""
        try:
            return self.server.ca_file.read_bytes()
        except OSError as exc:
            raise PkiError(f"cannot read the fleet CA bundle {self.server.ca_file}: {exc.strerror}") from None

    @property
    def can_issue(self) -> bool:
        """Whether device client certificates can be signed here (our CA, or a BYO CA with its key)."""
        return self._byo is None or self._byo_ca_key is not None

    # -- lifecycle -------------------------------------------------------------------------------------------
    def ensure(self) -> FleetPKI:
        """Create the CA on first start and (re)issue the server certificate when it is missing, expiring within
        30 days or does not cover a configured name. Idempotent; safe across processes.

        Raises
        ------
        PkiError
            A file cannot be written or read, or a BYO file is not what it claims.
        """
        if self._byo is not None:
            self._check_byo()
            return self
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.directory, 0o700)
        with self._locked():
            try:
                state = self._state()
                if not (self.directory / CA_KEY).exists() and not state.renewals:
                    self._create_ca()
                self._load_ca(state.active)
                if not (self.directory / CA_BUNDLE).exists():
                    self._write_bundle(state)
                if self._server_needs_issue():
                    self._issue_server()
                self._listeners_bundle = state.bundle_version
            except OSError as exc:
                raise PkiError(f"cannot set up the fleet PKI in {self.directory}: {exc}") from exc
        return self

    # -- CA renewal --------------------------------------------------------------------------------------------
    def _ca_files(self, number: int) -> tuple[Path, Path]:
        """(key, certificate) of CA ``number``."""
        if number == 0:
            return self.directory / CA_KEY, self.directory / CA_CERT
        return self.directory / f"ca.{number}.key", self.directory / f"ca.{number}.pem"

    def _state(self) -> _CaState:
        try:
            data = json.loads((self.directory / RENEWAL_FILE).read_bytes())
        except FileNotFoundError:
            return _CaState()
        except (OSError, ValueError) as exc:
            raise PkiError(f"cannot read {self.directory / RENEWAL_FILE}: {exc}") from exc
        try:
            return _CaState.from_json(data)
        except (KeyError, TypeError, ValueError) as exc:
            raise PkiError(f"{self.directory / RENEWAL_FILE} is malformed: {exc}") from exc

    def _save_state(self, state: _CaState) -> None:
        _write_atomic(self.directory / RENEWAL_FILE, state.to_json())

    def _ca_certificate(self, number: int) -> x509.Certificate:
        path = self._ca_files(number)[1]
        try:
            return x509.load_pem_x509_certificates(path.read_bytes())[0]
        except (OSError, ValueError) as exc:
            raise PkiError(f"cannot read CA certificate {path}: {exc}") from exc

    def _write_bundle(self, state: _CaState) -> None:
        bundle = b"".join(self._ca_certificate(n).public_bytes(serialization.Encoding.PEM) for n in state.trusted)
        _write_atomic(self.directory / CA_BUNDLE, bundle)
        os.chmod(self.directory / CA_BUNDLE, 0o644)

    def _require_own_ca(self, what: str) -> None:
        if self._byo is not None:
            raise PkiError(f"{what}: this control plane uses a bring-your-own CA; renew it where it was made and "
                           "restart with the new files")

    @property
    def bundle_version(self) -> int:
        """The number of the current ``ca-bundle.pem`` (raised by every renewal step that changes it)."""
        return 1 if self._byo is not None else self._state().bundle_version

    @property
    def listeners_bundle_version(self) -> int | None:
        """The bundle version this process's TLS listeners loaded when they started (see :meth:`ensure`), or as
        :meth:`listeners_reloaded` last said; None before :meth:`ensure`."""
        return self._listeners_bundle

    def listeners_reloaded(self) -> None:
        """Say that the listeners have loaded the current ``ca-bundle.pem`` again (a reload without a restart)."""
        self._listeners_bundle = self.bundle_version

    def ca_renewals(self) -> list[CaRenewal]:
        """Every CA renewal so far, oldest first."""
        return [] if self._byo is not None else list(self._state().renewals)

    def ca_summary(self) -> dict[str, Any]:
        """The issuing CA and the bundle's CAs (number, fingerprint, subject, not after), for the API."""
        if self._byo is not None:
            roots = x509.load_pem_x509_certificates(self.ca_bundle_pem)
            return {"active": None, "bundle_version": 1,
                    "trusted": [_describe(None, c) for c in roots]}
        state = self._state()
        return {"active": state.active, "bundle_version": state.bundle_version,
                "trusted": [_describe(n, self._ca_certificate(n)) for n in state.trusted]}

    def ca_fingerprint_of(self, number: int) -> str:
        return ca_fingerprint(self._ca_certificate(number))

    def begin_ca_renewal(self, now: float | None = None) -> CaRenewal:
        """Create a new CA beside the one that issues (never overwriting a key) and put both in the bundle.

        The old CA keeps issuing until :meth:`complete_ca_renewal`. Raises PkiError while another renewal is in
        progress, or for a bring-your-own CA.
        """
        self._require_own_ca("CA renewal")
        self.ensure()
        with self._locked():
            state = self._state()
            last = state.renewals[-1] if state.renewals else None
            if last is not None and last.status is CaRenewalStatus.IN_PROGRESS:
                raise PkiError(f"CA renewal {last.number} is in progress: complete it first")
            number = max([0, *state.trusted, *(r.number for r in state.renewals)]) + 1
            try:
                cert = self._create_ca(number)
            except OSError as exc:
                raise PkiError(f"cannot create CA {number} in {self.directory}: {exc}") from exc
            renewal = CaRenewal(number=number, old=state.active,
                                old_fingerprint=ca_fingerprint(self._ca_certificate(state.active)),
                                new_fingerprint=ca_fingerprint(cert), status=CaRenewalStatus.IN_PROGRESS,
                                issued_at=now if now is not None else time.time(),
                                bundle_version=state.bundle_version + 1)
            state.renewals.append(renewal)
            state.trusted = [*state.trusted, number]
            state.bundle_version += 1
            # The bundle first: a crash before the state is saved leaves a bundle with a CA nothing issues from yet
            # (harmless), never a state naming a CA the bundle lacks.
            self._write_bundle(state)
            self._save_state(state)
        return renewal

    def complete_ca_renewal(self, now: float | None = None) -> CaRenewal:
        """Make the renewal's new CA the issuer and re-issue the server certificate under it (the listeners use
        it from their next start). Raises PkiError when no renewal is in progress."""
        self._require_own_ca("CA renewal")
        with self._locked():
            state = self._state()
            last = state.renewals[-1] if state.renewals else None
            if last is None or last.status is not CaRenewalStatus.IN_PROGRESS:
                raise PkiError("no CA renewal is in progress (start one with `edgefleet keys renew-ca`)")
            self._load_ca(last.number)
            try:
                self._issue_server()
            except OSError as exc:
                raise PkiError(f"cannot issue the server certificate in {self.directory}: {exc}") from exc
            done = dataclasses.replace(last, status=CaRenewalStatus.COMPLETE,
                                       completed_at=now if now is not None else time.time())
            state.renewals[-1] = done
            state.active = last.number
            self._save_state(state)
        return done

    def retire_old_ca(self, now: float | None = None) -> CaRenewal:
        """Drop the completed renewal's old CA from the bundle: certificates it issued are refused from then on
        (wherever the bundle is loaded). Raises PkiError unless the latest renewal is complete."""
        self._require_own_ca("CA renewal")
        with self._locked():
            state = self._state()
            last = state.renewals[-1] if state.renewals else None
            if last is None or last.status is not CaRenewalStatus.COMPLETE:
                raise PkiError("retiring the old CA needs a completed CA renewal "
                               "(`edgefleet keys renew-ca`, then `--complete`)")
            state.trusted = [n for n in state.trusted if n != last.old]
            state.bundle_version += 1
            done = dataclasses.replace(last, status=CaRenewalStatus.RETIRED,
                                       retired_at=now if now is not None else time.time())
            state.renewals[-1] = done
            self._write_bundle(state)
            self._save_state(state)
        return done

    def _create_ca(self, number: int = 0) -> x509.Certificate:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "EdgeFleet"),
                          x509.NameAttribute(NameOID.COMMON_NAME, f"EdgeFleet fleet CA {secrets.token_hex(4)}")])
        now = _now()
        cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=_CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        key_path, cert_path = self._ca_files(number)
        if number:
            # A renewal's CA: never overwrite a key (or its certificate) that may already sign something.
            _write_new(key_path, _key_pem(key))
            _write_new(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
            return cert
        # Certificate first: a key without its certificate is recreated, never a certificate without its key.
        _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        os.chmod(cert_path, 0o644)
        _write_atomic(key_path, _key_pem(key))
        with contextlib.suppress(FileNotFoundError):  # a new CA: the old bundle and server cert are void
            os.unlink(self.directory / CA_BUNDLE)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.directory / SERVER_CERT)
        return cert

    def _load_ca(self, number: int = 0) -> None:
        key_path, cert_path = self._ca_files(number)
        if self._byo is not None:
            assert self._byo_ca_key is not None and self._byo[2] is not None
            key_path, cert_path = self._byo_ca_key, self._byo[2]
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            cert = x509.load_pem_x509_certificates(cert_path.read_bytes())[0]
        except (OSError, ValueError) as exc:
            raise PkiError(f"cannot load the fleet CA ({key_path}, {cert_path}): {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise PkiError(f"{key_path}: the CA key must be an EC or RSA key")
        if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
            raise PkiError(f"{key_path} is not the key of {cert_path}")
        self._ca_key, self._ca_cert, self._ca_number = key, cert, number

    def _server_needs_issue(self) -> bool:
        path = self.directory / SERVER_CERT
        if not path.exists() or not (self.directory / SERVER_KEY).exists():
            return True
        try:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
            key = serialization.load_pem_private_key((self.directory / SERVER_KEY).read_bytes(), password=None)
        except ValueError:
            return True
        if key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo) != \
                cert.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo):
            return True
        assert self._ca_cert is not None
        if cert.issuer != self._ca_cert.subject or cert.not_valid_after_utc - _now() < _RENEW_BEFORE:
            return True
        try:
            covered = {str(n.value) for n in cert.extensions.get_extension_for_class(
                x509.SubjectAlternativeName).value}
        except x509.ExtensionNotFound:
            return True
        wanted = {str(n.value) for n in _san(self.server_names)}
        return not wanted <= covered

    def _issue_server(self) -> None:
        assert self._ca_key is not None and self._ca_cert is not None
        key = ec.generate_private_key(ec.SECP256R1())
        names = self.server_names or ["localhost", "127.0.0.1"]
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self._ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=_SERVER_DAYS))
            .add_extension(x509.SubjectAlternativeName(_san(names)), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._ca_key.public_key()),
                           critical=False)
            .sign(self._ca_key, hashes.SHA256())
        )
        _write_atomic(self.directory / SERVER_KEY, _key_pem(key))
        _write_atomic(self.directory / SERVER_CERT, cert.public_bytes(serialization.Encoding.PEM))
        os.chmod(self.directory / SERVER_CERT, 0o644)

    def _check_byo(self) -> None:
        assert self._byo is not None
        for path in self._byo:
            assert path is not None
            if not path.is_file():
                raise PkiError(f"TLS file {path} does not exist")
        cert_file, key_file, _ = self._byo
        assert cert_file is not None and key_file is not None
        try:
            cert = x509.load_pem_x509_certificates(cert_file.read_bytes())[0]
            key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        except ValueError as exc:
            raise PkiError(f"TLS certificate {cert_file} / key {key_file}: {exc}") from None
        public = serialization.PublicFormat.SubjectPublicKeyInfo
        if key.public_key().public_bytes(serialization.Encoding.DER, public) != \
                cert.public_key().public_bytes(serialization.Encoding.DER, public):
            raise PkiError(f"TLS key {key_file} is not the key of certificate {cert_file}")
        # Devices verify the server with the CA file: a certificate it does not vouch for would fail every device
        # at its first connect, far from this misconfiguration.
        ca_file = self._byo[2]
        assert ca_file is not None
        try:
            roots = x509.load_pem_x509_certificates(ca_file.read_bytes())
        except ValueError as exc:
            raise PkiError(f"TLS CA file {ca_file}: {exc}") from None
        if not any(_issued_by(cert, root) for root in roots):
            raise PkiError(f"TLS certificate {cert_file} is not issued by a CA in {ca_file}")
        if self._byo_ca_key is not None:
            self._load_ca()

    # -- device certificates ---------------------------------------------------------------------------------
    def issue_device_certificate(self, csr_pem: bytes | str, device_id: str, *, days: int = _DEVICE_DAYS,
                                 ca: int | None = None) -> IssuedCertificate:
        """Sign a device's CSR: the certificate names ``device_id`` (whatever the CSR asked for) and is good for
        TLS client authentication only. ``ca``: the number of the CA to sign with (a renewal's new CA before it
        issues by default); default: the CA that issues now.

        Raises
        ------
        CsrError
            The CSR is not PEM, its signature does not verify, or its key is not EC P-256/P-384, RSA >= 2048 or
            Ed25519.
        PkiError
            This control plane has no CA key to sign with (bring-your-own CA without its key).
        """
        try:
            validate_device_id(device_id)
        except DeviceIdError as exc:
            raise CsrError(str(exc)) from None
        if not self.can_issue:
            raise PkiError("this control plane has no CA key to issue device certificates with "
                           "(bring-your-own CA without --tls-ca-key-file)")
        if self._byo is None:
            # Another process (the CLI, a second worker) may have completed a renewal: issue with the CA the
            # state names now, not the one this object loaded at start (reloaded only when that changed).
            wanted = self._state().active if ca is None else ca
            if self._ca_key is None or wanted != self._ca_number:
                with self._locked():
                    self._load_ca(wanted)
        elif self._ca_key is None:
            self.ensure()
        assert self._ca_key is not None and self._ca_cert is not None
        csr = _load_csr(csr_pem)
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
            .issuer_name(self._ca_cert.subject).public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, key_cert_sign=False,
                                         crl_sign=False, content_commitment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._ca_key.public_key()),
                           critical=False)
            .sign(self._ca_key, hashes.SHA256())
        )
        return IssuedCertificate(device_id=device_id, cert_pem=cert.public_bytes(serialization.Encoding.PEM),
                                 serial=cert.serial_number, not_after=cert.not_valid_after_utc)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if fcntl is None:  # pragma: no cover
            yield
            return
        fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def _describe(number: int | None, cert: x509.Certificate) -> dict[str, Any]:
    return {"number": number, "fingerprint": ca_fingerprint(cert), "subject": cert.subject.rfc4514_string(),
            "not_after": cert.not_valid_after_utc}


def _write_new(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write a file that must not exist yet (temp file, fsync, hard link: never replaces one)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.link(tmp, path)  # FileExistsError rather than overwrite
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _load_csr(csr_pem: bytes | str) -> x509.CertificateSigningRequest:
    data = csr_pem.encode("ascii", "replace") if isinstance(csr_pem, str) else csr_pem
    if len(data) > _MAX_CSR_BYTES:
        raise CsrError(f"the CSR is {len(data)} bytes; at most {_MAX_CSR_BYTES}")
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError as exc:
        raise CsrError(f"not a PEM certificate signing request: {exc}") from None
    try:
        if not csr.is_signature_valid:
            raise CsrError("the CSR's signature does not verify (it must be signed with the key it carries)")
    except InvalidSignature:
        raise CsrError("the CSR's signature does not verify") from None
    key = csr.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ("secp256r1", "secp384r1"):
            raise CsrError(f"EC key on curve {key.curve.name}: use P-256 or P-384")
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise CsrError(f"RSA key of {key.key_size} bits: at least 2048")
    elif not isinstance(key, ed25519.Ed25519PublicKey):
        raise CsrError(f"unsupported key type {type(key).__name__}: use EC P-256/P-384, RSA >= 2048 or Ed25519")
    return csr
