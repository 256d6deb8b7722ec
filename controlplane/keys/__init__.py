"""Model-signing keys: rotation of the key devices verify manifests and releases with."""

from controlplane.keys.controller import KeyController
from controlplane.keys.service import KeyService

__all__ = ["KeyController", "KeyService"]
