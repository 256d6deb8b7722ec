"""Provisioning tokens and device self-enrolment.

A provisioning token is 256 random bits (prefix ``efp_``), stored as its SHA-256 only: a slow KDF buys nothing
against a secret nobody can guess, and it would cost every enrolment tens of milliseconds. It is a separate
credential from the operator API tokens (its own table, its own prefix): it can enrol devices through
``POST /api/v1/enroll`` and do nothing else, and no operator token can enrol through that route.

A use is claimed with one conditional UPDATE (``uses < max_uses``, not revoked, not expired) so that a token made
for N devices enrols at most N even when they all arrive at once; an enrolment that fails after the claim gives the
use back, so that exactly N devices can enrol.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta
from typing import Final

import structlog
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import Engine, update
from sqlmodel import Session, col, select

from agent.protocol import DeviceIdError, validate_device_id
from controlplane._errors import Conflict, ControlPlaneError, InvalidInput, NotFound
from controlplane.db import Device, ProvisioningTokenRecord, as_utc, utcnow
from controlplane.devices.schemas import DeviceCreate
from controlplane.devices.service import DeviceService
from controlplane.pki import FleetPKI
from controlplane.provisioning.schemas import (
    Enrolled,
    EnrollRequest,
    ProvisioningTokenCreate,
    ProvisioningTokenCreated,
    ProvisioningTokenRead,
)
from firmware_profiles import ProfileNotFound, get_profile

__all__ = ["PROVISIONING_PREFIX", "ProvisioningService", "TokenRefused", "TokenUnusable", "token_known"]

log = structlog.get_logger("edgefleet.provisioning")

PROVISIONING_PREFIX: Final = "efp_"


class TokenRefused(ControlPlaneError):
    """Not a provisioning token this control plane issued (or not one at all)."""

    status_code = 401


class TokenUnusable(ControlPlaneError):
    """A provisioning token that was issued here but is revoked, expired or used up."""

    status_code = 403


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", errors="replace")).hexdigest()


def token_known(engine: Engine, secret: str) -> bool:
    """Whether ``secret`` is a provisioning token issued here (usable or not)."""
    if not secret.startswith(PROVISIONING_PREFIX) or len(secret) > 128:
        return False
    with Session(engine) as session:
        return session.exec(select(ProvisioningTokenRecord.id).where(
            ProvisioningTokenRecord.token_hash == _digest(secret))).first() is not None


def _state(row: ProvisioningTokenRecord) -> str:
    if row.revoked:
        return "revoked"
    if as_utc(row.expires_at) <= utcnow():
        return "expired"
    if row.uses >= row.max_uses:
        return "used_up"
    return "active"


_REASONS: Final = {
    "revoked": "this provisioning token was revoked",
    "expired": "this provisioning token has expired",
    "used_up": "this provisioning token has enrolled as many devices as it may (max_uses)",
}


def _read(row: ProvisioningTokenRecord) -> ProvisioningTokenRead:
    assert row.id is not None
    return ProvisioningTokenRead(id=row.id, profile=row.profile, tags=list(row.tags), max_uses=row.max_uses,
                                 uses=row.uses, expires_at=as_utc(row.expires_at),
                                 created_at=as_utc(row.created_at), created_by=row.created_by,
                                 revoked=row.revoked, state=_state(row))


def flower_public_key(text: str) -> str:
    """The OpenSSH form of a SuperNode public key, which must be EC P-384 (what Flower's node auth uses)."""
    try:
        key = serialization.load_ssh_public_key(text.strip().encode("utf-8", errors="replace"))
    except (ValueError, UnsupportedAlgorithm, TypeError) as exc:
        raise InvalidInput(f"flower_public_key is not an OpenSSH public key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise InvalidInput("flower_public_key must be an EC P-384 key (ecdsa-sha2-nistp384), as Flower's "
                           "SuperNode authentication requires")
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


class ProvisioningService:
    def __init__(self, engine: Engine, devices: DeviceService, pki: FleetPKI) -> None:
        self.engine = engine
        self.devices = devices
        self.pki = pki

    # -- tokens (operators) ----------------------------------------------------------------------------------
    def create(self, data: ProvisioningTokenCreate, created_by: str) -> ProvisioningTokenCreated:
        """A new token for up to ``max_uses`` devices of ``profile``; the secret is returned here only."""
        try:
            profile = get_profile(data.profile)
        except ProfileNotFound as exc:
            raise InvalidInput(str(exc)) from None
        if not profile.runtime.python_agent:
            raise InvalidInput(f"profile '{data.profile}' runs {profile.runtime.name} without a Python agent: "
                               "it is a model-export target, not an enrollable device")
        secret = PROVISIONING_PREFIX + secrets.token_urlsafe(32)
        now = utcnow()
        row = ProvisioningTokenRecord(token_hash=_digest(secret), profile=data.profile,
                                      tags=sorted(set(data.tags)), max_uses=data.max_uses,
                                      expires_at=now + timedelta(seconds=data.expires_in_s), created_at=now,
                                      created_by=created_by[:128])
        with Session(self.engine) as session:
            session.add(row)
            session.commit()
            session.refresh(row)
            read = _read(row)
        bundle = self.pki.ca_bundle_pem
        log.info("provisioning.token_created", token_id=read.id, profile=read.profile, max_uses=read.max_uses,
                 created_by=read.created_by)
        return ProvisioningTokenCreated(token=secret, provisioning_token=read, ca_bundle_pem=bundle.decode(),
                                        ca_sha256=hashlib.sha256(bundle).hexdigest())

    def find(self) -> list[ProvisioningTokenRead]:
        with Session(self.engine) as session:
            rows = session.exec(select(ProvisioningTokenRecord).order_by(col(ProvisioningTokenRecord.id)))
            return [_read(row) for row in rows]

    def revoke(self, token_id: int) -> None:
        with Session(self.engine) as session:
            row = session.get(ProvisioningTokenRecord, token_id)
            if row is None:
                raise NotFound(f"no provisioning token #{token_id}")
            row.revoked = True
            session.add(row)
            session.commit()
        log.info("provisioning.token_revoked", token_id=token_id)

    # -- enrolment (devices) ---------------------------------------------------------------------------------
    def enroll(self, secret: str, data: EnrollRequest, controlplane_url: str) -> Enrolled:
        """Enrol ``data.device_id`` with the token's profile and tags, sign its CSR and hand back what it needs.

        The token is checked before anything about the device is looked at: a refused token learns nothing about
        which device ids exist.

        Raises
        ------
        TokenRefused
            401: not a provisioning token issued here.
        TokenUnusable
            403: revoked, expired or used up (the reason says which).
        InvalidInput
            400: a bad device id, CSR or Flower key.
        Conflict
            409: the device id is enrolled already (enrolment never takes a device over).
        """
        row = self._token(secret)
        state = _state(row)
        if state != "active":
            raise TokenUnusable(_REASONS[state])
        assert row.id is not None
        token_id, profile, tags = row.id, row.profile, list(row.tags)
        try:
            validate_device_id(data.device_id)
        except DeviceIdError as exc:
            raise InvalidInput(str(exc)) from None
        key = flower_public_key(data.flower_public_key) if data.flower_public_key else None
        with Session(self.engine) as session:
            if session.get(Device, data.device_id) is not None:
                raise Conflict(f"device '{data.device_id}' is already enrolled")
        # Signed before a use is claimed: a bad CSR costs the token nothing. The certificate names the enrolled
        # id whatever the CSR asked for, and is thrown away if the enrolment fails.
        certificate = None
        if data.csr is not None and self.pki.can_issue:
            certificate = self.pki.issue_device_certificate(data.csr, data.device_id)
        self._claim(token_id)
        try:
            enrolled = self.devices.enroll(DeviceCreate(device_id=data.device_id, profile=profile, tags=tags))
        except BaseException:
            self._give_back(token_id)
            raise
        if key is not None or data.agent_version is not None:
            with Session(self.engine) as session:
                device = session.get(Device, data.device_id)
                if device is not None:
                    device.flower_public_key = key
                    device.agent_version = data.agent_version or device.agent_version
                    session.add(device)
                    session.commit()
        log.info("provisioning.enrolled", device_id=data.device_id, token_id=token_id, profile=profile,
                 certificate=certificate is not None, flower_key=key is not None)
        return Enrolled(
            device_id=enrolled.device_id, profile=enrolled.profile, tags=enrolled.tags,
            broker_url=enrolled.broker_url, mqtt_username=enrolled.mqtt_username,
            mqtt_password=enrolled.mqtt_password, ca_bundle_pem=self.pki.ca_bundle_pem.decode(),
            signing_public_key=enrolled.signing_public_key, controlplane_url=controlplane_url,
            client_certificate_pem=certificate.cert_pem.decode() if certificate else None,
            certificate_not_after=certificate.not_after if certificate else None,
        )

    def _token(self, secret: str) -> ProvisioningTokenRecord:
        if not secret.startswith(PROVISIONING_PREFIX) or len(secret) > 128:
            raise TokenRefused("not a provisioning token (edgefleet provisioning create makes one)")
        with Session(self.engine) as session:
            row = session.exec(select(ProvisioningTokenRecord).where(
                ProvisioningTokenRecord.token_hash == _digest(secret))).first()
            if row is None:
                raise TokenRefused("unknown provisioning token")
            session.expunge(row)
            return row

    def _claim(self, token_id: int) -> None:
        """Take one use, atomically: the database decides between concurrent enrolments."""
        table = ProvisioningTokenRecord
        claim = (update(table)
                 .where(col(table.id) == token_id, col(table.revoked).is_(False),
                        col(table.uses) < col(table.max_uses), col(table.expires_at) > utcnow())
                 .values(uses=col(table.uses) + 1))
        with Session(self.engine) as session:
            claimed = session.exec(claim).rowcount
            session.commit()
            if claimed == 1:
                return
            row = session.get(table, token_id)
            state = "revoked" if row is None else _state(row)
        raise TokenUnusable(_REASONS.get(state, _REASONS["used_up"]))

    def _give_back(self, token_id: int) -> None:
        table = ProvisioningTokenRecord
        with Session(self.engine) as session:
            session.exec(update(table).where(col(table.id) == token_id, col(table.uses) > 0)
                         .values(uses=col(table.uses) - 1))
            session.commit()
