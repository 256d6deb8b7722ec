"""TLS for the control plane's listeners and the devices' identities: the fleet CA (see ``_fleet_ca``)."""

from __future__ import annotations

from ._fleet_ca import (
    CaRenewal,
    CaRenewalStatus,
    CsrError,
    FleetPKI,
    IssuedCertificate,
    PkiError,
    ServerIdentity,
    ca_fingerprint,
    default_server_names,
)

__all__ = [
    "CaRenewal",
    "CaRenewalStatus",
    "CsrError",
    "FleetPKI",
    "IssuedCertificate",
    "PkiError",
    "ServerIdentity",
    "ca_fingerprint",
    "default_server_names",
]
