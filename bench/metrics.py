"""The Prometheus scrape at fleet scale: `GET /metrics` against the API's own device list (issue 11 §2).

    python bench/metrics.py [--devices 10000] [--requests 40] [--warmup 3] [--database-url URL] [--json PATH]

Seeds N enrolled devices straight into a fresh database in bulk, as bench/console.py does (registry rows with a
reported state and a latest telemetry, a third offline), plus the history a fleet that has run for a while keeps
and the collector aggregates at every scrape: 5 commands per device, 5 finished deployments targeting every device (5 N
targets in every status), 500 finished rounds with their metrics,
100 finished burst jobs. Nothing in the history is pending work: the fleet's scheduler has nothing to act on while
the clock runs. Then starts a `Fleet` on a private mosquitto, serves it with uvicorn in a thread and times, one
request at a time over one keep-alive connection (httpx), round-robin:

* api-list        GET /api/v1/devices?limit=50 with a bearer token: the baseline, the API's own list (as
                  bench/console.py)
* metrics         GET /metrics with a viewer token (Prometheus' classic text format)
* metrics-om      the same, asking for OpenMetrics as Prometheus does

and, from each scrape's own body, `edgefleet_metrics_collect_seconds` (the collector's database time), then in
process: a whole collection of the app's registry (no HTTP), and each of its SQL statements with the fetch of
its rows (timed with SQLAlchemy's cursor and pool events, named by the first table they read).

Times are client-side wall times per request (server + loopback), median and p95 over --requests. There is no
target in the issue; a scrape every 15 s is the load this must carry, so the figure to watch is the scrape's cost
against a list request, and how it grows with N. The machine is shared (2 cores): compare the ratios of one
invocation, not absolute times across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

from _common import ROOT, Mosquitto, free_port
from console import database, seed, summary, timed

from controlplane.demo import AppServer

COLLECT = re.compile(rb"^edgefleet_metrics_collect_seconds(?:\{[^}]*\})? (\S+)", re.MULTILINE)
FROM = re.compile(r"\bFROM\s+\"?([a-z_]+)", re.IGNORECASE)  # "FROM (SELECT ..." skipped: the subquery's table


def seed_history(engine: Any, devices: int) -> dict[str, int]:
    """Commands, deployments and their targets, rounds and jobs for the seeded devices; the row counts."""
    from sqlalchemy import insert, select

    from agent import protocol as wire
    from controlplane.db import (
        CommandRecord,
        DeploymentRecord,
        DeploymentTargetRecord,
        JobRecord,
        ModelVersionRecord,
        RoundRecord,
        utcnow,
    )
    from controlplane.statuses import CommandStatus, DeploymentStatus, JobStatus, RoundStatus, TargetStatus

    rng = random.Random(11)
    now = utcnow()
    ids = [f"bench-{i:05d}" for i in range(devices)]
    kinds = [k.value for k in wire.CommandKind]
    # Finished, and updated long ago: a running or paused deployment is stepped every second (all its targets
    # loaded), a fresh succeeded one is watched; either would load the machine while the clock runs.
    deployment_statuses = (DeploymentStatus.SUCCEEDED, DeploymentStatus.HALTED, DeploymentStatus.CANCELLED,
                           DeploymentStatus.SUPERSEDED, DeploymentStatus.SUCCEEDED)
    long_ago = now - timedelta(days=30)
    counts = {"commands": 5 * devices, "deployments": len(deployment_statuses),
              "deployment_targets": len(deployment_statuses) * devices, "rounds": 500, "jobs": 100}
    with engine.begin() as conn:
        conn.execute(insert(ModelVersionRecord.__table__), [  # type: ignore[attr-defined]
            {"version": "m1", "release": 1, "task": "digits", "source_kind": "round", "source_id": "1",
             "created_at": now, "status": "ready", "metrics": {}}])
        conn.execute(insert(RoundRecord.__table__), [  # type: ignore[attr-defined]
            {"task": "digits", "strategy": "fedavg", "config": {}, "invited": [], "skipped": {}, "participants": [],
             "status": (RoundStatus.SUCCEEDED if r % 5 else RoundStatus.FAILED).value,
             "metrics": [{"round": k, "accuracy": 0.8 + k / 100} for k in range(1, 4)],
             "created_at": now - timedelta(seconds=60 + rng.expovariate(1 / 300)), "finished_at": now}
            for r in range(counts["rounds"])])
        conn.execute(insert(DeploymentRecord.__table__), [  # type: ignore[attr-defined]
            {"model_version": "m1", "targets": {}, "waves": [1.0], "status": status.value, "created_at": long_ago,
             "updated_at": long_ago} for status in deployment_statuses])
        deployment_ids = list(conn.execute(select(DeploymentRecord.id)).scalars())  # type: ignore[call-overload]
        target_statuses = [s.value for s in TargetStatus]
        command_statuses = [s.value for s in CommandStatus]
        for start in range(0, devices, 2000):
            chunk = ids[start:start + 2000]
            conn.execute(insert(DeploymentTargetRecord.__table__), [  # type: ignore[attr-defined]
                {"deployment_id": d, "device_id": device_id, "wave": 0, "status": rng.choice(target_statuses)}
                for d in deployment_ids for device_id in chunk])
            conn.execute(insert(CommandRecord.__table__), [  # type: ignore[attr-defined]
                {"command_id": uuid.UUID(int=rng.getrandbits(128)).hex, "device_id": device_id,
                 "kind": rng.choice(kinds), "args": {}, "status": rng.choice(command_statuses), "created_at": now}
                for device_id in chunk for _ in range(5)])
        conn.execute(insert(JobRecord.__table__), [  # type: ignore[attr-defined]
            {"kind": "finetune", "task": "digits", "spec": {}, "resources": {}, "placement": "local",
             "status": rng.choice([JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED]).value,
             "placement_reason": "bench", "progress": {}, "metrics": {}, "logs_tail": "", "out_dir": "/nonexistent",
             "created_at": now, "finished_at": now} for _ in range(counts["jobs"])])
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("ANALYZE")
    return counts


@contextmanager
def statement_times(engine: Any) -> Iterator[dict[str, list[float]]]:
    """Seconds per SQL statement run on ``engine`` by this thread inside the block, keyed by the first table it
    reads: from its execution to the next statement on its connection or the connection's return to the pool, so
    that fetching the rows counts (SQLite returns from execute at the first row, and a GROUP BY read in index
    order streams its groups)."""
    from sqlalchemy import event

    times: dict[str, list[float]] = {}
    mine = threading.get_ident()  # the control plane's own threads query the same engine meanwhile

    def close(info: dict[str, Any]) -> None:
        pending = info.pop("bench_pending", None)
        if pending is not None:
            times.setdefault(pending[0], []).append(time.perf_counter() - pending[1])

    def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        close(conn.info)
        if threading.get_ident() == mine:
            match = FROM.search(statement)
            conn.info["bench_pending"] = (match.group(1) if match else "other", time.perf_counter())

    def checkin(dbapi_connection: Any, record: Any) -> None:
        close(record.info)

    event.listen(engine, "before_cursor_execute", before)
    event.listen(engine, "checkin", checkin)
    try:
        yield times
    finally:
        event.remove(engine, "before_cursor_execute", before)
        event.remove(engine, "checkin", checkin)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=40, help="timed requests per endpoint")
    parser.add_argument("--warmup", type=int, default=3, help="untimed requests per endpoint first")
    parser.add_argument("--database-url", default=None,
                        help="a PostgreSQL admin URL: a fresh database is made there (default: SQLite)")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "metrics.json")
    args = parser.parse_args()

    import httpx
    from prometheus_client import generate_latest

    from controlplane.app import create_app
    from controlplane.auth import Role, create_token
    from controlplane.settings import BrokerAuthMode, Settings
    from controlplane.wiring import Fleet

    load_at_start = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="edgefleet-bench-metrics-"))
    broker = Mosquitto(workdir)
    results: dict[str, dict[str, float]] = {}
    try:
        with database(args.database_url, workdir) as db_url:
            fleet = Fleet(Settings(data_dir=workdir / "cp", database_url=db_url, broker_url=broker.url,
                                   broker_auth=BrokerAuthMode.NONE, instance_name="bench-metrics",
                                   ingest_group="bench-metrics"))
            try:
                fleet.start()
                started = time.perf_counter()
                seed(fleet.engine, args.devices)
                history = seed_history(fleet.engine, args.devices)
                seed_s = time.perf_counter() - started
                db = fleet.engine.dialect.name
                print(f"seeded {args.devices} devices and {history} in {seed_s:.1f} s ({db})", flush=True)
                _, admin = create_token(fleet.engine, Role.ADMIN, "bench")
                _, viewer = create_token(fleet.engine, Role.VIEWER, "bench-scrape")
                port = free_port()
                app = create_app(fleet=fleet)
                with AppServer(app, port), httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
                    scrape = {"Authorization": f"Bearer {viewer}"}
                    endpoints: dict[str, tuple[str, dict[str, Any], dict[str, str]]] = {
                        "api-list": ("/api/v1/devices", {"limit": 50}, {"Authorization": f"Bearer {admin}"}),
                        "metrics": ("/metrics", {}, scrape),
                        "metrics-om": ("/metrics", {}, {**scrape, "Accept": "application/openmetrics-text; "
                                                        "version=1.0.0; charset=utf-8"}),
                    }
                    samples: dict[str, list[float]] = {name: [] for name in endpoints}
                    collect: list[float] = []
                    sizes: dict[str, int] = {}
                    lines = 0

                    def get(name: str) -> None:
                        nonlocal lines
                        path, params, headers = endpoints[name]
                        response = client.get(path, params=params, headers=headers)
                        if response.status_code != 200:
                            raise SystemExit(f"{name}: HTTP {response.status_code}: {response.text[:300]}")
                        sizes[name] = len(response.content)
                        if name.startswith("metrics"):
                            found = COLLECT.search(response.content)
                            if found is None or b"edgefleet_database_up 1" not in response.content:
                                raise SystemExit(f"{name}: no collect time, or the database is down in the scrape")
                            collect.append(float(found.group(1)))
                            lines = response.content.count(b"\n")

                    for _ in range(args.warmup):
                        for name in endpoints:
                            get(name)
                    collect.clear()
                    for _ in range(args.requests):
                        for name in endpoints:
                            samples[name].append(timed(lambda name=name: get(name)))  # type: ignore[misc]
                registry = app.state.metrics.registry
                in_process: list[float] = []
                per_table: dict[str, list[float]] = {}
                statements_per_scrape: dict[str, int] = {}
                for _ in range(args.requests):
                    with statement_times(fleet.engine) as statements:
                        in_process.append(timed(lambda: generate_latest(registry)))
                    for table, values in statements.items():
                        per_table.setdefault(table, []).append(sum(values))
                        statements_per_scrape[table] = len(values)
                for name, values in samples.items():
                    results[name] = {**summary(values), "bytes": sizes[name]}
                results["collect_seconds (scrape)"] = summary(collect)
                results["registry (in process)"] = summary(in_process)
                for table, values in sorted(per_table.items()):
                    results[f"SQL {table} x{statements_per_scrape[table]}"] = summary(values)
            finally:  # before its database is dropped
                fleet.stop()
    finally:
        broker.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    base = results["api-list"]["median_ms"]
    print(f"\n{args.devices} devices, {db}, {args.requests} requests per endpoint (client-side wall time); "
          f"scrape: {lines} lines")
    print(f"{'measure':<28} {'median ms':>10} {'p95 ms':>9} {'x api-list':>11} {'bytes':>9}")
    for name, r in results.items():
        ratio = r["median_ms"] / base if base else 0.0
        r["ratio_vs_api_list"] = ratio
        print(f"{name:<28} {r['median_ms']:>10.1f} {r['p95_ms']:>9.1f} {ratio:>10.2f}x "
              f"{int(r['bytes']) if 'bytes' in r else '-':>9}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "benchmark": "metrics", "devices": args.devices, "database": db, "requests": args.requests,
        "warmup": args.warmup, "seed_s": seed_s, "history": history, "scrape_lines": lines, "results": results,
        "machine": {"cpu_count": os.cpu_count(), "load_avg_at_start": load_at_start,
                    "load_avg_at_end": os.getloadavg(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
