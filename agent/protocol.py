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

Ranges (checked by msgspec as a payload is decoded, on both sides: see :func:`check`): integers fit in int64
(``seq``, counters and sizes are 0..2**63-1); numbers are finite (JSON has no NaN/Infinity and a literal such as
``1e999`` is refused as out of range; the agent's encoder writes a NaN or infinite float as ``null``); strings hold
no NUL character and are bounded (labels and ids 128 characters, reasons 2048, free-form strings 4096); the
free-form dicts (``State.config``, ``Ack.result``) nest at most 6 containers deep with at most 256 entries each, and
a payload is at most 64 KiB. A payload outside these is refused as a whole: the control plane dead-letters it, the
agent never sends it.
"""

from __future__ import annotations

import enum
import re
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal, TypeAlias, TypeVar

import msgspec

__all__ = [
    "INT64_MAX",
    "LOGS_DEFAULT_LINES",
    "LOGS_MAX_LINES",
    "MAX_FREEFORM_DEPTH",
    "MAX_PAYLOAD_BYTES",
    "PROTOCOL_VERSION",
    "SUPPORTED_PROTOCOL_VERSIONS",
    "TOPIC_PREFIX",
    "UPSTREAM_CHANNELS",
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
    "check",
    "decode",
    "encode",
    "has_nul",
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

# The `logs` command's "lines" argument (both sides check it): an Ack result's lists hold at most 256 entries.
LOGS_DEFAULT_LINES: Final = 100
LOGS_MAX_LINES: Final = 200

INT64_MAX: Final = 2**63 - 1
MAX_FREEFORM_DEPTH: Final = 6

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
    # Signing-key rotation (agent.manifest.KeyTransition / KeyRetirement): args {"statement": <signed statement>};
    # the ack's result lists the key ids the device trusts afterwards ("trusted_key_ids").
    TRUST_SIGNING_KEY = "trust_signing_key"
    RETIRE_SIGNING_KEY = "retire_signing_key"
    # Fleet CA renewal (agent.trust): args {"statement": <agent.trust.SignedCaBundle>} — the CAs the broker and
    # the control plane are verified against from now on, signed by a trusted model-signing key; the ack's result
    # names the bundle the device holds ("ca_bundle", "ca_fingerprints").
    TRUST_CA = "trust_ca"
    # args {"renewal": N}: make a new client key (kept beside the one in use) and answer with a CSR for it in the
    # ack's result ("csr"; "client_certificate": false on a device without one).
    RENEW_CERTIFICATE = "renew_certificate"
    # args {"renewal": N, "certificate": PEM}: the certificate for that CSR's key, issued by a CA of the device's
    # CA file; written with its key atomically, used from the next connection.
    INSTALL_CERTIFICATE = "install_certificate"
    # args {"lines": 1..200, default 100}: the agent's newest log entries, redacted (agent._logring); result
    # {"lines": [oldest, ..., newest], "requested", "available", "truncated", "dropped"}: "truncated" when the
    # payload bound left out older entries that were asked for.
    LOGS = "logs"
    # args {}: the agent acks, stops cleanly and comes back (exits 75 for systemd, or re-executes itself:
    # agent._restart); result {"restarting": true, "mode": "exit" | "exec", "pid", "uptime_s"}. Refused when the
    # command is more than 60 s old or the last restart was less than 15 s ago; a redelivered restart is answered
    # with its first ack and not executed again.
    RESTART = "restart"


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


# -- ranges (msgspec checks them while it decodes: no Python code per record) ----------------------------------
# A NUL in any string (keys too) is refused by `check` with a byte search, not per field: a regex per string
# would cost more than the rest of decoding.
Count = Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)]
Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=INT64_MAX)]
DeviceIdField = Annotated[str, msgspec.Meta(max_length=64)]  # and the device id pattern, checked by `decode`
CommandId = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Label = Annotated[str, msgspec.Meta(max_length=128)]
Reason = Annotated[str, msgspec.Meta(max_length=2048)]
_FreeText = Annotated[str, msgspec.Meta(max_length=4096)]
_Scalar = _FreeText | Int64 | float | bool | None


def _free_form(depth: int) -> Any:
    """JSON values nested at most `depth` containers deep, 256 entries each (a typed bound: msgspec stops at the
    first level too deep instead of recursing)."""
    value: Any = _Scalar
    for _ in range(depth - 1):
        value = (_Scalar | Annotated[list[value], msgspec.Meta(max_length=256)]
                 | Annotated[dict[Label, value], msgspec.Meta(max_length=256)])
    return Annotated[dict[Label, value], msgspec.Meta(max_length=256)]


if TYPE_CHECKING:
    FreeForm: TypeAlias = dict[str, Any]
else:
    FreeForm = _free_form(MAX_FREEFORM_DEPTH)


class _Message(msgspec.Struct, kw_only=True, omit_defaults=False):
    protocol_version: Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)] = PROTOCOL_VERSION


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
    power_source: Label
    battery_percent: float | None = None
    charging: bool | None = None


class NetworkStats(msgspec.Struct, kw_only=True):
    source: Literal["os", "simulated", "profile"]
    metered: bool | None = None
    kind: Label | None = None
    bytes_sent: Count | None = None
    bytes_recv: Count | None = None


class InferenceStats(msgspec.Struct, kw_only=True):
    """Inference since the previous telemetry message."""

    model_version: Label | None
    count: Count
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    mean_confidence: float | None = None
    class_histogram: Annotated[dict[Label, Count], msgspec.Meta(max_length=1024)] = msgspec.field(
        default_factory=dict
    )
    errors: Count = 0
    # Where the local data carries labels: how many of the labelled inferences were right (on-device accuracy).
    labelled: Count = 0
    correct: Count = 0


class OutboxStats(msgspec.Struct, kw_only=True):
    pending: Count
    pending_bytes: Count
    dropped_total: Count
    # Messages the agent refused to queue because they broke this contract (`Outbox.rejected`).
    rejected_total: Count = 0


class Telemetry(_Message, kw_only=True):
    device_id: DeviceIdField
    seq: Count
    ts: float
    system: SystemStats
    power: PowerStats
    network: NetworkStats
    inference: InferenceStats | None = None
    outbox: OutboxStats | None = None


class State(_Message, kw_only=True):
    """Retained presence and reported state. The Last Will is the same message with ``online=False``."""

    device_id: DeviceIdField
    online: bool
    ts: float
    profile: Label | None = None
    agent_version: Label | None = None
    runtime: Label | None = None
    runtime_version: Label | None = None
    active_model: Label | None = None
    active_variant: Label | None = None
    config: FreeForm = msgspec.field(default_factory=dict)


class Command(_Message, kw_only=True):
    command_id: str
    kind: str
    args: dict[str, Any] = msgspec.field(default_factory=dict)
    ts: float = 0.0


class Ack(_Message, kw_only=True):
    device_id: DeviceIdField
    command_id: CommandId
    ok: bool
    reason: Reason | None = None
    result: FreeForm = msgspec.field(default_factory=dict)
    ts: float = 0.0


_T = TypeVar("_T")
_ENCODER: Final = msgspec.json.Encoder()
_DECODERS: dict[type[Any], msgspec.json.Decoder[Any]] = {}
# The device -> control plane channels and their payload types.
UPSTREAM_CHANNELS: Final[dict[Channel, type[Telemetry | State | Ack]]] = {
    Channel.TELEMETRY: Telemetry,
    Channel.STATE: State,
    Channel.ACK: Ack,
}


def encode(message: msgspec.Struct) -> bytes:
    """JSON bytes of a message; a NaN or infinite float becomes ``null``.

    An :class:`Ack` whose ``reason`` or ``result`` breaks the contract (say, a result nested too deep) is sent as
    an error ack that says so, instead of an ack the control plane would have to drop.
    """
    data = _ENCODER.encode(message)
    if isinstance(message, Ack):
        try:
            check(data, Channel.ACK)
        except ProtocolError as exc:
            reason = f"the command's result could not be sent: {exc}"
            data = _ENCODER.encode(Ack(device_id=message.device_id, command_id=message.command_id, ok=False,
                                       reason=reason[:2048].replace("\x00", ""), ts=message.ts))
    return data


def decode(data: bytes, kind: type[_T]) -> _T:
    """Decode and validate one payload.

    Raises
    ------
    ProtocolError
        Malformed JSON or UTF-8, a field of the wrong type or range, or an unsupported protocol version.
    """
    decoder = _DECODERS.get(kind)
    if decoder is None:
        decoder = _DECODERS[kind] = msgspec.json.Decoder(kind)
    try:
        message: _T = decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise ProtocolError(str(exc)) from exc
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"invalid UTF-8: {exc}") from exc
    except RecursionError:
        raise ProtocolError("JSON nested too deep") from None
    if has_nul(data):
        raise ProtocolError("a string holds a NUL character (\\u0000)")
    version = getattr(message, "protocol_version", PROTOCOL_VERSION)
    if version not in SUPPORTED_PROTOCOL_VERSIONS:
        raise ProtocolError(f"unsupported protocol_version {version}")
    device_id = getattr(message, "device_id", None)
    if device_id is not None:
        validate_device_id(device_id)
    return message


def has_nul(data: bytes) -> bool:
    """Whether a string of this (valid) JSON holds a NUL character. A byte search first: on the honest path that
    is all it costs; only a payload that contains the escape is decoded again to rule out an escaped backslash."""
    if b"\\u0000" not in data:
        return False
    try:
        return _nul_in(msgspec.json.decode(data))
    except RecursionError:
        return True  # deeper than Python recursion allows: refuse rather than guess


def _nul_in(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any("\x00" in k or _nul_in(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_nul_in(v) for v in value)
    return False


def check(data: bytes, channel: Channel) -> Telemetry | State | Ack:
    """Check one device -> control plane payload against the contract (both sides use this one definition).

    Raises
    ------
    ProtocolError
        The payload is larger than :data:`MAX_PAYLOAD_BYTES` or :func:`decode` refuses it.
    """
    if len(data) > MAX_PAYLOAD_BYTES:
        raise ProtocolError(f"payload of {len(data)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    try:
        kind = UPSTREAM_CHANNELS[channel]
    except KeyError:
        raise ProtocolError(f"{channel} is not a device -> control plane channel") from None
    return decode(data, kind)
