"""Fleet CA renewal with the fleet online (issue 10 §5): the new CA's bundle and new client certificates sent to
every device, who acknowledged what, and the steps that wait for them.

:meth:`CaRenewalService.renew` creates a new CA beside the old one (:meth:`controlplane.pki.FleetPKI.
begin_ca_renewal`: ``ca-bundle.pem`` = old + new) and the background sweep sends every device, in order:

1. ``trust_ca`` — the current bundle, signed by the model-signing key in use (:class:`agent.trust.SignedCaBundle`;
   the number is the bundle's version). A device writes it as its CA file and trusts the server under either CA.
2. ``renew_certificate`` — once it holds a bundle with the new CA: the device makes a new key and acks with a CSR
   (or says it has no client certificate: a password device is done here).
3. ``install_certificate`` — a certificate for that CSR's key issued by the NEW CA, CN = the device id of the
   registry (never the CSR's), sent only once this process's TLS listeners trust the new CA (they load the
   bundle when they start): a device uses its new certificate from its next connection, and a listener that
   knew only the old CA would refuse it.

:meth:`CaRenewalService.complete` (refused while devices do not hold a bundle with the new CA, unless forced)
makes the new CA the issuer and re-issues the server certificate under it: the listeners serve it from their next
start. :meth:`CaRenewalService.retire_old` (refused while devices still have a certificate of the old CA, unless
forced) drops the old CA from the bundle and sends it to every device: from then on, wherever the bundle is loaded,
a certificate of the old CA is refused.

Delivery and state follow :mod:`controlplane.keys.service`: commands through the command publisher (QoS 1), a
step re-sent when a device comes back online after it was sent and has not acked it, a refused step not re-sent
(its reason shows in :meth:`CaRenewalService.status`); a device's progress is exactly its acknowledged commands.
A device enrolled after a bundle change got that bundle at enrolment; one enrolled after completion got a
certificate of the new CA: neither is sent that step.
"""

from __future__ import annotations

import hashlib
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import msgspec
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from agent import protocol as wire
from agent.trust import CaBundle, SignedCaBundle, ca_bundle_bytes
from controlplane._errors import Conflict, InvalidInput
from controlplane.db import CommandRecord, Device, as_utc, utcnow
from controlplane.devices.publisher import CommandPublisher
from controlplane.keys._send import send_statement
from controlplane.keys.schemas import CaCertificateRead, CaDeviceRead, CaDeviceStep, CaRead, CaRenewalRead
from controlplane.pki import CaRenewal, CaRenewalStatus, CsrError, FleetPKI, PkiError
from controlplane.statuses import CommandStatus
from federated.signing import Signer

__all__ = ["RESTART_NOTE", "CaRenewalService"]

log = structlog.get_logger("edgefleet.controlplane.keys.ca")

TRUST: Final = str(wire.CommandKind.TRUST_CA)
RENEW: Final = str(wire.CommandKind.RENEW_CERTIFICATE)
INSTALL: Final = str(wire.CommandKind.INSTALL_CERTIFICATE)
_KINDS: Final = (TRUST, RENEW, INSTALL)
PENDING_SHOWN: Final = 20
RESTART_NOTE: Final = ("the server certificate is re-issued under the new CA; the control plane's HTTPS and MQTTS "
                       "listeners serve it from their next start: restart the control plane (devices trust either "
                       "CA meanwhile)")


@dataclass
class _Step:
    ok: bool = False
    latest: CommandRecord | None = None


@dataclass
class _Device:
    device_id: str
    online: bool
    created_at: datetime
    state_ts: float | None
    steps: dict[tuple[int, str], _Step] = field(default_factory=lambda: defaultdict(_Step))
    bundle: int = 0  # the highest bundle version it acknowledged

    def step(self, number: int, kind: str) -> _Step:
        return self.steps[(number, kind)]

    @property
    def connected_at(self) -> datetime | None:
        ts = self.state_ts
        return datetime.fromtimestamp(ts, UTC) if ts is not None and ts > 0 else None


def _at(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC)


def _before(device: _Device, ts: float | None) -> bool:
    """Whether the device was enrolled before ``ts`` (None: not happened yet, so yes)."""
    moment = _at(ts)
    return moment is None or device.created_at <= moment


def _holds_new(device: _Device, renewal: CaRenewal) -> bool:
    """Whether the device's CA file holds the renewal's new CA (acknowledged, or handed out at its enrolment)."""
    return device.bundle >= renewal.bundle_version or not _before(device, renewal.issued_at)


class CaRenewalService:
    """The fleet CA's renewal (see the module docstring). ``sweep`` is run by :class:`controlplane.keys.KeyService`'s
    background loop."""

    def __init__(self, engine: Engine, pki: FleetPKI, signer: Signer, publisher: CommandPublisher | None) -> None:
        self.engine = engine
        self.pki = pki
        self.signer = signer
        self.publisher = publisher
        self._lock = threading.Lock()

    # -- reading -----------------------------------------------------------------------------------------------
    def status(self, limit: int = PENDING_SHOWN, note: str | None = None) -> CaRead:
        """The bundle's CAs, the latest renewal and (up to ``limit``) the devices that have a step left."""
        try:
            summary = self.pki.ca_summary()
        except PkiError as exc:
            raise Conflict(str(exc)) from exc
        renewals = self.pki.ca_renewals()
        renewal = renewals[-1] if renewals else None
        trusted = [CaCertificateRead(number=c["number"], fingerprint=c["fingerprint"], subject=c["subject"],
                                     not_after=c["not_after"]) for c in summary["trusted"]]
        listeners = self.pki.listeners_bundle_version
        return CaRead(active=summary["active"], bundle_version=summary["bundle_version"],
                      listeners_bundle_version=listeners, trusted=trusted,
                      renewal=None if renewal is None else self._renewal_read(renewal, summary["bundle_version"],
                                                                            limit),
                      note=note)

    def _renewal_read(self, renewal: CaRenewal, bundle: int, limit: int) -> CaRenewalRead:
        with Session(self.engine) as session:
            devices = list(self._progress(session).values())
        applies = [d for d in devices if _before(d, renewal.issued_at)]
        holding = [d for d in applies if _holds_new(d, renewal)]
        certs = [d for d in devices if _before(d, renewal.completed_at) and self._cert_done(d, renewal)]
        pending = []
        for device in sorted(devices, key=lambda d: d.device_id):
            step = self._step_of(device, renewal, bundle)
            if step is not CaDeviceStep.DONE:
                pending.append(self._device_read(device, renewal, bundle, step))
        return CaRenewalRead(
            number=renewal.number, status=str(renewal.status), old_fingerprint=renewal.old_fingerprint,
            new_fingerprint=renewal.new_fingerprint, issued_at=_at(renewal.issued_at) or utcnow(),
            completed_at=_at(renewal.completed_at), retired_at=_at(renewal.retired_at), devices=len(applies),
            trust_new_ca=len(holding), certificates_renewed=len(certs), pending_devices=len(pending),
            pending=pending[:limit])

    @staticmethod
    def _cert_done(device: _Device, renewal: CaRenewal) -> bool:
        renew = device.step(renewal.number, RENEW)
        if renew.ok and renew.latest is not None and (renew.latest.result or {}).get("client_certificate") is False:
            return True
        return device.step(renewal.number, INSTALL).ok

    def _step_of(self, device: _Device, renewal: CaRenewal, bundle: int) -> CaDeviceStep:
        """What the device still has to acknowledge for the latest renewal and the current bundle."""
        if device.bundle < bundle and _before(device, self._bundle_changed_at(renewal)):
            return CaDeviceStep.TRUST_CA
        if not _before(device, renewal.completed_at) or self._cert_done(device, renewal):
            return CaDeviceStep.DONE
        renew = device.step(renewal.number, RENEW)
        return CaDeviceStep.INSTALL_CERTIFICATE if renew.ok else CaDeviceStep.RENEW_CERTIFICATE

    @staticmethod
    def _bundle_changed_at(renewal: CaRenewal) -> float:
        return renewal.retired_at if renewal.retired_at is not None else renewal.issued_at

    def _device_read(self, device: _Device, renewal: CaRenewal, bundle: int, step: CaDeviceStep) -> CaDeviceRead:
        kind = {CaDeviceStep.TRUST_CA: TRUST, CaDeviceStep.RENEW_CERTIFICATE: RENEW}.get(step, INSTALL)
        latest = device.step(bundle if kind == TRUST else renewal.number, kind).latest
        reason = None if latest is None else latest.reason
        if latest is None:
            reason = "not sent yet: the next sweep sends it"
            if step is CaDeviceStep.INSTALL_CERTIFICATE and not self._listeners_trust(renewal):
                reason = ("waiting for the control plane's listeners to load the bundle with the new CA: restart "
                          "the control plane")
            elif step is CaDeviceStep.RENEW_CERTIFICATE and not _holds_new(device, renewal):
                reason = "waiting for the device to hold the bundle with the new CA"
        elif latest.status == CommandStatus.PENDING:
            reason = "waiting for the device's ack" if device.online else \
                "the device is offline: the command is sent again when it is back"
        return CaDeviceRead(device_id=device.device_id, online=device.online, step=step,
                            status=None if latest is None else CommandStatus(latest.status), reason=reason,
                            ca_bundle=device.bundle or None)

    def _progress(self, session: Session) -> dict[str, _Device]:
        rows = session.exec(select(Device.device_id, Device.online, Device.created_at,
                                   col(Device.reported_state)["ts"].as_float()))
        devices = {device_id: _Device(device_id, bool(online), as_utc(created), ts)
                   for device_id, online, created, ts in rows}
        commands = session.exec(select(CommandRecord).where(col(CommandRecord.kind).in_(_KINDS))
                                .order_by(col(CommandRecord.created_at)))
        for command in commands:
            progress = devices.get(command.device_id)
            args = command.args or {}
            number = args.get("bundle") if command.kind == TRUST else args.get("renewal")
            if progress is None or not isinstance(number, int):
                continue
            step = progress.step(number, command.kind)
            step.latest = command
            if command.status == CommandStatus.OK:
                step.ok = True
                if command.kind == TRUST:
                    progress.bundle = max(progress.bundle, number)
        session.expunge_all()
        return devices

    # -- changing ----------------------------------------------------------------------------------------------
    def renew(self) -> CaRead:
        """Create a new CA beside the old one, trust both, and start sending devices the bundle."""
        if self.publisher is None:
            raise InvalidInput("this control plane has no broker connection for commands")
        try:
            renewal = self.pki.begin_ca_renewal()
        except PkiError as exc:
            raise Conflict(str(exc)) from exc
        log.info("ca.renewal_begun", renewal=renewal.number, new_ca=renewal.new_fingerprint,
                 old_ca=renewal.old_fingerprint, bundle=renewal.bundle_version)
        self.sweep()
        return self.status()

    def _latest(self, status: CaRenewalStatus, what: str) -> CaRenewal:
        renewals = self.pki.ca_renewals()
        if not renewals or renewals[-1].status is not status:
            raise Conflict(what)
        return renewals[-1]

    def _missing(self, renewal: CaRenewal, steps: tuple[CaDeviceStep, ...]) -> list[str]:
        bundle = self.pki.bundle_version
        with Session(self.engine) as session:
            devices = self._progress(session).values()
        return sorted(d.device_id for d in devices if self._step_of(d, renewal, bundle) in steps)

    @staticmethod
    def _refuse(missing: list[str], what: str) -> None:
        if missing:
            more = f" and {len(missing) - PENDING_SHOWN} more" if len(missing) > PENDING_SHOWN else ""
            raise Conflict(f"{len(missing)} device(s) {what}: {', '.join(missing[:PENDING_SHOWN])}{more} "
                           "(use force to go on anyway)")

    def complete(self, *, force: bool = False) -> CaRead:
        """Issue from the new CA from now on and re-issue the server certificate under it. Conflict while devices
        do not hold a bundle with the new CA (they would refuse the new server certificate), unless ``force``."""
        renewal = self._latest(CaRenewalStatus.IN_PROGRESS,
                               "no CA renewal is in progress (start one with `edgefleet keys renew-ca`)")
        if not force:
            self._refuse(self._missing(renewal, (CaDeviceStep.TRUST_CA,)),
                         "have not acknowledged the bundle with the new CA; they would refuse the new server "
                         "certificate")
        try:
            renewal = self.pki.complete_ca_renewal()
        except PkiError as exc:
            raise Conflict(str(exc)) from exc
        log.info("ca.renewal_complete", renewal=renewal.number, new_ca=renewal.new_fingerprint, forced=force)
        self.sweep()
        return self.status(note=RESTART_NOTE)

    def retire_old(self, *, force: bool = False) -> CaRead:
        """Drop the old CA from the bundle (devices are sent the bundle without it). Conflict while devices still
        need the old CA — no bundle with the new CA, or a client certificate of the old CA — unless ``force``."""
        renewal = self._latest(CaRenewalStatus.COMPLETE, "retiring the old CA needs a completed CA renewal "
                                                         "(`edgefleet keys renew-ca`, then `--complete`)")
        if not force:
            self._refuse(self._missing(renewal, (CaDeviceStep.TRUST_CA, CaDeviceStep.RENEW_CERTIFICATE,
                                                 CaDeviceStep.INSTALL_CERTIFICATE)),
                         "still need the old CA (no bundle with the new CA, or a client certificate of the old "
                         "one); the broker would refuse them")
        try:
            renewal = self.pki.retire_old_ca()
        except PkiError as exc:
            raise Conflict(str(exc)) from exc
        log.info("ca.old_retired", renewal=renewal.number, retired_ca=renewal.old_fingerprint, forced=force)
        self.sweep()
        return self.status(note="the old CA is out of the bundle; the listeners refuse its certificates from their "
                                "next start: restart the control plane")

    # -- sending -----------------------------------------------------------------------------------------------
    def sweep(self) -> int:
        """Send each device its next CA-renewal step where it needs one. Returns how many commands were sent."""
        if self.publisher is None or self.pki.bring_your_own:
            return 0
        renewals = self.pki.ca_renewals()
        if not renewals:
            return 0
        renewal = renewals[-1]
        sent = 0
        with self._lock:
            bundle = self.pki.bundle_version
            with Session(self.engine) as session:
                progress = list(self._progress(session).values())
            for device in progress:
                due = self._next(device, renewal, bundle)
                if due is not None and self._send(device, renewal, bundle, due):
                    sent += 1
        return sent

    def _next(self, device: _Device, renewal: CaRenewal, bundle: int) -> str | None:
        step = self._step_of(device, renewal, bundle)
        if step is CaDeviceStep.DONE:
            return None
        kind = {CaDeviceStep.TRUST_CA: TRUST, CaDeviceStep.RENEW_CERTIFICATE: RENEW}.get(step, INSTALL)
        if kind == RENEW and not _holds_new(device, renewal):
            return None  # its CA file must hold the new CA before a certificate of it can be installed
        if kind == INSTALL and not self._listeners_trust(renewal):
            return None
        latest = device.step(bundle if kind == TRUST else renewal.number, kind).latest
        if latest is None:
            return kind
        if latest.status != CommandStatus.PENDING:
            return None  # refused: the reason shows in the status; sending it again changes nothing
        back = device.connected_at
        if device.online and back is not None and back > as_utc(latest.created_at):
            return kind  # it came back after the command was sent: its session may be gone
        return None

    def _listeners_trust(self, renewal: CaRenewal) -> bool:
        loaded = self.pki.listeners_bundle_version
        return loaded is not None and loaded >= renewal.bundle_version

    def _args(self, device: _Device, renewal: CaRenewal, bundle: int, kind: str) -> dict[str, Any] | None:
        if kind == TRUST:
            return {"bundle": bundle, "statement": msgspec.to_builtins(self._statement(bundle, renewal))}
        if kind == RENEW:
            return {"renewal": renewal.number}
        renew = device.step(renewal.number, RENEW).latest
        csr = (renew.result or {}).get("csr") if renew is not None else None
        if not isinstance(csr, str):
            return None
        try:
            issued = self.pki.issue_device_certificate(csr, device.device_id, ca=renewal.number)
        except (CsrError, PkiError) as exc:
            log.warning("ca.certificate_not_issued", device_id=device.device_id, error=str(exc))
            return None
        return {"renewal": renewal.number, "certificate": issued.cert_pem.decode("ascii")}

    def _statement(self, bundle: int, renewal: CaRenewal) -> SignedCaBundle:
        """The current bundle, signed by the model-signing key in use."""
        pem = self.pki.ca_bundle_pem
        certs = x509.load_pem_x509_certificates(pem)
        statement = CaBundle(number=bundle, bundle_pem=pem.decode("ascii"),
                             fingerprints=[hashlib.sha256(c.public_bytes(serialization.Encoding.DER)).hexdigest()
                                           for c in certs],
                             issued_at=int(self._bundle_changed_at(renewal)))
        signature, signer_id = self.signer.sign_message(ca_bundle_bytes(statement))
        return SignedCaBundle(statement=statement, signature=signature, key_id=signer_id)

    def _send(self, device: _Device, renewal: CaRenewal, bundle: int, kind: str) -> bool:
        assert self.publisher is not None
        args = self._args(device, renewal, bundle, kind)
        if args is None:
            return False
        if not send_statement(self.engine, self.publisher, device.device_id, kind, args, "ca"):
            return False
        log.info("ca.sent", device_id=device.device_id, kind=kind, renewal=renewal.number, bundle=bundle)
        return True
