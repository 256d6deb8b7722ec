"""Ingest worker: MQTT (shared subscription) -> validate -> batch insert with dedupe -> ack after commit.

QoS 1 messages are acknowledged only after the transaction that stored them committed (paho manual ack), on a
persistent session: a worker that dies before the commit gets the messages again, and (device_id, seq) dedupe
makes the redelivery harmless. Several workers (threads or processes) may share one subscription.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

import msgspec
import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from sqlalchemy import Engine, bindparam, select, update
from sqlalchemy.dialects import postgresql, sqlite
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


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: bytes
    mid: int = 0
    qos: int = 0


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
        try:
            device_id, channel = wire.parse_topic(msg.topic)
        except wire.ProtocolError:
            dead("bad_topic")
            continue
        if channel is wire.Channel.STATE and not msg.payload:
            counts["states"] += 1  # a cleared retained message: nothing to record
            continue
        kind = {wire.Channel.TELEMETRY: wire.Telemetry, wire.Channel.STATE: wire.State, wire.Channel.ACK: wire.Ack}
        if channel not in kind:
            dead("bad_topic")
            continue
        try:
            decoded: Any = wire.decode(msg.payload, kind[channel])
        except wire.ProtocolError as exc:
            dead("unsupported_version" if "protocol_version" in str(exc) else "malformed")
            log.debug("ingest.malformed", topic=msg.topic, error=str(exc))
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
        rows = []
        latest: dict[str, wire.Telemetry] = {}
        for device_id, message, raw in telemetry:
            if device_id not in enrolled:
                dead("unknown_device")
                continue
            rows.append(
                {"device_id": device_id, "seq": message.seq, "ts": message.ts, "received_at": now,
                 "payload": raw.decode()}
            )
            if device_id not in latest or message.seq > latest[device_id].seq:
                latest[device_id] = message
        if rows:
            insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
            stmt = insert(_TELEMETRY).on_conflict_do_nothing(index_elements=["device_id", "seq"])
            if conn.dialect.name == "sqlite":
                stored = conn.execute(stmt, rows).rowcount
            else:  # psycopg reports no rowcount for executemany; RETURNING lists the rows really inserted
                stored = len(conn.execute(stmt.returning(_TELEMETRY.c.id), rows).all())
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
    """One subscriber + one writer thread. `start()` returns once subscribed."""

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
        self._queue: queue.Queue[Message] = queue.Queue()
        self._stop = threading.Event()
        self._subscribed = threading.Event()
        self._writer: threading.Thread | None = None
        self._client: mqtt.Client | None = None
        self.processed = 0
        self.errors = 0
        self._log = log.bind(worker=self.name)

    def _filters(self) -> list[str]:
        filters = [wire.subscription(c) for c in (wire.Channel.TELEMETRY, wire.Channel.STATE, wire.Channel.ACK)]
        return [f"$share/{self.group}/{f}" for f in filters] if self.shared else filters

    def start(self, timeout_s: float = 15.0) -> None:
        client = make_client(
            self.broker, self.name, protocol=self.protocol, manual_ack=True, max_inflight=self.batch_max,
            persistent=True,
        )
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        client.on_subscribe = lambda *a: self._subscribed.set()
        client.reconnect_delay_set(0.2, 2)
        kwargs: dict[str, Any] = {}
        if self.protocol is MqttProtocol.V5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.session_expiry_s
            props.ReceiveMaximum = min(self.batch_max, 65535)
            kwargs = {"clean_start": False, "properties": props}
        self._client = client
        self._writer = threading.Thread(target=self._write_loop, name=f"{self.name}-writer", daemon=True)
        self._writer.start()
        client.connect(self.broker.host, self.broker.port, keepalive=30, **kwargs)
        client.loop_start()
        if not self._subscribed.wait(timeout_s):
            self.stop()
            raise TimeoutError(f"ingest worker could not subscribe on {self.broker.url} within {timeout_s} s")
        self._log.info("ingest.started", broker=self.broker.url, shared=self.shared, protocol=str(self.protocol))

    def stop(self) -> None:
        self._stop.set()
        if self._writer is not None:
            self._writer.join(timeout=10)
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self._log.error("ingest.connect_failed", reason=str(reason))
            return
        client.subscribe([(f, 1) for f in self._filters()])

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self._queue.put(Message(msg.topic, msg.payload, msg.mid, msg.qos))

    def _next_batch(self) -> list[Message]:
        try:
            first = self._queue.get(timeout=0.2)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self.batch_wait_s
        while len(batch) < self.batch_max:
            remaining = deadline - time.monotonic()
            try:
                batch.append(self._queue.get_nowait() if remaining <= 0 else self._queue.get(timeout=remaining))
            except queue.Empty:
                break
        return batch

    def _write_loop(self) -> None:
        delay = 0.5
        batch: list[Message] = []
        while not (self._stop.is_set() and not batch and self._queue.empty()):
            if not batch:
                batch = self._next_batch()
                if not batch:
                    continue
            try:
                process_batch(self.engine, self.known, batch)
            except SQLAlchemyError as exc:
                # Keep the batch and do not ack: the messages stay owed until they are committed.
                self.errors += 1
                self._log.error("ingest.db_error", error=str(exc).splitlines()[0], retry_in_s=delay)
                if self._stop.wait(delay):
                    return  # unacked: the broker delivers them again to the persistent session
                delay = min(delay * 2, 10.0)
                continue
            delay = 0.5
            client = self._client
            for msg in batch:
                if msg.qos and client is not None:
                    with contextlib.suppress(Exception):
                        client.ack(msg.mid, msg.qos)
            self.processed += len(batch)
            batch = []
