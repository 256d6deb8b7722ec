"""HTTP API of the device registry."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Final

import msgspec
from litestar import Controller, Request, Response, delete, get, patch, post
from litestar.di import NamedDependency
from litestar.openapi import ResponseSpec
from litestar.params import FromQuery, JSONBody, Parameter
from litestar.status_codes import HTTP_200_OK, HTTP_202_ACCEPTED, HTTP_204_NO_CONTENT

from controlplane._bounds import NAME_PATTERN, CommandIdParam, NameParam, OffsetParam
from controlplane._errors import InvalidInput
from controlplane._openapi import errors
from controlplane.auth import Role, TokenInfo
from controlplane.auth._guards import requires
from controlplane.devices.schemas import (
    OPERATOR_RESULT_KINDS,
    TAG_PATTERN,
    CommandCreate,
    CommandRead,
    DeviceCreate,
    DeviceEnrolled,
    DeviceRead,
    DeviceUpdate,
    TelemetryRead,
)
from controlplane.devices.service import DeviceService
from controlplane.statuses import CommandStatus

__all__ = ["DeviceController"]

# What `since`/`until` documents: empty (no bound), UNIX seconds, or an ISO 8601 date or time (UTC unless it has an
# offset); days 30 and 31 only in months that have them. 29 February matches in every year: a pattern cannot tell
# leap years, and refusing it always would refuse a real date; in a common year _instant answers 400 naming it.
_DAY = r"(?:(?:0[1-9]|1[0-2])-(?:0[1-9]|1[0-9]|2[0-9])|(?:0[13-9]|1[0-2])-30|(?:0[13578]|1[02])-31)"
INSTANT_PATTERN: Final = (r"^(?:|-?[0-9]{1,12}(?:\.[0-9]{1,9})?"
                   rf"|[12][0-9]{{3}}-{_DAY}(?:T(?:[01][0-9]|2[0-3]):[0-5][0-9](?::[0-5][0-9](?:\.[0-9]{{1,6}})?)?"
                   r"(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])?)?)$")
_INSTANT_RE: Final = re.compile(INSTANT_PATTERN)
# Checked by _instant, not by validation, so that the answer names the parameter and what it expected.
_INSTANT: Final = {"pattern": INSTANT_PATTERN}


def _instant(name: str, value: str | None) -> float | None:
    """UNIX seconds from `1795300000.5` or `2026-11-22T10:00:00Z` (naive ISO times are UTC)."""
    if value is None or value == "":
        return None
    if not _INSTANT_RE.match(value):
        raise InvalidInput(f"{name}={value!r}: expected UNIX seconds or an ISO 8601 time")
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds):
            raise InvalidInput(f"{name}={value!r}: expected a finite number of UNIX seconds")
        return seconds
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise InvalidInput(f"{name}={value!r}: not a date ({exc})") from None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


class DeviceController(Controller):
    path = "/api/v1/devices"
    tags: ClassVar[list[str]] = ["devices"]  # type: ignore[misc]

    @post("/", guards=[requires(Role.ADMIN)], sync_to_thread=True, summary="Enrol a device", responses=errors(409))
    def enroll(self, data: JSONBody[DeviceCreate], device_service: NamedDependency[DeviceService]) -> DeviceEnrolled:
        """Registers the device and returns its broker credentials — once."""
        return device_service.enroll(data)

    @get("/", guards=[requires(Role.VIEWER)], sync_to_thread=True, summary="List devices")
    def list_devices(
        self,
        device_service: NamedDependency[DeviceService],
        profile: Annotated[str | None, Parameter(pattern=NAME_PATTERN, max_length=64)] = None,
        tag: Annotated[str | None, Parameter(pattern=TAG_PATTERN, max_length=64)] = None,
        online: FromQuery[bool | None] = None,
        limit: Annotated[int, Parameter(ge=1, le=5000)] = 500,
        offset: OffsetParam = 0,
    ) -> list[DeviceRead]:
        return device_service.find(profile=profile, tag=tag, online=online, limit=limit, offset=offset)

    @get("/{device_id:str}", guards=[requires(Role.VIEWER)], sync_to_thread=True)
    def get_device(self, device_id: NameParam, device_service: NamedDependency[DeviceService]) -> DeviceRead:
        return device_service.get(device_id)

    @patch("/{device_id:str}", guards=[requires(Role.OPERATOR)], sync_to_thread=True)
    def update_device(self, device_id: NameParam, data: JSONBody[DeviceUpdate],
                      device_service: NamedDependency[DeviceService]) -> DeviceRead:
        return device_service.update(device_id, data)

    @delete("/{device_id:str}", guards=[requires(Role.ADMIN)], sync_to_thread=True,
            status_code=HTTP_204_NO_CONTENT)
    def delete_device(self, device_id: NameParam, device_service: NamedDependency[DeviceService]) -> None:
        device_service.delete(device_id)

    @post("/{device_id:str}/credentials", guards=[requires(Role.ADMIN)], sync_to_thread=True,
          summary="Issue new broker credentials (the old password stops working)")
    def rotate_credentials(self, device_id: NameParam, device_service: NamedDependency[DeviceService]) -> DeviceEnrolled:
        return device_service.rotate_credentials(device_id)

    @get("/{device_id:str}/telemetry", guards=[requires(Role.VIEWER)], sync_to_thread=True)
    def telemetry(
        self,
        device_id: NameParam,
        device_service: NamedDependency[DeviceService],
        since: Annotated[str | None, Parameter(description="device time, inclusive: UNIX seconds or ISO 8601",
                                               max_length=64, schema_extra=_INSTANT)] = None,
        until: Annotated[str | None, Parameter(description="device time, exclusive: UNIX seconds or ISO 8601",
                                               max_length=64, schema_extra=_INSTANT)] = None,
        limit: Annotated[int, Parameter(ge=1, le=10000)] = 100,
    ) -> list[TelemetryRead]:
        """The newest `limit` records in [since, until), oldest first."""
        return device_service.telemetry(device_id, since=_instant("since", since), until=_instant("until", until),
                                 limit=limit)

    @post("/{device_id:str}/commands", guards=[requires(Role.OPERATOR)], sync_to_thread=True,
          status_code=HTTP_200_OK,
          responses={HTTP_202_ACCEPTED: ResponseSpec(CommandRead, description="Sent; no ack within `wait_s`",
                                                     generate_examples=False)})
    def send_command(self, device_id: NameParam, data: JSONBody[CommandCreate],
                     device_service: NamedDependency[DeviceService]) -> Response[CommandRead]:
        """Sends a command and waits up to `wait_s` for the ack: 200 when acked, 202 while still pending."""
        command = device_service.send_command(device_id, data)
        pending = command.status is CommandStatus.PENDING
        return Response(command, status_code=HTTP_202_ACCEPTED if pending else HTTP_200_OK)

    @get("/{device_id:str}/commands/{command_id:str}", guards=[requires(Role.VIEWER)], sync_to_thread=True)
    def get_command(self, request: Request[TokenInfo, Any, Any], device_id: NameParam, command_id: CommandIdParam,
                    device_service: NamedDependency[DeviceService]) -> CommandRead:
        """A command and its ack; a `logs` command's result (the device's log) is shown to operators only."""
        command = device_service.get_command(device_id, command_id)
        if command.kind in OPERATOR_RESULT_KINDS and not request.user.role.allows(Role.OPERATOR):
            return msgspec.structs.replace(command, result=None)
        return command
