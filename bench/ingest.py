"""Ingest throughput: EdgeFleet's ingest workers against a raw paho subscriber on the same broker.

    python bench/ingest.py [--messages N] [--repeats R] [--json PATH] [--database-url URL]
                           [--modes raw,ours-1,ours-2[,ours-1-nodb]] [--breakdown] [--profile PATH]

Every run gets a fresh private mosquitto (persistence off) on a free port, and one long-lived publisher
process (started before anything else, so it is the same process for every run) publishes N telemetry
messages (QoS 1, MQTT 5, a bounded window in flight, back-pressure on MQTT_ERR_QUEUE_SIZE) for 10 devices.

Modes, run alternately R times each (the table shows the median):

* raw     a bare paho subscriber (MQTT 5, QoS 1, auto-ack) in this process; the clock stops at the last
          message received. This is the ceiling for "receive from this broker in one Python process".
* ours-1  a `Fleet` with one ingest worker; the clock stops when read_stats()["stored"] == N (rows committed).
* ours-2  a `Fleet` with two ingest workers on an MQTT 5 shared subscription.
* ours-1-nodb (diagnostic, opt-in with --modes): ours-1 with process_batch stubbed out: the cost of the worker's
          MQTT path (queue, batching, manual acks) alone; the clock stops when the worker has acked N messages.

--breakdown times process_batch's stages alone (no MQTT) on the same database; --profile runs ours-1 once under
cProfile (writer thread and paho network thread separately).

The clock starts at the publisher's first publish() in every mode. Ratios are against the median raw rate
of the same invocation (the machine is shared: absolute figures are noise, ratios much less so).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from _common import ROOT, Mosquitto, mosquitto_binary

DEVICES = 10
TARGET_RATIO = 0.9
STALL_S = 15.0  # no progress for this long after the publisher finished: give up and count the rest as lost


# ------------------------------------------------------------------------------------------------- publisher


def device_ids(run_id: str) -> list[str]:
    return [f"b{run_id[:6]}-{i:02d}" for i in range(DEVICES)]


def build_messages(ids: list[str], n: int, payload: str = "compact") -> tuple[list[str], list[bytes]]:
    """N telemetry messages, round-robin over the devices, per-device seq from 0.

    ``compact`` (~455 B): system, power and network figures, no inference/outbox block (an agent with
    inference paused sends these). ``full`` (~690 B): every field a running agent fills in (inference
    statistics, outbox, load, uptime, byte counters), as the real agent's telemetry measured in
    agent_footprint.py (~700 B).
    """
    import random

    from agent import protocol as wire

    rng = random.Random(42)
    topics, payloads = [], []
    base = time.time()
    full = payload == "full"
    for i in range(n):
        device_id = ids[i % len(ids)]
        seq = i // len(ids)
        inference = outbox = None
        if full:
            hist: dict[str, int] = {}
            for _ in range(5):
                k = str(rng.randrange(10))
                hist[k] = hist.get(k, 0) + 1
            inference = wire.InferenceStats(model_version="starter-digits-fp32", count=5,
                                            latency_p50_ms=round(rng.uniform(0.03, 0.06), 4),
                                            latency_p95_ms=round(rng.uniform(0.06, 0.2), 4),
                                            mean_confidence=round(rng.uniform(0.8, 1.0), 4), class_histogram=hist)
            outbox = wire.OutboxStats(pending=rng.randrange(3), pending_bytes=rng.randrange(2000), dropped_total=0)
        message = wire.Telemetry(
            device_id=device_id, seq=seq, ts=base + seq,
            system=wire.SystemStats(
                cpu_percent=round(rng.uniform(1, 60), 1), mem_used_mb=round(rng.uniform(800, 2000), 1),
                mem_total_mb=7863.4, disk_used_percent=41.7, temperature_c=round(rng.uniform(40, 70), 1),
                load_1m=round(rng.uniform(0, 2), 2) if full else None,
                uptime_s=round(rng.uniform(1e3, 1e6), 1) if full else None,
            ),
            power=wire.PowerStats(source="simulated", power_source="battery",
                                  battery_percent=round(rng.uniform(5, 100), 1), charging=rng.random() < 0.3),
            network=wire.NetworkStats(source="simulated", metered=rng.random() < 0.2, kind="wifi",
                                      bytes_sent=rng.randrange(10**9) if full else None,
                                      bytes_recv=rng.randrange(10**9) if full else None),
            inference=inference,
            outbox=outbox,
        )
        topics.append(wire.topic(device_id, wire.Channel.TELEMETRY))
        payloads.append(wire.encode(message))
    return topics, payloads


def publisher_main(conn: Any) -> None:
    """The publisher process: one job per run, driven over a Pipe.

    ("publish", port, run_id, n, window, payload) -> ("ready", payload_bytes) ... ("go",) -> ("done", stats) | ("error", text)
    """
    import paho.mqtt.client as mqtt

    while True:
        job = conn.recv()
        if job[0] == "quit":
            return
        _, port, run_id, n, window, payload = job
        try:
            topics, payloads = build_messages(device_ids(run_id), n, payload)
            acked = failed = 0
            connected = threading.Event()

            def on_connect(c: Any, u: Any, f: Any, reason: Any, p: Any, connected: Any = connected) -> None:
                if not reason.is_failure:
                    connected.set()

            def on_publish(c: Any, u: Any, mid: int, reason: Any, p: Any) -> None:
                nonlocal acked, failed
                acked += 1
                if reason.is_failure:
                    failed += 1

            client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                 client_id=f"bench-pub-{run_id}", protocol=mqtt.MQTTv5)
            client.on_connect, client.on_publish = on_connect, on_publish
            client.max_inflight_messages_set(window)
            client.max_queued_messages_set(window)  # bounded: publish() answers MQTT_ERR_QUEUE_SIZE beyond it
            client.connect("127.0.0.1", port, keepalive=60)
            deadline = time.monotonic() + 10
            while not connected.is_set():
                if time.monotonic() > deadline:
                    raise RuntimeError("publisher: no CONNACK")
                client.loop(timeout=0.05)
            conn.send(("ready", sum(map(len, payloads)) / n))
            assert conn.recv()[0] == "go"
            backpressure = 0
            cpu0 = sum(os.times()[:2])
            t_first = time.monotonic()
            i = 0
            while i < n:
                info = client.publish(topics[i], payloads[i], qos=1)
                if info.rc == mqtt.MQTT_ERR_SUCCESS:
                    i += 1
                    if i % 64 == 0:
                        client.loop(timeout=0)  # read PUBACKs, flush what is queued
                elif info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
                    backpressure += 1
                    client.loop(timeout=0.01)
                else:
                    raise RuntimeError(f"publish: {mqtt.error_string(info.rc)}")
            t_last_publish = time.monotonic()
            deadline = time.monotonic() + 60
            while acked < n and time.monotonic() < deadline:
                client.loop(timeout=0.01)
            t_last_ack = time.monotonic()
            client.disconnect()
            conn.send(("done", {"t_first": t_first, "t_last_publish": t_last_publish, "t_last_ack": t_last_ack,
                                "acked": acked, "refused": failed, "backpressure_waits": backpressure,
                                "cpu_s": sum(os.times()[:2]) - cpu0}))
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class Publisher:
    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=publisher_main, args=(child,), name="bench-publisher", daemon=True)
        self.proc.start()

    def prepare(self, port: int, run_id: str, n: int, window: int, payload: str) -> float:
        self.conn.send(("publish", port, run_id, n, window, payload))
        reply = self._recv(120)
        if reply[0] != "ready":
            raise RuntimeError(reply[1])
        return float(reply[1])

    def go(self) -> None:
        self.conn.send(("go",))

    def result(self, timeout: float) -> dict[str, Any]:
        reply = self._recv(timeout)
        if reply[0] != "done":
            raise RuntimeError(reply[1])
        return dict(reply[1])

    def _recv(self, timeout: float) -> Any:
        if not self.conn.poll(timeout):
            raise RuntimeError("publisher did not answer")
        return self.conn.recv()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.send(("quit",))
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()


# ----------------------------------------------------------------------------------------------------- runs


@dataclass
class Run:
    mode: str
    repeat: int
    messages: int
    seconds: float = 0.0
    rate: float = 0.0
    received: int = 0  # raw: messages delivered; ours: rows stored
    lost: int = 0
    duplicate_rows: int | None = None
    dead_letters: dict[str, int] = field(default_factory=dict)
    publish_s: float = 0.0  # first publish -> last PUBACK at the publisher
    backpressure_waits: int = 0
    cpu_s: dict[str, float] = field(default_factory=dict)  # this process / mosquitto / publisher, during the run
    machine: dict[str, float] = field(default_factory=dict)  # busy / steal % of all CPUs during the run
    payload_bytes: float = 0.0


def machine_cpu() -> tuple[float, float, float]:
    """(busy, steal, total) jiffies of all CPUs from /proc/stat (Linux; zeros elsewhere)."""
    try:
        fields = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return 0.0, 0.0, 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    steal = fields[7] if len(fields) > 7 else 0.0
    total = sum(fields[:8])
    return total - idle - steal, steal, total


def machine_load(before: tuple[float, float, float]) -> dict[str, float]:
    """Busy and steal % of the whole machine (all CPUs) since `before`: how noisy a run was."""
    after = machine_cpu()
    total = after[2] - before[2]
    if total <= 0:
        return {}
    return {"busy_percent": round(100 * (after[0] - before[0]) / total, 1),
            "steal_percent": round(100 * (after[1] - before[1]) / total, 1)}


def process_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def run_raw(args: argparse.Namespace, publisher: Publisher, workdir: Path, repeat: int) -> Run:
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from agent import protocol as wire

    run = Run("raw", repeat, args.messages)
    broker = Mosquitto(workdir)
    run_id = uuid.uuid4().hex[:8]
    count = 0
    t_last = 0.0
    done = threading.Event()
    subscribed = threading.Event()

    def on_message(c: Any, u: Any, msg: Any) -> None:
        nonlocal count, t_last
        count += 1
        t_last = time.monotonic()
        if count >= args.messages:
            done.set()

    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-raw-{run_id}",
                         protocol=mqtt.MQTTv5)
    client.on_message = on_message
    client.on_connect = lambda c, u, f, r, p: c.subscribe(wire.subscription(wire.Channel.TELEMETRY), qos=1)
    client.on_subscribe = lambda *a: subscribed.set()
    props = Properties(PacketTypes.CONNECT)
    props.ReceiveMaximum = 1000  # as the ingest worker asks (batch_max)
    try:
        client.connect("127.0.0.1", broker.port, keepalive=60, clean_start=True, properties=props)
        client.loop_start()
        if not subscribed.wait(10):
            raise RuntimeError("raw subscriber did not subscribe")
        run.payload_bytes = publisher.prepare(broker.port, run_id, args.messages, args.window, args.payload)
        cpu0, bcpu0, m0 = process_cpu_s(), broker.cpu_s(), machine_cpu()
        publisher.go()
        pub = publisher.result(120)
        last, last_change = -1, time.monotonic()
        while not done.wait(0.05):
            if count != last:
                last, last_change = count, time.monotonic()
            elif time.monotonic() - last_change > STALL_S:
                break
        run.cpu_s = {"bench": process_cpu_s() - cpu0, "mosquitto": broker.cpu_s() - bcpu0, "publisher": pub["cpu_s"]}
        run.machine = machine_load(m0)
        run.received = count
        run.seconds = t_last - pub["t_first"]
        run.lost = max(0, args.messages - count)
        run.duplicate_rows = max(0, count - args.messages)
        _publisher_stats(run, pub)
    finally:
        client.disconnect()
        client.loop_stop()
        broker.stop()
    run.rate = run.received / run.seconds if run.seconds > 0 else 0.0
    return run


def _publisher_stats(run: Run, pub: dict[str, Any]) -> None:
    run.publish_s = pub["t_last_ack"] - pub["t_first"]
    run.backpressure_waits = pub["backpressure_waits"]
    if pub["acked"] != run.messages or pub["refused"]:
        print(f"  warning: publisher got {pub['acked']} PUBACKs ({pub['refused']} refusals) for {run.messages}",
              file=sys.stderr)


@contextlib.contextmanager
def database(args: argparse.Namespace, workdir: Path) -> Iterator[str]:
    """SQLite in the run's directory, or a fresh PostgreSQL database dropped afterwards."""
    if not args.database_url:
        yield f"sqlite:///{workdir / 'edgefleet.db'}"
        return
    import psycopg
    from sqlalchemy.engine import make_url

    from controlplane.settings import normalize_database_url

    admin_url = make_url(normalize_database_url(args.database_url))
    admin = admin_url.set(drivername="postgresql").render_as_string(hide_password=False)
    name = f"edgefleet_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run_ours(args: argparse.Namespace, publisher: Publisher, workdir: Path, repeat: int, workers: int,
              no_db: bool = False) -> Run:
    """A Fleet with `workers` ingest workers. `no_db`: process_batch is stubbed out (MQTT path only; the clock
    stops when the workers have acked N messages)."""
    from sqlalchemy import text

    from controlplane.devices.schemas import DeviceCreate
    from controlplane.ingest import read_stats
    from controlplane.settings import BrokerAuthMode, Settings
    from controlplane.wiring import Fleet

    run = Run(f"ours-{workers}" + ("-nodb" if no_db else ""), repeat, args.messages)
    run_id = uuid.uuid4().hex[:8]
    rundir = workdir / f"run-{run_id}"
    rundir.mkdir(mode=0o700)  # a control-plane data dir (the Fleet would tighten it otherwise)
    broker = Mosquitto(workdir)
    fleet = None
    try:
        with database(args, rundir) as db_url:
            settings = Settings(
                data_dir=rundir, database_url=db_url, broker_url=broker.url, broker_auth=BrokerAuthMode.NONE,
                ingest_workers=workers, ingest_shared=True if workers > 1 else None,
                ingest_group=f"bench-{run_id}", instance_name=f"bench-{run_id}",
            )
            fleet = Fleet(settings).start()
            for device_id in device_ids(run_id):
                fleet.devices.enroll(DeviceCreate(device_id=device_id, profile="raspberry-pi-5"))
            run.payload_bytes = publisher.prepare(broker.port, run_id, args.messages, args.window, args.payload)
            cpu0, bcpu0, m0 = process_cpu_s(), broker.cpu_s(), machine_cpu()
            publisher.go()
            stored, t_end, last_change = 0, time.monotonic(), time.monotonic()
            pub: dict[str, Any] | None = None
            while True:
                if pub is None and publisher.conn.poll(0):
                    pub = publisher.result(0)
                # Messages the workers have committed (and then acked), counted in memory: polling the database
                # here would charge the benchmark's own queries to the ingest path. `lost` below is counted in
                # the telemetry table itself.
                now_stored = sum(w.processed for w in fleet.workers)
                now = time.monotonic()
                if now_stored != stored:
                    stored, t_end, last_change = now_stored, now, now
                if stored >= args.messages:
                    break
                if pub is not None and now - last_change > STALL_S:
                    break
                time.sleep(args.poll_s)
            if pub is None:
                pub = publisher.result(120)
            run.cpu_s = {"bench": process_cpu_s() - cpu0, "mosquitto": broker.cpu_s() - bcpu0,
                         "publisher": pub["cpu_s"]}
            run.machine = machine_load(m0)
            stats = read_stats(fleet.engine)
            with fleet.engine.connect() as conn:
                total = conn.execute(text("SELECT count(*) FROM telemetry")).scalar_one()
                distinct = conn.execute(
                    text("SELECT count(*) FROM (SELECT DISTINCT device_id, seq FROM telemetry) AS t")
                ).scalar_one()
            run.received = stored if no_db else int(stats["stored"])  # type: ignore[call-overload]
            run.lost = args.messages - (stored if no_db else int(total))
            run.duplicate_rows = None if no_db else int(total) - int(distinct)
            run.dead_letters = dict(stats["dead_letters"])  # type: ignore[call-overload]
            run.seconds = t_end - pub["t_first"]
            _publisher_stats(run, pub)
            fleet.stop()
            fleet = None
    finally:
        if fleet is not None:
            fleet.stop()
        broker.stop()
        shutil.rmtree(rundir, ignore_errors=True)
    run.rate = run.received / run.seconds if run.seconds > 0 else 0.0
    return run


@contextlib.contextmanager
def stub_process_batch(active: bool) -> Iterator[None]:
    """Diagnostic mode `ours-N-nodb`: the workers' process_batch does no database work at all."""
    if not active:
        yield
        return
    from collections import Counter

    from controlplane.ingest import worker as _worker

    original = _worker.process_batch
    _worker.process_batch = lambda engine, known, batch: Counter(received=len(batch))  # type: ignore[assignment]
    try:
        yield
    finally:
        _worker.process_batch = original


def breakdown(args: argparse.Namespace, workdir: Path, batch_size: int) -> dict[str, float]:
    """Where process_batch spends its time, per message, without MQTT: each stage timed alone, same statements."""
    from collections import Counter

    import msgspec
    from sqlalchemy import bindparam, update
    from sqlalchemy.dialects import postgresql, sqlite

    from agent import protocol as wire
    from controlplane.devices.schemas import DeviceCreate
    from controlplane.ingest import worker as _worker
    from controlplane.ingest.stats import add_counts
    from controlplane.settings import BrokerAuthMode, Settings
    from controlplane.wiring import Fleet

    run_id = uuid.uuid4().hex[:8]
    ids = device_ids(run_id)
    n = max(args.messages // batch_size, 4) * batch_size
    rundir = workdir / f"breakdown-{run_id}"
    rundir.mkdir(mode=0o700)  # a control-plane data dir (the Fleet would tighten it otherwise)
    broker = Mosquitto(workdir)  # Fleet.start() wants a broker; no messages go through it
    result: dict[str, float] = {}
    try:
        with database(args, rundir) as db_url:
            fleet = Fleet(Settings(data_dir=rundir, database_url=db_url, broker_url=broker.url,
                                   broker_auth=BrokerAuthMode.NONE, instance_name=f"bench-{run_id}"))
            fleet.start(ingest=False)
            try:
                for device_id in ids:
                    fleet.devices.enroll(DeviceCreate(device_id=device_id, profile="raspberry-pi-5"))
                engine = fleet.engine
                pg = engine.dialect.name == "postgresql"
                topics, payloads = build_messages(ids, 5 * n, args.payload)  # fresh (device_id, seq) for every stage
                messages = [_worker.Message(t, p, i + 1, 1) for i, (t, p) in enumerate(zip(topics, payloads))]
                chunks = [messages[i:i + n] for i in range(0, 5 * n, n)]

                def batches(chunk: list[Any]) -> list[list[Any]]:
                    return [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]

                def timed(label: str, fn: Any, items: list[Any]) -> None:
                    t0 = time.perf_counter()
                    for item in items:
                        fn(item)
                    result[label] = (time.perf_counter() - t0) / n * 1e6

                known = _worker._KnownDevices(engine)
                timed("process_batch (whole)", lambda b: _worker.process_batch(engine, known, b), batches(chunks[0]))
                timed("process_batch, all duplicates (redelivery)",
                      lambda b: _worker.process_batch(engine, known, b), batches(chunks[0]))

                def decode_all(b: list[Any]) -> list[Any]:
                    out = []
                    for m in b:
                        device_id, _ = wire.parse_topic(m.topic)
                        out.append((device_id, wire.decode(m.payload, wire.Telemetry), m.payload))
                    return out

                timed("parse_topic + decode/validate", decode_all, batches(chunks[1]))
                decoded = [decode_all(b) for b in batches(chunks[1])]
                now = _worker.utcnow()

                def rows_of(b: list[Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
                    rows, latest = [], {}
                    for device_id, message, raw in b:
                        rows.append({"device_id": device_id, "seq": message.seq, "ts": message.ts,
                                     "received_at": now, "payload": raw.decode()})
                        if device_id not in latest or message.seq > latest[device_id].seq:
                            latest[device_id] = message
                    return rows, latest

                timed("build row dicts", rows_of, decoded)
                built = [rows_of(b) for b in decoded]
                table = _worker._TELEMETRY
                insert = (postgresql.insert if pg else sqlite.insert)(table).on_conflict_do_nothing(
                    index_elements=["device_id", "seq"])
                dev = _worker._DEVICE
                device_update = (
                    update(dev).where(dev.c.device_id == bindparam("b_id"))
                    .where((dev.c.last_seq.is_(None)) | (dev.c.last_seq < bindparam("b_seq")))
                    .values(last_seen=now, last_seq=bindparam("b_seq"), last_telemetry=bindparam("b_payload"))
                )

                def tx(body: Any) -> Any:
                    def go(item: Any) -> None:
                        with engine.begin() as conn:
                            body(conn, item)
                    return go

                timed("empty transaction (begin + commit)", tx(lambda c, i: None), built)
                timed("known-devices check (cached)", tx(lambda c, i: known.filter(c, set(ids))), built)
                if pg:
                    timed("telemetry INSERT .. ON CONFLICT DO NOTHING RETURNING id",
                          tx(lambda c, i: c.execute(insert.returning(table.c.id), i[0]).all()), built)
                else:
                    timed("telemetry INSERT .. ON CONFLICT DO NOTHING", tx(lambda c, i: c.execute(insert, i[0])),
                          built)
                # The same rows again through the bare DB-API cursor: the driver/database floor for that insert.
                decoded2 = [decode_all(b) for b in batches(chunks[2])]
                built2 = [rows_of(b) for b in decoded2]
                param = "%s" if pg else "?"
                sql = (f"INSERT INTO telemetry (device_id, seq, ts, received_at, payload) VALUES "
                       f"({', '.join([param] * 5)}) ON CONFLICT (device_id, seq) DO NOTHING")

                def raw_insert(item: Any) -> None:
                    with engine.begin() as conn:
                        cur = conn.connection.cursor()
                        cur.executemany(sql, [(r["device_id"], r["seq"], r["ts"], r["received_at"].isoformat()
                                               if not pg else r["received_at"], r["payload"]) for r in item[0]])

                timed("same rows via bare DB-API executemany (floor)", raw_insert, built2)
                timed("device UPDATE (latest per device)", tx(lambda c, i: c.execute(device_update, [
                    {"b_id": d, "b_seq": m.seq, "b_payload": msgspec.to_builtins(m)} for d, m in i[1].items()])),
                    built)
                counts = Counter(received=batch_size, stored=batch_size, duplicates=0)
                timed("ingest_counter upsert", tx(lambda c, i: add_counts(c, counts)), built)
                # Again, on a table that already holds rows (the first run also paid for growing the files).
                timed("process_batch (whole), again at the end", lambda b: _worker.process_batch(engine, known, b),
                      batches(chunks[3]))
            finally:
                fleet.stop()
    finally:
        broker.stop()
        shutil.rmtree(rundir, ignore_errors=True)
    return result


# ----------------------------------------------------------------------------------------------- reporting


def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    import importlib.metadata as md

    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "load_avg_at_start": os.getloadavg(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "paho_mqtt": md.version("paho-mqtt"),
        "sqlalchemy": md.version("sqlalchemy"),
        "mosquitto": subprocess.run([mosquitto_binary(), "-h"], check=False, capture_output=True,
                                    text=True).stdout.splitlines()[0],
    }
    if args.database_url:
        import psycopg
        from sqlalchemy.engine import make_url

        from controlplane.settings import normalize_database_url

        url = make_url(normalize_database_url(args.database_url)).set(drivername="postgresql")
        with psycopg.connect(url.render_as_string(hide_password=False)) as conn:
            info["postgresql"] = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
        info["psycopg"] = md.version("psycopg")
    return info


def summarize(runs: list[Run]) -> list[dict[str, Any]]:
    modes = list(dict.fromkeys(r.mode for r in runs))
    raw = [r.rate for r in runs if r.mode == "raw"]
    raw_rate = statistics.median(raw) if raw else None
    rows = []
    for mode in modes:
        rs = [r for r in runs if r.mode == mode]
        rate = statistics.median(r.rate for r in rs)
        rows.append({
            "mode": mode,
            "messages": rs[0].messages,
            "runs": len(rs),
            "seconds": statistics.median(r.seconds for r in rs),
            "msg_per_s": rate,
            "msg_per_s_all": [round(r.rate, 1) for r in rs],
            "ratio_vs_raw": rate / raw_rate if raw_rate else None,
            "ratio_vs_raw_all": [round(r.rate / raw_rate, 3) for r in rs] if raw_rate else None,
            "lost": max(r.lost for r in rs),
            "duplicate_rows": None if all(r.duplicate_rows is None for r in rs)
            else max(r.duplicate_rows or 0 for r in rs),
            "bench_cpu_s_per_1k": statistics.median(1000 * r.cpu_s.get("bench", 0) / r.messages for r in rs),
            "mosquitto_cpu_s_per_1k": statistics.median(1000 * r.cpu_s.get("mosquitto", 0) / r.messages for r in rs),
            "publisher_s": statistics.median(r.publish_s for r in rs),
        })
    return rows


def print_table(rows: list[dict[str, Any]], db: str, payload_bytes: float) -> None:
    print(f"\ningest benchmark ({db}; payloads ~{payload_bytes:.0f} B; medians; "
          "ratio = median rate / median raw rate of this invocation)")
    header = (f"{'mode':<11} | {'messages':>8} | {'seconds':>7} | {'msg/s':>8} | {'ratio vs raw':>12} | {'lost':>4} | "
              f"{'duplicate rows':>14} | {'cpu ms/1k msg (bench, broker)':>29}")
    print(header)
    print("-" * len(header))
    for r in rows:
        ratio = f"{r['ratio_vs_raw']:.2f}x" if r["ratio_vs_raw"] is not None else "-"
        cpu = f"{r['bench_cpu_s_per_1k'] * 1000:.0f}, {r['mosquitto_cpu_s_per_1k'] * 1000:.0f}"
        print(f"{r['mode']:<11} | {r['messages']:>8} | {r['seconds']:>7.2f} | {r['msg_per_s']:>8.0f} | {ratio:>12} | "
              f"{r['lost']:>4} | {'-' if r['duplicate_rows'] is None else r['duplicate_rows']:>14} | {cpu:>29}")
    print("per-run ratios: " + "; ".join(f"{r['mode']} {r['ratio_vs_raw_all']}" for r in rows))


# ---------------------------------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3, help="runs per mode, alternating (median reported)")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "ingest.json")
    parser.add_argument("--database-url", help="PostgreSQL admin URL (a fresh database is created per run)")
    parser.add_argument("--modes", default="raw,ours-1,ours-2")
    parser.add_argument("--payload", choices=("compact", "full"), default="compact",
                        help="compact: ~450 B telemetry without inference/outbox blocks; full: ~690 B, every field "
                             "a running agent fills in")
    parser.add_argument("--window", type=int, default=1000, help="publisher: QoS 1 messages in flight (+ queued)")
    parser.add_argument("--poll-s", type=float, default=0.01, help="how often read_stats() is polled")
    parser.add_argument("--profile", metavar="PATH", type=Path,
                        help="also run ours-1 once under cProfile (writer + paho threads); pstats next to PATH")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time process_batch's stages alone (no MQTT), batches of 100/500/1000")
    args = parser.parse_args()

    publisher = Publisher()  # before any thread exists in this process
    from agent.logsetup import configure_logging

    configure_logging("warning")
    modes = args.modes.split(",")
    db = "postgresql" if args.database_url else "sqlite"
    info = machine_info(args)
    print(f"{args.messages} messages ({args.payload} payloads) x {len(modes)} modes x {args.repeats} repeats; {db}; "
          f"{info['cpu_count']} CPUs, load {info['load_avg_at_start'][0]:.2f}", flush=True)
    runs: list[Run] = []
    breakdowns: dict[str, dict[str, float]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp:
            workdir = Path(tmp)
            for repeat in range(args.repeats):
                for mode in modes:
                    if mode == "raw":
                        run = run_raw(args, publisher, workdir, repeat)
                    elif mode.startswith("ours-"):
                        workers, no_db = int(mode.split("-")[1]), mode.endswith("-nodb")
                        with stub_process_batch(no_db):
                            run = run_ours(args, publisher, workdir, repeat, workers, no_db=no_db)
                    else:
                        parser.error(f"unknown mode {mode!r}")
                    runs.append(run)
                    cpu = ", ".join(f"{k} {v:.2f}" for k, v in run.cpu_s.items())
                    print(f"  [{repeat}] {run.mode:<11} {run.seconds:6.2f} s {run.rate:8.0f} msg/s lost {run.lost} "
                          f"dup {'-' if run.duplicate_rows is None else run.duplicate_rows} cpu s: {cpu}; machine "
                          f"{run.machine.get('busy_percent', '?')}% busy, {run.machine.get('steal_percent', '?')}% "
                          f"steal; dead letters {run.dead_letters or '-'}", flush=True)
            if args.profile:
                profile_ours(args, publisher, workdir)
            if args.breakdown:
                for size in (100, 500, 1000):
                    stages = breakdown(args, workdir, size)
                    breakdowns[str(size)] = stages
                    print(f"\nprocess_batch breakdown, batches of {size} ({db}; microseconds per message, "
                          "each stage timed alone):")
                    for label, us in stages.items():
                        print(f"  {label:<55} {us:7.1f}")
    finally:
        publisher.close()
    rows = summarize(runs)
    payload_bytes = statistics.fmean(r.payload_bytes for r in runs) if runs else 0.0
    print_table(rows, db, payload_bytes)
    ok = all((r["ratio_vs_raw"] or 1) >= TARGET_RATIO and r["lost"] == 0 and r["duplicate_rows"] == 0
             for r in rows if r["mode"] in ("ours-1", "ours-2"))
    print(f"target (>= {TARGET_RATIO}x raw, 0 lost, 0 duplicates): {'met' if ok else 'MISSED'}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "benchmark": "ingest", "database": db, "messages": args.messages, "repeats": args.repeats,
        "devices": DEVICES, "payload": args.payload, "payload_bytes_mean": payload_bytes, "publisher_window": args.window, "target_ratio": TARGET_RATIO, "target_met": ok,
        "machine": info, "summary": rows, "runs": [asdict(r) for r in runs],
        "process_batch_breakdown_us_per_msg": breakdowns or None,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }, indent=2))
    print(f"wrote {args.json}")
    return 0


def profile_ours(args: argparse.Namespace, publisher: Publisher, workdir: Path) -> None:
    """One ours-1 run with the writer thread and the paho network thread under cProfile."""
    import cProfile
    import pstats

    import paho.mqtt.client as mqtt

    from controlplane.ingest import worker as _worker

    profiles: list[tuple[str, cProfile.Profile]] = []
    original_write_loop = _worker.IngestWorker._write_loop
    original_thread_main = mqtt.Client._thread_main

    def wrap(fn: Any) -> Any:
        def wrapped(self: Any, *a: Any, **kw: Any) -> Any:
            prof = cProfile.Profile()
            profiles.append((fn.__name__, prof))
            return prof.runcall(fn, self, *a, **kw)
        return wrapped

    _worker.IngestWorker._write_loop = wrap(original_write_loop)  # type: ignore[method-assign]
    mqtt.Client._thread_main = wrap(original_thread_main)  # type: ignore[method-assign]
    try:
        run = run_ours(args, publisher, workdir, -1, 1)
    finally:
        _worker.IngestWorker._write_loop = original_write_loop  # type: ignore[method-assign]
        mqtt.Client._thread_main = original_thread_main  # type: ignore[method-assign]
    print(f"\nprofiled ours-1 run (cProfile slows it down): {run.seconds:.2f} s, {run.rate:.0f} msg/s")
    args.profile.parent.mkdir(parents=True, exist_ok=True)
    for label, profs in (("writer thread", [p for n, p in profiles if n == "_write_loop"]),
                         ("paho network threads", [p for n, p in profiles if n == "_thread_main"])):
        if not profs:
            continue
        stats = pstats.Stats(*profs)
        path = args.profile.with_name(f"{args.profile.stem}-{label.split()[0]}{args.profile.suffix}")
        stats.dump_stats(str(path))
        print(f"\n--- {label} (top by cumulative time) -> {path}")
        stats.sort_stats("cumulative").print_stats(35)


if __name__ == "__main__":
    sys.exit(main())
