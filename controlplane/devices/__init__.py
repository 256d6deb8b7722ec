"""The device registry: enrolment, presence, telemetry, commands."""

from controlplane.devices.controller import DeviceController
from controlplane.devices.publisher import CommandPublisher
from controlplane.devices.service import DeviceService

__all__ = ["CommandPublisher", "DeviceController", "DeviceService"]
