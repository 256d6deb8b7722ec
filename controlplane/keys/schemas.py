"""API shapes of the model-signing keys and their rotation, split by direction."""

from __future__ import annotations

import enum
from datetime import datetime

import msgspec

from controlplane.statuses import CommandStatus

__all__ = ["DeviceKeyRead", "DeviceKeyStep", "KeyRead", "KeyState", "KeysRead", "RotationComplete", "RotationRead"]


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
