"""The console's fleet page at fleet scale: page load time against the API's own device list (issue 11 §1).

    python bench/console.py [--devices 10000] [--requests 60] [--warmup 5] [--database-url URL] [--json PATH]

Seeds N enrolled devices straight into a fresh database in bulk (registry rows with a reported state and a latest
telemetry, two tags each, one telemetry record each; the rows ingest would have written), starts a `Fleet` on a
private mosquitto (the system one is never touched), serves it with uvicorn in a thread and times, one request at a
time over one keep-alive connection (httpx), round-robin so that every endpoint sees the same noise:

* api-list       GET /api/v1/devices?limit=50 with a bearer token: the baseline, the API's own list
* api-filtered   the same with ?profile=...&tag=...&online=true
* fleet          GET /console/ with the console cookie: counts by profile and status, first page of 50
* fleet-cold     the same with the console's 2 s cache of the fleet-wide aggregates emptied before each request
* fleet-filtered GET /console/?profile=...&tag=...&online=online
* fleet-last     GET /console/?page=LAST (the deepest offset)
* fleet-live     GET /console/fleet/live (what htmx re-fetches every 5 s)
* device         GET /console/devices/ID and its telemetry.json (1h)

and, in process, the two aggregates the fleet page adds to a list (`fleet_counts`, `filtered_total`).

Times are client-side wall times per request (server + loopback), median and p95 over --requests. Targets: the
fleet page's median within 2x the API list's and under 200 ms. The machine is shared (2 cores): compare the
ratios of one invocation, not absolute times across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from _common import ROOT, Mosquitto, free_port

from controlplane.demo import AppServer

PROFILES = ("raspberry-pi-5", "jetson-orin-nano", "raspberry-pi-4")
SITES = tuple(f"site-{i:02d}" for i in range(20))
TARGET_MS = 200.0
TARGET_RATIO = 2.0


def seed(engine: Any, devices: int) -> float:
    """N devices as ingest leaves them (a third offline), in batches of 1000; the seconds it took."""
    from sqlalchemy import insert

    from agent import protocol as wire
    from controlplane.db import Device, DeviceTag, TelemetryRecord, utcnow

    started = time.perf_counter()
    now, ts = utcnow(), time.time()
    for start in range(0, devices, 1000):
        rows, tags, telemetry = [], [], []
        for i in range(start, min(devices, start + 1000)):
            device_id = f"bench-{i:05d}"
            message = wire.Telemetry(
                device_id=device_id, seq=0, ts=ts - i % 300,
                system=wire.SystemStats(cpu_percent=5 + i % 90, mem_used_mb=200 + i % 500, mem_total_mb=4096,
                                        disk_used_percent=40, temperature_c=35 + i % 40),
                power=wire.PowerStats(source="simulated", power_source="battery", battery_percent=100 - i % 100),
                network=wire.NetworkStats(source="simulated"),
                inference=wire.InferenceStats(model_version="m1", count=50, latency_p50_ms=1.5, latency_p95_ms=4.0,
                                              mean_confidence=0.9, class_histogram={"cat": 30, "dog": 20},
                                              labelled=10, correct=9))
            online = i % 3 != 0
            state = wire.State(device_id=device_id, online=online, ts=ts, agent_version="0.bench", runtime="litert",
                               active_model="m1" if online else None, active_variant="fp32" if online else None)
            rows.append({"device_id": device_id, "profile": PROFILES[i % len(PROFILES)], "created_at": now,
                         "online": online, "last_seen": now, "agent_version": "0.bench",
                         "reported_state": json.loads(wire.encode(state)),
                         "last_telemetry": json.loads(wire.encode(message)), "last_seq": 0})
            tags += [{"device_id": device_id, "tag": SITES[i % len(SITES)]},
                     {"device_id": device_id, "tag": "north" if i % 2 else "south"}]
            telemetry.append({"device_id": device_id, "seq": 0, "ts": message.ts, "received_at": now,
                              "payload": wire.encode(message).decode()})
        with engine.begin() as conn:
            conn.execute(insert(Device.__table__), rows)  # type: ignore[arg-type]
            conn.execute(insert(DeviceTag.__table__), tags)  # type: ignore[arg-type]
            conn.execute(insert(TelemetryRecord.__table__), telemetry)  # type: ignore[arg-type]
    return time.perf_counter() - started


@contextmanager
def database(url: str | None, workdir: Path) -> Iterator[str]:
    """A SQLite file in ``workdir``, or a fresh PostgreSQL database next to ``url`` (dropped afterwards)."""
    if not url:
        yield f"sqlite:///{workdir / 'edgefleet.db'}"
        return
    import uuid

    import psycopg
    from sqlalchemy.engine import make_url

    from controlplane.settings import normalize_database_url

    admin = make_url(normalize_database_url(url))
    name = f"edgefleet_bench_{uuid.uuid4().hex[:8]}"
    plain = admin.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(plain, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"median_ms": statistics.median(ordered) * 1000,
            "p95_ms": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))] * 1000,
            "min_ms": ordered[0] * 1000, "n": len(ordered)}


def timed(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=60, help="timed requests per endpoint")
    parser.add_argument("--warmup", type=int, default=5, help="untimed requests per endpoint first")
    parser.add_argument("--database-url", default=None,
                        help="a PostgreSQL admin URL: a fresh database is made there (default: SQLite)")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "console.json")
    args = parser.parse_args()

    import httpx

    from controlplane import console as q
    from controlplane.app import create_app
    from controlplane.auth import Role, create_token
    from controlplane.settings import BrokerAuthMode, Settings
    from controlplane.wiring import Fleet

    workdir = Path(tempfile.mkdtemp(prefix="edgefleet-bench-console-"))
    broker = Mosquitto(workdir)
    fleet = None
    results: dict[str, dict[str, float]] = {}
    try:
        with database(args.database_url, workdir) as db_url:
            fleet = Fleet(Settings(data_dir=workdir / "cp", database_url=db_url, broker_url=broker.url,
                                   broker_auth=BrokerAuthMode.NONE, instance_name="bench-console",
                                   ingest_group="bench-console"))
            fleet.start()
            seed_s = seed(fleet.engine, args.devices)
            db = fleet.engine.dialect.name
            print(f"seeded {args.devices} devices in {seed_s:.1f} s ({db})", flush=True)
            _, token = create_token(fleet.engine, Role.ADMIN, "bench")
            last_page = max(1, -(-args.devices // 50))
            device = f"bench-{args.devices // 2:05d}"
            filtered = {"profile": "jetson-orin-nano", "tag": "north"}
            port = free_port()
            app = create_app(fleet=fleet)
            with AppServer(app, port), httpx.Client(base_url=f"http://127.0.0.1:{port}",
                                                                     timeout=60) as client:
                api = {"Authorization": f"Bearer {token}"}
                client.cookies.set("edgefleet_console", token, path="/console")
                endpoints: dict[str, tuple[str, dict[str, Any], dict[str, str]]] = {
                    "api-list": ("/api/v1/devices", {"limit": 50}, api),
                    "api-filtered": ("/api/v1/devices", {"limit": 50, **filtered, "online": "true"}, api),
                    "fleet": ("/console/", {}, {}),
                    "fleet-cold": ("/console/", {}, {}),
                    "fleet-filtered": ("/console/", {**filtered, "online": "online"}, {}),
                    "fleet-last": ("/console/", {"page": last_page}, {}),
                    "fleet-live": ("/console/fleet/live", {}, {"HX-Request": "true"}),
                    "device": (f"/console/devices/{device}", {}, {}),
                    "device-telemetry": (f"/console/devices/{device}/telemetry.json", {"window": "1h"}, {}),
                }
                samples: dict[str, list[float]] = {name: [] for name in endpoints}
                sizes: dict[str, int] = {}

                def get(name: str) -> None:
                    path, params, headers = endpoints[name]
                    if name == "fleet-cold":
                        app.state.pop("console_read_cache", None)
                    response = client.get(path, params=params, headers=headers)
                    if response.status_code != 200:
                        raise SystemExit(f"{name}: HTTP {response.status_code}: {response.text[:300]}")
                    sizes[name] = len(response.content)

                for _ in range(args.warmup):
                    for name in endpoints:
                        get(name)
                for _ in range(args.requests):
                    for name in endpoints:
                        samples[name].append(timed(lambda name=name: get(name)))  # type: ignore[misc]
                in_process = {
                    "fleet_counts (SQL)": [timed(lambda: q.fleet_counts(fleet.engine)) for _ in range(args.requests)],
                    "filtered_total (SQL)": [timed(lambda: q.filtered_total(fleet.engine, q.FleetFilter(
                        profile="jetson-orin-nano", tag="north", online=True))) for _ in range(args.requests)],
                }
            for name, values in samples.items():
                results[name] = {**summary(values), "bytes": sizes[name]}
            for name, values in in_process.items():
                results[name] = summary(values)
            fleet.stop()  # before its database is dropped (the scheduler would log that it is gone)
            fleet = None
    finally:
        if fleet is not None:
            fleet.stop()
        broker.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    base = results["api-list"]["median_ms"]
    print(f"\n{args.devices} devices, {db}, {args.requests} requests per endpoint (client-side wall time)")
    print(f"{'endpoint':<22} {'median ms':>10} {'p95 ms':>9} {'x api-list':>11} {'bytes':>9}")
    for name, r in results.items():
        ratio = r["median_ms"] / base if base else 0.0
        r["ratio_vs_api_list"] = ratio
        print(f"{name:<22} {r['median_ms']:>10.1f} {r['p95_ms']:>9.1f} {ratio:>10.2f}x "
              f"{int(r.get('bytes', 0)):>9}")
    fleet_ms = results["fleet"]["median_ms"]
    met = fleet_ms < TARGET_MS and fleet_ms <= TARGET_RATIO * base
    print(f"target (fleet page median < {TARGET_MS:.0f} ms and <= {TARGET_RATIO}x api-list): "
          f"{'met' if met else 'MISSED'}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "benchmark": "console", "devices": args.devices, "database": db, "requests": args.requests,
        "warmup": args.warmup, "seed_s": seed_s, "target_ms": TARGET_MS, "target_ratio": TARGET_RATIO,
        "target_met": met, "results": results,
        "machine": {"cpu_count": os.cpu_count(), "load_avg_at_start": os.getloadavg(),
                    "platform": platform.platform(), "python": platform.python_version()},
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }, indent=2))
    print(f"wrote {args.json}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
