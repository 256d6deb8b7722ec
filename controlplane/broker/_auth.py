"""How the control plane keeps broker credentials and ACLs in sync with the device registry."""

from __future__ import annotations

from typing import Protocol

__all__ = ["BrokerAuth", "NoBrokerAuth"]


class BrokerAuth(Protocol):
    """Credentials + ACLs of devices on the broker.

    A device may publish only `edgefleet/v1/devices/{id}/telemetry|state|ack` and subscribe only to its own
    `.../cmd`. The MQTT username of a device is its device id.
    """

    def ensure_device(self, device_id: str, password: str) -> None:
        """Create or update the device's broker account (idempotent)."""

    def remove_device(self, device_id: str) -> None:
        """Remove the device's broker account; its live connections lose access."""

    def close(self) -> None:
        """Release connections."""


class NoBrokerAuth:
    """For a broker that does its own authentication (or none, as a development mosquitto)."""

    def ensure_device(self, device_id: str, password: str) -> None:
        return None

    def remove_device(self, device_id: str) -> None:
        return None

    def close(self) -> None:
        return None
