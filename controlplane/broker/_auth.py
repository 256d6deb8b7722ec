"""How the control plane keeps broker credentials and ACLs in sync with the device registry."""

from __future__ import annotations

from typing import Final, Protocol

from ._errors import BrokerAuthError

__all__ = [
    "RESERVED_PREFIX",
    "BrokerAuth",
    "NoBrokerAuth",
    "check_device_username",
    "is_reserved",
    "reserved_reason",
]

# Broker usernames and client ids of the control plane itself (service account, ingest workers, publisher, dynsec
# admin) start with this; a device may not be named so, or it could pass for one of them.
RESERVED_PREFIX: Final = "edgefleet-"


def is_reserved(device_id: str) -> bool:
    """Whether ``device_id`` is a name reserved for the control plane's own broker accounts and client ids."""
    return device_id.lower().startswith(RESERVED_PREFIX)


def reserved_reason(device_id: str) -> str | None:
    """Why ``device_id`` may not be a device (a reserved name), or None."""
    if is_reserved(device_id):
        return (
            f"device id '{device_id}': names starting with '{RESERVED_PREFIX}' are reserved for the control "
            "plane's own broker accounts and client ids"
        )
    return None


def check_device_username(device_id: str) -> None:
    """Refuse a reserved name as a device's broker account."""
    reason = reserved_reason(device_id)
    if reason is not None:
        raise BrokerAuthError(reason)


class BrokerAuth(Protocol):
    """Credentials + ACLs of devices on the broker.

    A device may publish only `edgefleet/v1/devices/{id}/telemetry|state|ack` and subscribe only to its own
    `.../cmd`. The MQTT username of a device is its device id, and so must be its client id.
    """

    def reserved(self, device_id: str) -> str | None:
        """Why ``device_id`` cannot be a device on this broker (the name of one of the control plane's own
        accounts or client ids), or None."""

    def ensure_device(self, device_id: str, password: str) -> None:
        """Create or update the device's broker account (idempotent). A changed password ends the sessions of
        the old one: live connections are closed and the persistent session (subscriptions, queue) dropped."""

    def remove_device(self, device_id: str) -> None:
        """Remove the device's broker account; its live connections are closed and its session dropped."""

    def close(self) -> None:
        """Release connections."""


class NoBrokerAuth:
    """For a broker that does its own authentication (or none, as a development mosquitto)."""

    def reserved(self, device_id: str) -> str | None:
        return reserved_reason(device_id)

    def ensure_device(self, device_id: str, password: str) -> None:
        return None

    def remove_device(self, device_id: str) -> None:
        return None

    def close(self) -> None:
        return None
