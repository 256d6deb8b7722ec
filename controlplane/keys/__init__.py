"""Model-signing keys: rotation of the key devices verify manifests and releases with; and the fleet CA's renewal
(:mod:`controlplane.keys.ca`), which is sent to devices signed by that key."""

from controlplane.keys.ca import CaRenewalService
from controlplane.keys.controller import KeyController
from controlplane.keys.service import KeyService

__all__ = ["CaRenewalService", "KeyController", "KeyService"]
