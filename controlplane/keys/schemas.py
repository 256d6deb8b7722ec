"""API shapes of the model-signing keys and their rotation, split by direction."""

from __future__ import annotations

import enum
from datetime import datetime

import msgspec

from controlplane.statuses import CommandStatus

__all__ = ["CaCertificateRead", "CaDeviceRead", "CaDeviceStep", "CaRead", "CaRenewalRead", "CaStep", "DeviceKeyRead",
           "DeviceKeyStep", "KeyRead", "KeyState", "KeysRead", "RotationComplete", "RotationRead"]


class KeyState(enum.StrEnum):
    ACTIVE = "active"  # signs manifests and releases now
    NEXT = "next"  # a rotation in progress introduces it; devices are learning it
    RETIRED = "retired"  # a completed rotation replaced it; devices refuse what it signs


class DeviceKeyStep(enum.StrEnum):
    TRUST = "trust"  # the device has not acknowledged the new key yet
    RETIRE = "retire"  # it trusts the new key; the retirement of the old one is not acknowledged yet
    DONE = "done"


class KeyRead(msgspec.Struct):
    key_id: str
    public_key: str  # base64 of the raw 32-byte ed25519 public key (what `agent run --signing-key` takes)
    rotation: int  # the rotation that introduced it (0: the first key)
    state: KeyState


class DeviceKeyRead(msgspec.Struct):
    """Where one device stands in a rotation."""

    device_id: str
    online: bool
    step: DeviceKeyStep  # what it still has to acknowledge
    status: CommandStatus | None  # of that step's latest command; None: not sent yet
    reason: str | None  # why the device refused it, or why it is not sent yet
    trusted_key_ids: list[str] | None  # as the device reported in its latest ack; None: it has not reported


class RotationRead(msgspec.Struct):
    number: int
    status: str  # in_progress | complete
    old_key_id: str
    new_key_id: str
    issued_at: datetime
    completed_at: datetime | None
    devices: int  # devices enrolled before the rotation completed (the ones that must learn the key)
    acknowledged: int  # of those, how many acknowledged the new key
    retired: int  # of those, how many acknowledged the retirement of the old key
    # Devices that have not acknowledged the new key (or, once complete, the retirement), up to `limit`.
    pending: list[DeviceKeyRead]


class KeysRead(msgspec.Struct):
    active_key_id: str
    keys: list[KeyRead]
    rotation: RotationRead | None  # the latest rotation; None before the first


class RotationComplete(msgspec.Struct, forbid_unknown_fields=True):
    # Complete although devices have not acknowledged the new key: they refuse new releases until they learn it
    # (the control plane keeps re-sending the key, then its retirement, when they come back).
    force: bool = False


# -- fleet CA renewal ---------------------------------------------------------------------------------------------
class CaDeviceStep(enum.StrEnum):
    TRUST_CA = "trust_ca"  # the device has not acknowledged the current bundle
    RENEW_CERTIFICATE = "renew_certificate"  # no CSR for a certificate of the new CA yet
    INSTALL_CERTIFICATE = "install_certificate"  # the certificate of the new CA is not installed yet
    DONE = "done"


class CaCertificateRead(msgspec.Struct):
    number: int | None  # the CA's number (0: the first; None: a bring-your-own CA)
    fingerprint: str  # SHA-256 of its DER, hex
    subject: str
    not_after: datetime


class CaDeviceRead(msgspec.Struct):
    """Where one device stands in the CA renewal."""

    device_id: str
    online: bool
    step: CaDeviceStep  # what it still has to acknowledge
    status: CommandStatus | None  # of that step's latest command; None: not sent yet
    reason: str | None  # why the device refused it, or why it is not sent yet
    ca_bundle: int | None  # the highest bundle version it acknowledged


class CaRenewalRead(msgspec.Struct):
    number: int
    status: str  # in_progress | complete | retired
    old_fingerprint: str
    new_fingerprint: str
    issued_at: datetime
    completed_at: datetime | None
    retired_at: datetime | None
    devices: int  # devices enrolled before the renewal began
    trust_new_ca: int  # of those, how many hold a bundle with the new CA
    certificates_renewed: int  # devices with a certificate of the new CA installed (or without a certificate)
    pending_devices: int  # devices with a step left
    pending: list[CaDeviceRead]  # up to `limit` of them


class CaRead(msgspec.Struct):
    active: int | None  # the CA that issues now (None: a bring-your-own CA)
    bundle_version: int  # of ca-bundle.pem (devices refuse a bundle with a lower one)
    listeners_bundle_version: int | None  # the bundle this control plane's TLS listeners loaded at their start
    trusted: list[CaCertificateRead]  # the CAs in ca-bundle.pem
    renewal: CaRenewalRead | None  # the latest renewal; None before the first
    note: str | None = None  # what the operator has to do next (a restart), after a change


class CaStep(msgspec.Struct, forbid_unknown_fields=True):
    # Go on although devices have not acknowledged what the step needs (see the API's description).
    force: bool = False
