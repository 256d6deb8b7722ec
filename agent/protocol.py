"""The wire contract between agents and the control plane (MQTT topics and payloads).

Agents in the field upgrade last, so this module is owned by the agent and the control plane adapts to every
protocol version still deployed. It imports only the standard library and msgspec: importing it must never pull
paho, LiteRT or torch.

Topics (prefix ``edgefleet/v1/devices/{device_id}/``):

========= ============ === ======== ==============================================
topic     direction    QoS retained payload
========= ============ === ======== ==============================================
telemetry device -> cp 1   no       :class:`Telemetry` (per-device monotonic seq)
state     device -> cp 1   yes      :class:`State` (also the Last Will, online=False)
cmd       cp -> device 1   no       :class:`Command`
ack       device -> cp 1   no       :class:`Ack`
========= ============ === ======== ==============================================
"""

from __future__ import annotations

import enum
import re
from typing import Annotated, Any, Final, Literal, TypeVar

import msgspec

__all__ = [
    "MAX_PAYLOAD_BYTES",
    "PROTOCOL_VERSION",
    "SUPPORTED_PROTOCOL_VERSIONS",
    "TOPIC_PREFIX",
    "Ack",
    "Channel",
    "Command",
    "CommandKind",
    "DeviceIdError",
    "InferenceStats",
    "NetworkStats",
    "OutboxStats",
    "PowerStats",
    "ProtocolError",
    "State",
    "SystemStats",
    "Telemetry",
    "decode",
    "encode",
    "parse_topic",
    "subscription",
    "topic",
    "validate_device_id",
]

PROTOCOL_VERSION: Final = 1
SUPPORTED_PROTOCOL_VERSIONS: Final = frozenset({1})
TOPIC_PREFIX: Final = "edgefleet/v1/devices"
# Larger messages are dead-lettered as oversized by the control plane; agents never produce them.
MAX_PAYLOAD_BYTES: Final = 64 * 1024

# Device ids become MQTT topic levels and broker usernames: no wildcards, separators or spaces.
_DEVICE_ID_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ProtocolError(ValueError):
    """A message or topic does not follow the wire contract.

    ProtocolError
    └── DeviceIdError
    """


class DeviceIdError(ProtocolError):
    """A device id that cannot be used as a topic level / broker username."""


class Channel(enum.StrEnum):
    TELEMETRY = "telemetry"
    STATE = "state"
    CMD = "cmd"
    ACK = "ack"


class CommandKind(enum.StrEnum):
    """Commands agents understand; an agent acks any other kind as an error."""

    PING = "ping"
    SET_CONFIG = "set_config"
    DEPLOY_MODEL = "deploy_model"
    JOIN_ROUND = "join_round"


def validate_device_id(device_id: str) -> str:
    if not _DEVICE_ID_RE.fullmatch(device_id):
        raise DeviceIdError(
            f"invalid device id {device_id!r}: 1-64 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return device_id


def topic(device_id: str, channel: Channel | str) -> str:
    """The topic of one device's channel."""
    return f"{TOPIC_PREFIX}/{validate_device_id(device_id)}/{Channel(channel)}"


def subscription(channel: Channel | str, device_id: str = "+") -> str:
    """A subscription filter for a channel of one device or (``+``) of all devices."""
    if device_id != "+":
        validate_device_id(device_id)
    return f"{TOPIC_PREFIX}/{device_id}/{Channel(channel)}"


def parse_topic(name: str) -> tuple[str, Channel]:
    """Split a device topic into (device_id, channel)."""
    parts = name.split("/")
    if len(parts) != 5 or "/".join(parts[:3]) != TOPIC_PREFIX:
        raise ProtocolError(f"not an edgefleet device topic: {name!r}")
    try:
        channel = Channel(parts[4])
    except ValueError:
        raise ProtocolError(f"unknown channel {parts[4]!r} in topic {name!r}") from None
    return validate_device_id(parts[3]), channel


class _Message(msgspec.Struct, kw_only=True, omit_defaults=False):
    protocol_version: int = PROTOCOL_VERSION


class SystemStats(msgspec.Struct, kw_only=True):
    cpu_percent: float
    mem_used_mb: float
    mem_total_mb: float
    disk_used_percent: float
    temperature_c: float | None = None
    load_1m: float | None = None
    uptime_s: float | None = None


class PowerStats(msgspec.Struct, kw_only=True):
    """Power state; ``source`` says where the figures come from (``os`` or ``simulated``)."""

    source: Literal["os", "simulated", "profile"]
    power_source: str
    battery_percent: float | None = None
    charging: bool | None = None


class NetworkStats(msgspec.Struct, kw_only=True):
    source: Literal["os", "simulated", "profile"]
    metered: bool | None = None
    kind: str | None = None
    bytes_sent: int | None = None
    bytes_recv: int | None = None


class InferenceStats(msgspec.Struct, kw_only=True):
    """Inference since the previous telemetry message."""

    model_version: str | None
    count: int
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    mean_confidence: float | None = None
    class_histogram: dict[str, int] = msgspec.field(default_factory=dict)
    errors: int = 0
    # Where the local data carries labels: how many of the labelled inferences were right (on-device accuracy).
    labelled: int = 0
    correct: int = 0


class OutboxStats(msgspec.Struct, kw_only=True):
    pending: int
    pending_bytes: int
    dropped_total: int


class Telemetry(_Message, kw_only=True):
    device_id: str
    seq: Annotated[int, msgspec.Meta(ge=0)]
    ts: float
    system: SystemStats
    power: PowerStats
    network: NetworkStats
    inference: InferenceStats | None = None
    outbox: OutboxStats | None = None


class State(_Message, kw_only=True):
    """Retained presence and reported state. The Last Will is the same message with ``online=False``."""

    device_id: str
    online: bool
    ts: float
    profile: str | None = None
    agent_version: str | None = None
    runtime: str | None = None
    runtime_version: str | None = None
    active_model: str | None = None
    active_variant: str | None = None
    config: dict[str, Any] = msgspec.field(default_factory=dict)


class Command(_Message, kw_only=True):
    command_id: str
    kind: str
    args: dict[str, Any] = msgspec.field(default_factory=dict)
    ts: float = 0.0


class Ack(_Message, kw_only=True):
    device_id: str
    command_id: str
    ok: bool
    reason: str | None = None
    result: dict[str, Any] = msgspec.field(default_factory=dict)
    ts: float = 0.0


_T = TypeVar("_T")
_ENCODER: Final = msgspec.json.Encoder()
_DECODERS: dict[type[Any], msgspec.json.Decoder[Any]] = {}


def encode(message: msgspec.Struct) -> bytes:
    return _ENCODER.encode(message)


def decode(data: bytes, kind: type[_T]) -> _T:
    """Decode and validate one payload.

    Raises
    ------
    ProtocolError
        Malformed JSON, a field of the wrong type or range, or an unsupported protocol version.
    """
    decoder = _DECODERS.get(kind)
    if decoder is None:
        decoder = _DECODERS[kind] = msgspec.json.Decoder(kind)
    try:
        message: _T = decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise ProtocolError(str(exc)) from exc
    version = getattr(message, "protocol_version", PROTOCOL_VERSION)
    if version not in SUPPORTED_PROTOCOL_VERSIONS:
        raise ProtocolError(f"unsupported protocol_version {version}")
    device_id = getattr(message, "device_id", None)
    if device_id is not None:
        validate_device_id(device_id)
    return message
