"""The fleet's own certificate authority: it signs the control plane's server certificate and the devices' client
certificates (CN = device id).

Kept in ``$DATA_DIR/pki`` (directory 0700, keys 0600)::

    ca.key          the CA's EC P-256 private key (never leaves the control plane)
    ca.pem          the CA certificate: what devices verify the server with
    ca-bundle.pem   every CA certificate devices should trust now (the current one, and during a CA renewal the
                    previous one too): served at enrolment and handed to the TLS listeners as client-cert roots
    server.key      the server certificate's private key
    server.pem      the server certificate (its SANs cover the names and addresses the control plane serves)

Bring-your-own: :class:`FleetPKI` takes a certificate, key and CA file of the operator's instead; device client
certificates then need the CA's key too (``ca_key_file``), else enrolment hands out passwords only.

Files are created atomically (temp file 0600, fsync, rename) and never half-written; a second process creating
the CA at the same moment is serialised by ``flock`` on ``pki/.lock``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import secrets
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

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

__all__ = ["CsrError", "FleetPKI", "IssuedCertificate", "PkiError", "ServerIdentity", "default_server_names"]

CA_KEY: Final = "ca.key"
CA_CERT: Final = "ca.pem"
CA_BUNDLE: Final = "ca-bundle.pem"
SERVER_KEY: Final = "server.key"
SERVER_CERT: Final = "server.pem"

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
                if not (self.directory / CA_KEY).exists():
                    self._create_ca()
                self._load_ca()
                if not (self.directory / CA_BUNDLE).exists():
                    _write_atomic(self.directory / CA_BUNDLE, (self.directory / CA_CERT).read_bytes())
                    os.chmod(self.directory / CA_BUNDLE, 0o644)
                if self._server_needs_issue():
                    self._issue_server()
            except OSError as exc:
                raise PkiError(f"cannot set up the fleet PKI in {self.directory}: {exc}") from exc
        return self

    def _create_ca(self) -> None:
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
        # Certificate first: a key without its certificate is recreated, never a certificate without its key.
        _write_atomic(self.directory / CA_CERT, cert.public_bytes(serialization.Encoding.PEM))
        os.chmod(self.directory / CA_CERT, 0o644)
        _write_atomic(self.directory / CA_KEY, _key_pem(key))
        with contextlib.suppress(FileNotFoundError):  # a new CA: the old bundle and server cert are void
            os.unlink(self.directory / CA_BUNDLE)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.directory / SERVER_CERT)

    def _load_ca(self) -> None:
        key_path, cert_path = self.directory / CA_KEY, self.directory / CA_CERT
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
        self._ca_key, self._ca_cert = key, cert

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
    def issue_device_certificate(self, csr_pem: bytes | str, device_id: str, *,
                                 days: int = _DEVICE_DAYS) -> IssuedCertificate:
        """Sign a device's CSR: the certificate names ``device_id`` (whatever the CSR asked for) and is good for
        TLS client authentication only.

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
        if self._ca_key is None:
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
