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
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from agent import protocol as wire
from agent.mqtt import BrokerAddress, MqttProtocol, make_client
from controlplane.db import CommandRecord, Device, TelemetryRecord, utcnow
from controlplane.ingest.lag import IngestLag
from controlplane.ingest.stats import DEAD_LETTER_PREFIX, add_counts
from controlplane.statuses import CommandStatus

__all__ = ["IngestWorker", "Message", "process_batch", "transient"]

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
    received_at: float = 0.0  # wall-clock time the worker read it from the broker (0: unknown)


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


@dataclass(slots=True)
class _Parsed:
    """The records of one batch that passed the contract, and what the parse added to the counts."""

    counts: Counter[str]
    telemetry: list[tuple[str, wire.Telemetry, str]]
    states: list[wire.State]
    acks: list[wire.Ack]


def _parse(batch: list[Message]) -> _Parsed:
    """Check every message against the wire contract; whatever breaks it becomes a dead letter, never an error."""
    parsed = _Parsed(Counter(received=len(batch)), [], [], [])
    counts = parsed.counts
    for msg in batch:
        try:
            if len(msg.payload) > wire.MAX_PAYLOAD_BYTES:
                counts[DEAD_LETTER_PREFIX + "oversized"] += 1
                continue
            route = _route(msg.topic)
            if route is None:
                counts[DEAD_LETTER_PREFIX + "bad_topic"] += 1
                continue
            device_id, channel = route
            if channel is wire.Channel.STATE and not msg.payload:
                counts["states"] += 1  # a cleared retained message: nothing to record
                continue
            try:
                decoded: Any = _DECODERS[channel].decode(msg.payload)
                text = msg.payload.decode() if channel is wire.Channel.TELEMETRY else ""
            except msgspec.ValidationError as exc:  # JSON, but outside the contract (type, range, length, depth)
                _dead_letter(counts, "invalid", msg, str(exc))
                continue
            except (msgspec.DecodeError, UnicodeDecodeError) as exc:
                _dead_letter(counts, "malformed", msg, str(exc))
                continue
            except RecursionError:  # an unknown field nested deeper than msgspec recurses
                _dead_letter(counts, "invalid", msg, "JSON nested too deep")
                continue
            if b"\\u0000" in msg.payload and wire.has_nul(msg.payload):  # the byte search inline: hot path
                _dead_letter(counts, "invalid", msg, "a string holds a NUL character")
                continue
            if decoded.protocol_version not in wire.SUPPORTED_PROTOCOL_VERSIONS:
                counts[DEAD_LETTER_PREFIX + "unsupported_version"] += 1
                continue
            if decoded.device_id != device_id:
                counts[DEAD_LETTER_PREFIX + "device_mismatch"] += 1
                continue
            if channel is wire.Channel.TELEMETRY:
                parsed.telemetry.append((device_id, decoded, text))
            elif channel is wire.Channel.STATE:
                parsed.states.append(decoded)
            else:
                parsed.acks.append(decoded)
        except Exception:
            counts[DEAD_LETTER_PREFIX + "error"] += 1
            log.exception("ingest.record_failed", topic=msg.topic, size=len(msg.payload))
    return parsed


def _dead_letter(counts: Counter[str], reason: str, msg: Message, error: str) -> None:
    counts[DEAD_LETTER_PREFIX + reason] += 1
    log.debug("ingest.dead_letter", reason=reason, topic=msg.topic, error=error)


def transient(exc: BaseException) -> bool:
    """Whether a database error says the database is unavailable (retry the batch) rather than that it refuses
    this data (isolate the record). PostgreSQL's data (22), constraint (23) and limit (54: e.g. stack depth)
    errors refuse data even where the driver files them as operational."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, OperationalError | InterfaceError | PoolTimeout | DisconnectionError):
        sqlstate = getattr(getattr(exc, "orig", None), "sqlstate", None) or ""
        return sqlstate[:2] not in ("22", "23", "54")
    return False


def process_batch(engine: Engine, known: _KnownDevices, batch: list[Message]) -> Counter[str]:
    """Check and store one batch in one transaction; returns the counts it added.

    A record the database refuses (or that fails in any other way while it is stored) does not fail the batch: the
    batch is stored again record by record (each in a savepoint on PostgreSQL) and that record becomes a
    `db_rejected` dead letter. Only an unavailable database fails the batch (the caller retries it unacked).
    """
    parsed = _parse(batch)
    try:
        return _store(engine, known, parsed, isolate=False)
    except Exception as exc:
        if transient(exc):
            raise
        log.warning("ingest.batch_rejected", error=_first_line(exc), error_type=type(exc).__name__,
                    size=len(batch))
    return _store(engine, known, parsed, isolate=True)


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc) or type(exc).__name__
    return text.splitlines()[0][:500]


_UPDATE_LATEST = (
    update(_DEVICE)
    .where(_DEVICE.c.device_id == bindparam("b_id"))
    .where((_DEVICE.c.last_seq.is_(None)) | (_DEVICE.c.last_seq < bindparam("b_seq")))
    .values(last_seen=bindparam("b_now"), last_seq=bindparam("b_seq"), last_telemetry=bindparam("b_payload"))
)


def _store(engine: Engine, known: _KnownDevices, parsed: _Parsed, *, isolate: bool) -> Counter[str]:
    counts = Counter(parsed.counts)
    now = utcnow()
    with engine.begin() as conn:
        ids = {d for d, _, _ in parsed.telemetry} | {s.device_id for s in parsed.states}
        ids |= {a.device_id for a in parsed.acks}
        enrolled = known.filter(conn, ids) if ids else set()
        guard = _Guard(conn, counts) if isolate else None
        # SQLite stores what SQLAlchemy's DateTime would: the UTC time as text.
        received_at: Any = now.strftime("%Y-%m-%d %H:%M:%S.%f") if conn.dialect.name == "sqlite" else now
        rows: list[tuple[str, int, float, Any, str]] = []
        latest: dict[str, wire.Telemetry] = {}
        for device_id, message, text in parsed.telemetry:
            if device_id not in enrolled:
                counts[DEAD_LETTER_PREFIX + "unknown_device"] += 1
                continue
            row = (device_id, message.seq, message.ts, received_at, text)
            if guard is not None:
                inserted = guard.run(device_id, "telemetry", _insert_one, conn, row)
                if inserted is None:
                    continue
                counts["stored" if inserted else "duplicates"] += 1
            else:
                rows.append(row)
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
            presence = [{"b_id": d, "b_seq": m.seq, "b_now": now, "b_payload": msgspec.to_builtins(m)}
                        for d, m in latest.items()]
            if guard is None:
                conn.execute(_UPDATE_LATEST, presence)
            else:
                for params in presence:  # the records are stored: a refused presence update is logged, not counted
                    guard.run(params["b_id"], "presence", conn.execute, _UPDATE_LATEST, params, count=False)
        for state in parsed.states:
            if state.device_id not in enrolled:
                counts[DEAD_LETTER_PREFIX + "unknown_device"] += 1
                continue
            statement = (
                update(_DEVICE)
                .where(_DEVICE.c.device_id == state.device_id)
                .values(
                    online=state.online, last_seen=now, agent_version=state.agent_version,
                    reported_state=msgspec.to_builtins(state),
                )
            )
            if guard is None:
                conn.execute(statement)
            elif guard.run(state.device_id, "state", conn.execute, statement) is None:
                continue
            counts["states"] += 1
        for ack in parsed.acks:
            if ack.device_id not in enrolled:
                counts[DEAD_LETTER_PREFIX + "unknown_device"] += 1
                continue
            statement = (
                update(_COMMAND)
                .where(_COMMAND.c.command_id == ack.command_id, _COMMAND.c.device_id == ack.device_id)
                .values(status=CommandStatus.OK if ack.ok else CommandStatus.ERROR, reason=ack.reason, result=ack.result, acked_at=now)
            )
            result: Any
            if guard is None:
                result = conn.execute(statement)
            else:
                result = guard.run(ack.device_id, "ack", conn.execute, statement)
            if result is None:
                continue
            if result.rowcount:
                counts["acks"] += 1
            else:
                counts[DEAD_LETTER_PREFIX + "unknown_command"] += 1
        add_counts(conn, counts)
    return counts


def _insert_one(conn: Any, row: tuple[str, int, float, Any, str]) -> bool:
    """Insert one telemetry row; True if stored, False if a duplicate."""
    sql = _INSERT_SQLITE if conn.dialect.name == "sqlite" else _INSERT_SQLITE.replace("?", "%s")
    return bool(conn.exec_driver_sql(sql, row).rowcount)


class _Guard:
    """Run one record's statements so that a refusal costs only that record (the isolating pass).

    PostgreSQL aborts the whole transaction on an error, so each record gets a savepoint; SQLite undoes only the
    failed statement and each record here is one statement. A transient error (database gone) still propagates:
    the batch is then retried as a whole.
    """

    def __init__(self, conn: Any, counts: Counter[str]) -> None:
        self._conn = conn
        self._counts = counts
        self._savepoints = conn.dialect.name != "sqlite"

    def run(self, device_id: str, what: str, fn: Any, *args: Any, count: bool = True) -> Any:
        """`fn(*args)`, or None if it failed (then a `db_rejected` dead letter when `count`)."""
        try:
            if not self._savepoints:
                return fn(*args)
            with self._conn.begin_nested():
                return fn(*args)
        except Exception as exc:
            if transient(exc):
                raise
            if count:
                self._counts[DEAD_LETTER_PREFIX + "db_rejected"] += 1
            log.warning("ingest.db_rejected", device_id=device_id, record=what, error_type=type(exc).__name__,
                        error=_first_line(exc))
            return None


class IngestWorker:
    """One MQTT connection and one thread that reads, batches, commits and then acks.

    Reading, writing and acking on one thread (paho driven with `loop()`) avoids handing every message and every
    ack across threads: on a busy 2-core machine those hand-offs cost more than the database insert. While a
    batch commits, the socket is not read; TCP and the broker's in-flight window (Receive Maximum) hold the rest.

    The loop is supervised: an unexpected exception anywhere in it is logged (with its traceback, once per new
    error), counted in `restarts`, and the loop starts again on a fresh connection, so the broker redelivers
    whatever was not acked. `health()` and `status()` say what state the worker is in.
    """

    def __init__(
        self,
        engine: Engine,
        broker: BrokerAddress,
        *,
        name: str | None = None,
        client_id: str | None = None,
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
        # The MQTT client id; it may carry a secret (so no device can take over ingest's session): never shown in
        # health, stats or logs, which use `name`.
        self.client_id = client_id or self.name
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
        self.errors = 0  # database errors (each retried)
        self.restarts = 0  # loop restarts after an unexpected error
        self.last_error: str | None = None
        self.last_error_at: float | None = None  # wall-clock time
        self.lag = IngestLag()  # read by controlplane.metrics
        self._state = "starting"  # starting | running | reconnecting | db_unavailable | restarting | stopped | dead
        self._trouble_since: float | None = None  # monotonic time the current non-running state began
        self._restarted_at = 0.0
        self._log = log.bind(worker=self.name)

    def _filters(self) -> list[str]:
        filters = [wire.subscription(c) for c in (wire.Channel.TELEMETRY, wire.Channel.STATE, wire.Channel.ACK)]
        return [f"$share/{self.group}/{f}" for f in filters] if self.shared else filters

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def connected(self) -> bool:
        return self._connected

    def _set_state(self, state: str) -> None:
        if state == self._state:
            return
        self._state = state
        self._trouble_since = None if state == "running" else time.monotonic()

    def _record_error(self, error: str) -> None:
        self.last_error = error
        self.last_error_at = time.time()

    def status(self) -> dict[str, Any]:
        """What `GET /api/v1/ingest/stats` shows for this worker."""
        return {
            "name": self.name,
            "alive": self.alive,
            "connected": self._connected,
            "state": self._state if self.alive or self._state in ("stopped", "dead") else "dead",
            "processed": self.processed,
            "db_errors": self.errors,
            "restarts": self.restarts,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
        }

    def health(self, grace_s: float = 5.0) -> str | None:
        """None while the worker stores what it receives; else why not. A state other than `running` counts
        only once it has lasted `grace_s` (a reconnect or a database restart is routine)."""
        if not self.alive:
            return f"ingest worker {self.name} is not running" + (f": {self.last_error}" if self.last_error else "")
        state, since = self._state, self._trouble_since
        if state == "running" or since is None or time.monotonic() - since < grace_s:
            return None
        waited = time.monotonic() - since
        what = {
            "starting": "has not connected to the broker",
            "reconnecting": "is not connected to the broker",
            "db_unavailable": "cannot write to the database",
            "restarting": "is restarting after an error",
        }.get(state, state)
        detail = f": {self.last_error}" if self.last_error and state != "reconnecting" else ""
        return f"ingest worker {self.name} {what} ({waited:.0f} s){detail}"

    def start(self, timeout_s: float = 15.0) -> None:
        client = make_client(
            self.broker, self.client_id, protocol=self.protocol, manual_ack=True, max_inflight=self.batch_max,
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
        self._trouble_since = time.monotonic()
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
            self._record_error(f"broker refused the connection: {reason}")
            return
        self._connected = True
        if self._state != "restarting":  # that one lasts until a batch is stored again (see `_loop`)
            self._set_state("running")
        client.subscribe([(f, 1) for f in self._filters()])

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self._connected = False
        if self._state == "running":
            self._set_state("reconnecting")

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if not self._pending:
            self._first_pending_at = time.monotonic()
        # Not `msg.topic`: it raises on a topic that is not UTF-8 (brokers should refuse those; not all do).
        topic = bytes(msg._topic).decode(errors="replace")
        self._pending.append(Message(topic, bytes(msg.payload), msg.mid, msg.qos, time.time()))

    # -- the loop --------------------------------------------------------------------------------------------
    def _run(self) -> None:
        delay = 0.2
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    self._loop()
                except Exception as exc:  # noqa: BLE001 - the worker must outlive anything its loop meets
                    self._restart(exc)
                    if time.monotonic() - started > 60:
                        delay = 0.2  # it had been running a while: not a restart loop
                    if self._stop.wait(delay):
                        break
                    delay = min(delay * 2, 10.0)
        finally:
            if self._pending and self._stop.is_set() and self._connected:
                with contextlib.suppress(Exception):  # shutting down: what fails here is redelivered later
                    self._flush(self._client)  # type: ignore[arg-type]
            self._set_state("stopped" if self._stop.is_set() else "dead")
            if not self._stop.is_set():
                self._log.error("ingest.worker_died", last_error=self.last_error)

    def _restart(self, exc: Exception) -> None:
        """After an unexpected error: count it, log it, and start over on a fresh connection (unacked messages of
        the batch in hand are redelivered by the broker to the persistent session)."""
        self.restarts += 1
        error = f"{type(exc).__name__}: {_first_line(exc)}"
        if error != self.last_error:
            self._log.exception("ingest.loop_failed", restarts=self.restarts)
        else:
            self._log.error("ingest.loop_failed_again", restarts=self.restarts, error=error)
        self._record_error(error)
        self._set_state("restarting")
        self._restarted_at = time.monotonic()
        self._pending = []
        self._connected = False
        client = self._client
        if client is not None:
            with contextlib.suppress(Exception):
                client.disconnect()

    def _loop(self) -> None:
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
                    self._record_error(f"broker unreachable: {exc}")
                    if self._state == "running":
                        self._set_state("reconnecting")
                    self._stop.wait(reconnect_delay)
                    reconnect_delay = min(reconnect_delay * 2, 2.0)
                    continue
            if self._state == "restarting" and self._connected and time.monotonic() - self._restarted_at > 10:
                self._set_state("running")  # quiet since the restart: nothing left to prove
            wait = 0.2
            if self._pending:
                wait = max(0.0, self._first_pending_at + self.batch_wait_s - time.monotonic())
            rc = client.loop(timeout=wait)
            if rc != mqtt.MQTT_ERR_SUCCESS:
                self._connected = False
                if self._state == "running":
                    self._set_state("reconnecting")
            if self._pending and (
                len(self._pending) >= self.batch_max
                or time.monotonic() - self._first_pending_at >= self.batch_wait_s
                or not self._connected
            ):
                self._flush(client)

    def _flush(self, client: mqtt.Client) -> None:
        batch, self._pending = self._pending, []
        delay = 0.5
        while True:
            try:
                process_batch(self.engine, self.known, batch)
                break
            except Exception as exc:
                if not transient(exc):
                    raise  # not the database being away: the loop restarts (the batch stays unacked)
                # Keep the batch and do not ack: the messages stay owed until they are committed.
                self.errors += 1
                self._record_error(f"database: {_first_line(exc)}")
                self._set_state("db_unavailable")
                self._log.error("ingest.db_error", error=_first_line(exc), retry_in_s=delay)
                if self._stop.wait(delay):
                    return  # unacked: the broker delivers them again to the persistent session
                delay = min(delay * 2, 10.0)
                client.loop(timeout=0)  # keep the connection alive (PINGREQ) while the database is away
        self.lag.observe(batch, time.time())
        self.processed += len(batch)
        if self._state in ("db_unavailable", "restarting"):
            self._set_state("running" if self._connected else "reconnecting")
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
