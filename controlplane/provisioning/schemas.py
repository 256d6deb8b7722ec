"""API shapes of provisioning tokens and device self-enrolment, split by direction."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Final

import msgspec

from controlplane._bounds import NAME_PATTERN
from controlplane.devices.schemas import TAG_PATTERN

__all__ = [
    "MAX_EXPIRES_IN_S",
    "MAX_USES",
    "EnrollRequest",
    "Enrolled",
    "ProvisioningTokenCreate",
    "ProvisioningTokenCreated",
    "ProvisioningTokenRead",
]

MAX_USES: Final = 100_000
MAX_EXPIRES_IN_S: Final = 30 * 86_400  # a token is a bearer secret on installers' machines: it must lapse

ProfileName = Annotated[str, msgspec.Meta(pattern=NAME_PATTERN, max_length=64)]
Tags = Annotated[list[Annotated[str, msgspec.Meta(pattern=TAG_PATTERN, max_length=64)]], msgspec.Meta(max_length=32)]


class ProvisioningTokenCreate(msgspec.Struct, forbid_unknown_fields=True):
    profile: ProfileName
    tags: Tags = msgspec.field(default_factory=list)
    max_uses: Annotated[int, msgspec.Meta(ge=1, le=MAX_USES)] = 1
    expires_in_s: Annotated[int, msgspec.Meta(ge=60, le=MAX_EXPIRES_IN_S)] = 86_400


class ProvisioningTokenRead(msgspec.Struct):
    id: int
    profile: str
    tags: list[str]
    max_uses: int
    uses: int
    expires_at: datetime
    created_at: datetime
    created_by: str
    revoked: bool
    state: str  # active | expired | revoked | used_up


class ProvisioningTokenCreated(msgspec.Struct):
    """Returned once at creation: the token is stored only as a hash."""

    token: str
    provisioning_token: ProvisioningTokenRead
    # The fleet CA devices verify this control plane with (`edgefleet agent enroll --ca-file`).
    ca_bundle_pem: str
    ca_sha256: str


class EnrollRequest(msgspec.Struct, forbid_unknown_fields=True):
    device_id: Annotated[str, msgspec.Meta(pattern=NAME_PATTERN, max_length=64)]
    # A PEM certificate signing request for the device's TLS client certificate (its key never leaves it).
    csr: Annotated[str, msgspec.Meta(max_length=16 * 1024)] | None = None
    # A training device's Flower SuperNode public key: OpenSSH, EC P-384.
    flower_public_key: Annotated[str, msgspec.Meta(max_length=1024)] | None = None
    agent_version: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9.+_-]{0,63}$",
                                               max_length=64)] | None = None


class Enrolled(msgspec.Struct):
    """What a device needs to run, returned once: neither the password nor the certificate is shown again."""

    device_id: str
    profile: str
    tags: list[str]
    broker_url: str
    mqtt_username: str
    mqtt_password: str
    ca_bundle_pem: str
    signing_public_key: str
    controlplane_url: str
    client_certificate_pem: str | None = None
    certificate_not_after: datetime | None = None
