"""Ingest worker: MQTT (shared subscription) -> validate -> batch insert with dedupe -> ack after commit.

QoS 1 messages are acknowledged only after the transaction that stored them committed (paho manual ack), on a
persistent session: a worker that dies before the commit gets the messages again, and (device_id, seq) dedupe
makes the redelivery harmless. Several workers (threads or processes) may share one subscription.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgspec
import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from sqlalchemy import Engine, bindparam, select, update
from sqlalchemy.exc import SQLAlchemyError

from agent import protocol as wire
from agent._mqtt import BrokerAddress, MqttProtocol, make_client
from controlplane.db import CommandRecord, Device, TelemetryRecord, utcnow
from controlplane.ingest._stats import DEAD_LETTER_PREFIX, add_counts

__all__ = ["IngestWorker", "Message", "process_batch"]

log = structlog.get_logger("edgefleet.ingest")

SHARE_GROUP = "edgefleet-ingest"
_TELEMETRY = TelemetryRecord.__table__  # type: ignore[attr-defined]
_DEVICE = Device.__table__  # type: ignore[attr-defined]
_COMMAND = CommandRecord.__table__  # type: ignore[attr-defined]
_INSERT_SQLITE = (
    "INSERT INTO telemetry (device_id, seq, ts, received_at, payload) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (device_id, seq) DO NOTHING"
)


def _copy_insert_pg(conn: Any, rows: list[tuple[str, int, float, Any, str]]) -> int:
    """COPY the batch into a per-session staging table, then one INSERT .. ON CONFLICT DO NOTHING.

    psycopg's executemany sends one statement per row; COPY streams the batch and the server inserts it in one go.
    """
    cursor = conn.connection.driver_connection.cursor()
    cursor.execute(
        "CREATE TEMP TABLE IF NOT EXISTS telemetry_in (device_id varchar(64), seq bigint, ts float8, "
        "received_at timestamptz, payload text) ON COMMIT DELETE ROWS"
    )
    with cursor.copy("COPY telemetry_in (device_id, seq, ts, received_at, payload) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)
    cursor.execute(
        "INSERT INTO telemetry (device_id, seq, ts, received_at, payload) "
        "SELECT device_id, seq, ts, received_at, payload FROM telemetry_in ON CONFLICT (device_id, seq) DO NOTHING"
    )
    return int(cursor.rowcount)


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: bytes
    mid: int = 0
    qos: int = 0


# The hot path decodes with msgspec directly (what `wire.decode` does, minus its per-call lookups).
_DECODERS: dict[wire.Channel, msgspec.json.Decoder[Any]] = {
    wire.Channel.TELEMETRY: msgspec.json.Decoder(wire.Telemetry),
    wire.Channel.STATE: msgspec.json.Decoder(wire.State),
    wire.Channel.ACK: msgspec.json.Decoder(wire.Ack),
}
_ROUTES: dict[str, tuple[str, wire.Channel] | None] = {}


def _route(topic: str) -> tuple[str, wire.Channel] | None:
    """(device_id, channel) of a device→cp topic, None for any other; memoised (a fleet has few topics)."""
    try:
        return _ROUTES[topic]
    except KeyError:
        pass
    try:
        route: tuple[str, wire.Channel] | None = wire.parse_topic(topic)
    except wire.ProtocolError:
        route = None
    if route is not None and route[1] not in _DECODERS:
        route = None
    if len(_ROUTES) >= 100_000:
        _ROUTES.clear()
    _ROUTES[topic] = route
    return route


class _KnownDevices:
    """Which device ids are enrolled; positive answers are cached for a while."""

    def __init__(self, engine: Engine, ttl_s: float = 30.0) -> None:
        self._engine = engine
        self._ttl = ttl_s
        self._known: dict[str, float] = {}

    def filter(self, conn: Any, ids: set[str]) -> set[str]:
        now = time.monotonic()
        missing = {i for i in ids if self._known.get(i, 0.0) < now}
        if missing:
            found = conn.execute(select(_DEVICE.c.device_id).where(_DEVICE.c.device_id.in_(missing))).scalars()
            for device_id in found:
                self._known[device_id] = now + self._ttl
        return {i for i in ids if self._known.get(i, 0.0) >= now}

    def forget(self, device_id: str) -> None:
        self._known.pop(device_id, None)


def process_batch(engine: Engine, known: _KnownDevices, batch: list[Message]) -> Counter[str]:
    """Validate and store one batch in one transaction; returns the counts it added."""
    counts: Counter[str] = Counter(received=len(batch))
    telemetry: list[tuple[str, wire.Telemetry, bytes]] = []
    states: list[wire.State] = []
    acks: list[wire.Ack] = []

    def dead(reason: str) -> None:
        counts[DEAD_LETTER_PREFIX + reason] += 1

    for msg in batch:
        if len(msg.payload) > wire.MAX_PAYLOAD_BYTES:
            dead("oversized")
            continue
        route = _route(msg.topic)
        if route is None:
            dead("bad_topic")
            continue
        device_id, channel = route
        if channel is wire.Channel.STATE and not msg.payload:
            counts["states"] += 1  # a cleared retained message: nothing to record
            continue
        try:
            decoded: Any = _DECODERS[channel].decode(msg.payload)
        except msgspec.DecodeError as exc:
            dead("malformed")
            log.debug("ingest.malformed", topic=msg.topic, error=str(exc))
            continue
        if decoded.protocol_version not in wire.SUPPORTED_PROTOCOL_VERSIONS:
            dead("unsupported_version")
            continue
        if decoded.device_id != device_id:
            dead("device_mismatch")
            continue
        if channel is wire.Channel.TELEMETRY:
            telemetry.append((device_id, decoded, msg.payload))
        elif channel is wire.Channel.STATE:
            states.append(decoded)
        else:
            acks.append(decoded)

    now = utcnow()
    with engine.begin() as conn:
        ids = {d for d, _, _ in telemetry} | {s.device_id for s in states} | {a.device_id for a in acks}
        enrolled = known.filter(conn, ids) if ids else set()
        # SQLite stores what SQLAlchemy's DateTime would: the UTC time as text.
        received_at: Any = now.strftime("%Y-%m-%d %H:%M:%S.%f") if conn.dialect.name == "sqlite" else now
        rows: list[tuple[str, int, float, Any, str]] = []
        latest: dict[str, wire.Telemetry] = {}
        for device_id, message, raw in telemetry:
            if device_id not in enrolled:
                dead("unknown_device")
                continue
            rows.append((device_id, message.seq, message.ts, received_at, raw.decode()))
            if device_id not in latest or message.seq > latest[device_id].seq:
                latest[device_id] = message
        if rows:
            # Plain DB-API statements, not a compiled SQLAlchemy insert: the hot path of ingest. The rowcount is
            # the rows really inserted (conflicts excluded).
            if conn.dialect.name == "postgresql":
                stored = _copy_insert_pg(conn, rows)
            else:
                stored = conn.exec_driver_sql(_INSERT_SQLITE, rows).rowcount
            counts["stored"] += stored
            counts["duplicates"] += len(rows) - stored
        if latest:
            conn.execute(
                update(_DEVICE)
                .where(_DEVICE.c.device_id == bindparam("b_id"))
                .where((_DEVICE.c.last_seq.is_(None)) | (_DEVICE.c.last_seq < bindparam("b_seq")))
                .values(last_seen=now, last_seq=bindparam("b_seq"), last_telemetry=bindparam("b_payload")),
                [{"b_id": d, "b_seq": m.seq, "b_payload": msgspec.to_builtins(m)} for d, m in latest.items()],
            )
        for state in states:
            if state.device_id not in enrolled:
                dead("unknown_device")
                continue
            counts["states"] += 1
            conn.execute(
                update(_DEVICE)
                .where(_DEVICE.c.device_id == state.device_id)
                .values(
                    online=state.online, last_seen=now, agent_version=state.agent_version,
                    reported_state=msgspec.to_builtins(state),
                )
            )
        for ack in acks:
            if ack.device_id not in enrolled:
                dead("unknown_device")
                continue
            result = conn.execute(
                update(_COMMAND)
                .where(_COMMAND.c.command_id == ack.command_id, _COMMAND.c.device_id == ack.device_id)
                .values(status="ok" if ack.ok else "error", reason=ack.reason, result=ack.result, acked_at=now)
            )
            if result.rowcount:
                counts["acks"] += 1
            else:
                dead("unknown_command")
        add_counts(conn, counts)
    return counts


class IngestWorker:
    """One MQTT connection and one thread that reads, batches, commits and then acks.

    Reading, writing and acking on one thread (paho driven with `loop()`) avoids handing every message and every
    ack across threads: on a busy 2-core machine those hand-offs cost more than the database insert. While a
    batch commits, the socket is not read; TCP and the broker's in-flight window (Receive Maximum) hold the rest.
    """

    def __init__(
        self,
        engine: Engine,
        broker: BrokerAddress,
        *,
        name: str | None = None,
        shared: bool = True,
        group: str = SHARE_GROUP,
        session_expiry_s: int = 3600,
        protocol: MqttProtocol = MqttProtocol.V5,
        batch_max: int = 1000,
        batch_wait_s: float = 0.02,
    ) -> None:
        self.engine = engine
        self.broker = broker
        self.name = name or f"edgefleet-ingest-{uuid.uuid4().hex[:8]}"
        self.shared = shared
        self.group = group
        self.session_expiry_s = session_expiry_s
        self.protocol = MqttProtocol.V5 if protocol is MqttProtocol.AUTO else protocol
        self.batch_max = batch_max
        self.batch_wait_s = batch_wait_s
        self.known = _KnownDevices(engine)
        self._pending: list[Message] = []
        self._first_pending_at = 0.0
        self._stop = threading.Event()
        self._subscribed = threading.Event()
        self._connected = False
        self._thread: threading.Thread | None = None
        self._client: mqtt.Client | None = None
        self._connect_kwargs: dict[str, Any] = {}
        self.processed = 0
        self.errors = 0
        self._log = log.bind(worker=self.name)

    def _filters(self) -> list[str]:
        filters = [wire.subscription(c) for c in (wire.Channel.TELEMETRY, wire.Channel.STATE, wire.Channel.ACK)]
        return [f"$share/{self.group}/{f}" for f in filters] if self.shared else filters

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout_s: float = 15.0) -> None:
        client = make_client(
            self.broker, self.name, protocol=self.protocol, manual_ack=True, max_inflight=self.batch_max,
            persistent=True,
        )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = lambda *a: self._subscribed.set()
        if self.protocol is MqttProtocol.V5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = self.session_expiry_s
            # Room for the broker to keep sending while a batch commits (the broker may cap it lower).
            props.ReceiveMaximum = min(self.batch_max * 4, 65535)
            self._connect_kwargs = {"clean_start": False, "properties": props}
        self._client = client
        client.connect(self.broker.host, self.broker.port, keepalive=30, **self._connect_kwargs)
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        if not self._subscribed.wait(timeout_s):
            self.stop()
            raise TimeoutError(f"ingest worker could not subscribe on {self.broker.url} within {timeout_s} s")
        self._log.info("ingest.started", broker=self.broker.url, shared=self.shared, protocol=str(self.protocol))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)
        if self._client is not None:
            self._client.disconnect()

    # -- paho callbacks (run inside loop(), on this worker's thread) --------------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self._log.error("ingest.connect_failed", reason=str(reason))
            return
        self._connected = True
        client.subscribe([(f, 1) for f in self._filters()])

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self._connected = False

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if not self._pending:
            self._first_pending_at = time.monotonic()
        self._pending.append(Message(msg.topic, bytes(msg.payload), msg.mid, msg.qos))

    # -- the loop --------------------------------------------------------------------------------------------
    def _run(self) -> None:
        client = self._client
        assert client is not None
        reconnect_delay = 0.2
        while not self._stop.is_set():
            if not self._connected and client.socket() is None:
                try:
                    client.reconnect()
                    reconnect_delay = 0.2
                except OSError as exc:
                    self._log.warning("ingest.reconnect_failed", error=str(exc), retry_in_s=reconnect_delay)
                    self._stop.wait(reconnect_delay)
                    reconnect_delay = min(reconnect_delay * 2, 2.0)
                    continue
            wait = 0.2
            if self._pending:
                wait = max(0.0, self._first_pending_at + self.batch_wait_s - time.monotonic())
            rc = client.loop(timeout=wait)
            if rc != mqtt.MQTT_ERR_SUCCESS:
                self._connected = False
            if self._pending and (
                len(self._pending) >= self.batch_max
                or time.monotonic() - self._first_pending_at >= self.batch_wait_s
                or not self._connected
            ):
                self._flush(client)
        if self._pending:
            self._flush(client)

    def _flush(self, client: mqtt.Client) -> None:
        batch, self._pending = self._pending, []
        delay = 0.5
        while True:
            try:
                process_batch(self.engine, self.known, batch)
                break
            except SQLAlchemyError as exc:
                # Keep the batch and do not ack: the messages stay owed until they are committed.
                self.errors += 1
                self._log.error("ingest.db_error", error=str(exc).splitlines()[0], retry_in_s=delay)
                if self._stop.wait(delay):
                    return  # unacked: the broker delivers them again to the persistent session
                delay = min(delay * 2, 10.0)
                client.loop(timeout=0)  # keep the connection alive (PINGREQ) while the database is away
        self.processed += len(batch)
        if not self._connected:
            return  # the acks cannot be sent; the broker redelivers and (device_id, seq) dedupes
        with _batched_writes(client):
            for msg in batch:
                if msg.qos:
                    client.ack(msg.mid, msg.qos)


@contextlib.contextmanager
def _batched_writes(client: mqtt.Client) -> Iterator[None]:
    """Queue PUBACKs and write them once at the end instead of one socket write + one wake-up per ack.

    Only valid with no paho network thread (this worker drives `loop()` itself). Uses two paho 2.x internals:
    `_in_callback_mutex` (held, paho defers `loop_write()`) and `_sockpairW` (unset, no self-wake byte).
    """
    mutex = getattr(client, "_in_callback_mutex", None)
    if mutex is None or not hasattr(client, "_sockpairW") or not mutex.acquire(blocking=False):
        yield  # another paho version: plain, slower acks
        return
    wake, client._sockpairW = client._sockpairW, None
    try:
        yield
    finally:
        client._sockpairW = wake
        mutex.release()
    client.loop_write()
