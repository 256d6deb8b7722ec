"""The fleet CA: created once with private keys, a server certificate a real TLS client accepts, device
certificates that name the device whatever the CSR asked for, and hostile CSRs refused."""

from __future__ import annotations

import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from controlplane.pki import CsrError, FleetPKI, PkiError


def _csr(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, cn: str = "whatever") -> bytes:
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])).sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM)


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_hostname: str) -> str | None:
    """A real TLS handshake over loopback; returns the client certificate's CN the server saw."""
    seen: dict[str, object] = {}
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)

        def serve() -> None:
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    peer = tls.getpeercert()
                    seen["cn"] = dict(x[0] for x in peer["subject"])["commonName"] if peer else None
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError) as exc:
                seen["error"] = exc

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with socket.create_connection(listener.getsockname()) as raw, \
                client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
            assert tls.recv(2) == b"ok"
        thread.join(5)
    if "error" in seen:
        raise seen["error"]  # type: ignore[misc]
    return seen.get("cn")  # type: ignore[return-value]


def test_ca_created_once_private_and_server_cert_accepted_by_a_tls_client(tmp_path: Path) -> None:
    # Prepare / Execute
    pki = FleetPKI(tmp_path / "pki", server_names=["cp.fleet.test", "10.66.0.2"]).ensure()
    ca_before = (tmp_path / "pki" / "ca.pem").read_bytes()
    FleetPKI(tmp_path / "pki", server_names=["cp.fleet.test", "10.66.0.2"]).ensure()
    # Assert: private modes, stable CA, and a verifying client accepts both names
    assert stat.S_IMODE((tmp_path / "pki").stat().st_mode) == 0o700
    for key in ("ca.key", "server.key"):
        assert stat.S_IMODE((tmp_path / "pki" / key).stat().st_mode) == 0o600
    assert (tmp_path / "pki" / "ca.pem").read_bytes() == ca_before
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(pki.server.cert_file, pki.server.key_file)
    client = ssl.create_default_context(cafile=str(pki.server.ca_file))
    _handshake(server, client, "cp.fleet.test")
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(server, client, "elsewhere.test")


def test_server_cert_reissued_for_a_new_name_under_the_same_ca(tmp_path: Path) -> None:
    FleetPKI(tmp_path, server_names=["a.test"]).ensure()
    ca = (tmp_path / "ca.pem").read_bytes()
    pki = FleetPKI(tmp_path, server_names=["a.test", "b.test"]).ensure()
    assert (tmp_path / "ca.pem").read_bytes() == ca
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(pki.server.cert_file, pki.server.key_file)
    _handshake(server, ssl.create_default_context(cafile=str(pki.server.ca_file)), "b.test")


def test_device_certificate_names_the_device_and_authenticates_in_mutual_tls(tmp_path: Path) -> None:
    # Prepare: a device key that never leaves the "device", a CSR asking for someone else's name
    pki = FleetPKI(tmp_path, server_names=["cp.test"]).ensure()
    device_key = ec.generate_private_key(ec.SECP256R1())
    # Execute
    issued = pki.issue_device_certificate(_csr(device_key, cn="pi-victim"), "pi-0001")
    # Assert: CN is the enrolled id; a server requiring client certs from the fleet CA sees that id
    cert = x509.load_pem_x509_certificate(issued.cert_pem)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "pi-0001"
    (tmp_path / "dev.pem").write_bytes(issued.cert_pem)
    (tmp_path / "dev.key").write_bytes(device_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(pki.server.cert_file, pki.server.key_file)
    server.load_verify_locations(pki.server.ca_file)
    server.verify_mode = ssl.CERT_REQUIRED
    client = ssl.create_default_context(cafile=str(pki.server.ca_file))
    client.load_cert_chain(tmp_path / "dev.pem", tmp_path / "dev.key")
    assert _handshake(server, client, "cp.test") == "pi-0001"


def test_a_certificate_from_another_ca_is_refused(tmp_path: Path) -> None:
    ours = FleetPKI(tmp_path / "ours", server_names=["cp.test"]).ensure()
    theirs = FleetPKI(tmp_path / "theirs", server_names=["cp.test"]).ensure()
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "dev.pem").write_bytes(theirs.issue_device_certificate(_csr(key), "pi-0001").cert_pem)
    (tmp_path / "dev.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(ours.server.cert_file, ours.server.key_file)
    server.load_verify_locations(ours.server.ca_file)
    server.verify_mode = ssl.CERT_REQUIRED
    client = ssl.create_default_context(cafile=str(ours.server.ca_file))
    client.load_cert_chain(tmp_path / "dev.pem", tmp_path / "dev.key")
    with pytest.raises((ssl.SSLError, OSError)):
        _handshake(server, client, "cp.test")


@pytest.mark.parametrize("bad", ["garbage", "tampered", "weak-rsa", "huge"])
def test_hostile_csrs_are_refused_with_the_reason(tmp_path: Path, bad: str) -> None:
    pki = FleetPKI(tmp_path).ensure()
    if bad == "garbage":
        csr = b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
    elif bad == "tampered":  # another key's public key under this signature
        good = x509.load_pem_x509_csr(_csr(ec.generate_private_key(ec.SECP256R1())))
        der = bytearray(good.public_bytes(serialization.Encoding.DER))
        der[-5] ^= 0xFF
        csr = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    elif bad == "weak-rsa":
        csr = _csr(rsa.generate_private_key(public_exponent=65537, key_size=1024))
    else:
        csr = b"A" * 100_000
    with pytest.raises(CsrError):
        pki.issue_device_certificate(csr, "pi-0001")


def test_device_id_in_the_certificate_is_validated(tmp_path: Path) -> None:
    pki = FleetPKI(tmp_path).ensure()
    with pytest.raises(CsrError):
        pki.issue_device_certificate(_csr(ec.generate_private_key(ec.SECP256R1())), "a/#")


def test_bring_your_own_key_that_does_not_match_its_certificate_is_named(tmp_path: Path) -> None:
    mine = FleetPKI(tmp_path / "a", server_names=["x.test"]).ensure()
    other = FleetPKI(tmp_path / "b", server_names=["x.test"]).ensure()
    byo = FleetPKI(tmp_path / "c", cert_file=mine.server.cert_file, key_file=other.server.key_file,
                   ca_file=mine.server.ca_file)
    with pytest.raises(PkiError, match="is not the key of certificate"):
        byo.ensure()
    assert not byo.can_issue


def test_bring_your_own_certificate_not_issued_by_its_ca_file_is_named(tmp_path: Path) -> None:
    mine = FleetPKI(tmp_path / "a", server_names=["x.test"]).ensure()
    other = FleetPKI(tmp_path / "b", server_names=["x.test"]).ensure()
    byo = FleetPKI(tmp_path / "c", cert_file=mine.server.cert_file, key_file=mine.server.key_file,
                   ca_file=other.server.ca_file)
    with pytest.raises(PkiError, match="is not issued by a CA in"):
        byo.ensure()
    # the control: with its own CA file the same files are accepted, and serve a verifying client
    good = FleetPKI(tmp_path / "d", cert_file=mine.server.cert_file, key_file=mine.server.key_file,
                    ca_file=mine.server.ca_file).ensure()
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(good.server.cert_file, good.server.key_file)
    _handshake(server, ssl.create_default_context(cafile=str(good.server.ca_file)), "x.test")


# -- CA renewal (issue 10 §5) ----------------------------------------------------------------------------------------
def _device_files(directory: Path, pki: FleetPKI, device_id: str, name: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert, key_file = directory / f"{name}.pem", directory / f"{name}.key"
    cert.write_bytes(pki.issue_device_certificate(_csr(key), device_id).cert_pem)
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert, key_file


def _mutual(pki: FleetPKI) -> ssl.SSLContext:
    """A listener as the broker's: the server certificate, client certificates required from the bundle."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(pki.server.cert_file, pki.server.key_file)
    server.load_verify_locations(pki.server.ca_file)
    server.verify_mode = ssl.CERT_REQUIRED
    return server


def test_ca_renewal_overlaps_old_and_new_then_retires_the_old(tmp_path: Path) -> None:
    # Prepare: a fleet CA with a device certificate, and a device's CA file from before the renewal
    pki = FleetPKI(tmp_path / "pki", server_names=["cp.test"]).ensure()
    old_key, old_ca = (tmp_path / "pki" / "ca.key").read_bytes(), (tmp_path / "pki" / "ca.pem").read_bytes()
    old_cert = _device_files(tmp_path, pki, "pi-1", "old")
    old_server = (tmp_path / "pki" / "server.pem").read_bytes()
    # Execute: renew
    renewal = pki.begin_ca_renewal()
    # Assert: a new CA beside the old (which is untouched and still issues); the bundle holds both, in order
    assert renewal.number == 1 and pki.bundle_version == 2 == renewal.bundle_version
    assert (tmp_path / "pki" / "ca.key").read_bytes() == old_key
    assert (tmp_path / "pki" / "ca.pem").read_bytes() == old_ca
    assert stat.S_IMODE((tmp_path / "pki" / "ca.1.key").stat().st_mode) == 0o600
    bundle = x509.load_pem_x509_certificates((tmp_path / "pki" / "ca-bundle.pem").read_bytes())
    new_ca = x509.load_pem_x509_certificate((tmp_path / "pki" / "ca.1.pem").read_bytes())
    assert [c.subject for c in bundle] == [x509.load_pem_x509_certificate(old_ca).subject, new_ca.subject]
    assert (tmp_path / "pki" / "server.pem").read_bytes() == old_server
    assert x509.load_pem_x509_certificate(old_cert[0].read_bytes()).issuer != new_ca.subject
    # a renewal's certificate of the new CA is accepted with the old one by a listener that loaded the bundle
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "new.pem").write_bytes(pki.issue_device_certificate(_csr(key), "pi-1", ca=1).cert_pem)
    (tmp_path / "new.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    for cert_file, key_file in (old_cert, (tmp_path / "new.pem", tmp_path / "new.key")):
        client = ssl.create_default_context(cafile=str(pki.server.ca_file))
        client.load_cert_chain(cert_file, key_file)
        assert _handshake(_mutual(pki), client, "cp.test") == "pi-1"
    with pytest.raises(PkiError, match="in progress"):
        pki.begin_ca_renewal()
    with pytest.raises(PkiError, match="completed CA renewal"):
        pki.retire_old_ca()

    # Execute: complete (a second process's view: the state is on disk)
    FleetPKI(tmp_path / "pki", server_names=["cp.test"]).complete_ca_renewal()
    # Assert: the server certificate and new device certificates come from the new CA; a device holding the old
    # CA file only would refuse the new server (hence devices get the bundle first)
    server_cert = x509.load_pem_x509_certificate((tmp_path / "pki" / "server.pem").read_bytes())
    server_cert.verify_directly_issued_by(new_ca)
    fresh = x509.load_pem_x509_certificate(pki.issue_device_certificate(_csr(key), "pi-2").cert_pem)
    fresh.verify_directly_issued_by(new_ca)
    (tmp_path / "old-ca-only.pem").write_bytes(old_ca)
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(_mutual(pki), ssl.create_default_context(cafile=str(tmp_path / "old-ca-only.pem")), "cp.test")
    # a restart keeps it all (ensure() issues nothing new)
    FleetPKI(tmp_path / "pki", server_names=["cp.test"]).ensure()
    assert (tmp_path / "pki" / "server.pem").read_bytes() == server_cert.public_bytes(serialization.Encoding.PEM)

    # Execute: retire the old CA
    pki.retire_old_ca()
    # Assert: the bundle holds the new CA only; a listener loading it refuses the old CA's certificate and takes
    # the new one's
    assert pki.bundle_version == 3
    assert [c.subject for c in x509.load_pem_x509_certificates(pki.ca_bundle_pem)] == [new_ca.subject]
    client = ssl.create_default_context(cafile=str(pki.server.ca_file))
    client.load_cert_chain(*old_cert)
    with pytest.raises((ssl.SSLError, OSError)):
        _handshake(_mutual(pki), client, "cp.test")
    client = ssl.create_default_context(cafile=str(pki.server.ca_file))
    client.load_cert_chain(tmp_path / "new.pem", tmp_path / "new.key")
    assert _handshake(_mutual(pki), client, "cp.test") == "pi-1"
    assert [r.status for r in pki.ca_renewals()] == ["retired"]


def test_a_renewal_never_overwrites_a_ca_key_and_a_missing_one_is_an_error(tmp_path: Path) -> None:
    pki = FleetPKI(tmp_path / "pki").ensure()
    (tmp_path / "pki" / "ca.1.key").write_bytes(b"someone's key")
    with pytest.raises(PkiError, match="cannot create CA 1"):
        pki.begin_ca_renewal()
    assert (tmp_path / "pki" / "ca.1.key").read_bytes() == b"someone's key"
    (tmp_path / "pki" / "ca.1.key").unlink()
    pki.begin_ca_renewal()
    pki.complete_ca_renewal()
    (tmp_path / "pki" / "ca.1.key").unlink()  # the issuing CA's key went missing: never a fresh CA in its place
    with pytest.raises(PkiError, match="cannot load the fleet CA"):
        FleetPKI(tmp_path / "pki").ensure()


def test_a_bring_your_own_ca_is_not_renewed_here(tmp_path: Path) -> None:
    mine = FleetPKI(tmp_path / "a", server_names=["x.test"]).ensure()
    byo = FleetPKI(tmp_path / "c", cert_file=mine.server.cert_file, key_file=mine.server.key_file,
                   ca_file=mine.server.ca_file).ensure()
    with pytest.raises(PkiError, match="bring-your-own"):
        byo.begin_ca_renewal()
