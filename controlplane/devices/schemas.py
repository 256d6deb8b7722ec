"""API shapes of the device registry, split by direction."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec

from agent import protocol as wire
from controlplane._bounds import NAME_PATTERN
from controlplane._errors import InvalidInput
from controlplane.statuses import CommandStatus

__all__ = [
    "OPERATOR_RESULT_KINDS",
    "TAG_PATTERN",
    "CommandCreate",
    "CommandRead",
    "DeviceCreate",
    "DeviceEnrolled",
    "DeviceRead",
    "DeviceUpdate",
    "TelemetryRead",
]

DeviceId = Annotated[str, msgspec.Meta(pattern=NAME_PATTERN, max_length=64)]
TAG_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:=-]{0,63}$"
Tag = Annotated[str, msgspec.Meta(pattern=TAG_PATTERN, max_length=64)]
Tags = Annotated[list[Tag], msgspec.Meta(max_length=32)]
ProfileName = Annotated[str, msgspec.Meta(pattern=NAME_PATTERN, max_length=64)]


class DeviceCreate(msgspec.Struct, forbid_unknown_fields=True):
    device_id: DeviceId
    profile: ProfileName
    tags: Tags = msgspec.field(default_factory=list)


class DeviceUpdate(msgspec.Struct, forbid_unknown_fields=True):
    profile: ProfileName | None = None
    tags: Tags | None = None


class DeviceRead(msgspec.Struct):
    device_id: str
    profile: str
    tags: list[str]
    online: bool
    created_at: datetime
    last_seen: datetime | None
    agent_version: str | None
    last_seq: int | None
    reported_state: dict[str, Any] | None
    last_telemetry: dict[str, Any] | None


class DeviceEnrolled(msgspec.Struct):
    """Returned once at enrolment: the password is not stored in clear and cannot be shown again."""

    device_id: str
    profile: str
    tags: list[str]
    mqtt_username: str
    mqtt_password: str
    broker_url: str
    # The control plane's ed25519 model-signing public key (base64): give it to the agent (--signing-key).
    signing_public_key: str = ""


class TelemetryRead(msgspec.Struct):
    device_id: str
    seq: int
    ts: float
    received_at: datetime
    payload: dict[str, Any]


class CommandCreate(msgspec.Struct, forbid_unknown_fields=True):
    kind: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$", max_length=64)]
    # Any JSON object: its size and depth are bounded by the API's body limits (controlplane._http). The kinds
    # whose arguments the control plane knows are checked here too (_check_args), the device checks them again.
    args: Annotated[dict[str, Any], msgspec.Meta(
        description=f"The command's arguments. logs: {{\"lines\": 1..{wire.LOGS_MAX_LINES}}} (default "
                    f"{wire.LOGS_DEFAULT_LINES}); restart: {{}}.")] = msgspec.field(default_factory=dict)
    # How long the request waits for the device's ack; 0 returns at once with status "pending".
    wait_s: Annotated[float, msgspec.Meta(ge=0, le=60)] = 10.0

    def __post_init__(self) -> None:
        # InvalidInput, not ValueError: msgspec would turn a ValueError into its generic "Validation failed" 400;
        # this one reaches the API's error mapping as a 400 whose detail is the reason.
        _check_args(self.kind, self.args)


# Kinds whose ack result only operators may read (GET .../commands/{id} hides it from viewers): a device's log can
# reveal more than a viewer may see.
OPERATOR_RESULT_KINDS: frozenset[str] = frozenset({wire.CommandKind.LOGS})


def _check_args(kind: str, args: dict[str, Any]) -> None:
    """Refuse (:class:`InvalidInput`) arguments that a known command kind would refuse on the device."""
    if kind == wire.CommandKind.LOGS:
        unknown = sorted(set(args) - {"lines"})
        if unknown:
            raise InvalidInput(f"logs takes only 'lines'; unknown argument(s): {', '.join(unknown)}"[:256])
        lines = args.get("lines", wire.LOGS_DEFAULT_LINES)
        if isinstance(lines, bool) or not isinstance(lines, int) or not 1 <= lines <= wire.LOGS_MAX_LINES:
            raise InvalidInput(f"logs: 'lines' must be an integer in 1..{wire.LOGS_MAX_LINES}, got {lines!r}"[:256])
    elif kind == wire.CommandKind.RESTART and args:
        raise InvalidInput(f"restart takes no arguments, got {', '.join(sorted(args))}"[:256])


class CommandRead(msgspec.Struct):
    command_id: str
    device_id: str
    kind: str
    args: dict[str, Any]
    status: CommandStatus
    reason: str | None
    result: dict[str, Any] | None
    created_at: datetime
    acked_at: datetime | None
