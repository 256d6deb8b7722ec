"""Provisioning: tokens operators hand to installers, and devices enrolling themselves with one."""

from controlplane.provisioning.controller import EnrollController, ProvisioningController
from controlplane.provisioning.service import ProvisioningService

__all__ = ["EnrollController", "ProvisioningController", "ProvisioningService"]
