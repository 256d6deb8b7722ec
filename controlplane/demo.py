"""`edgefleet demo`: a control plane, a broker and N agents on this machine, driven through the public API."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Self

import httpx
import uvicorn

from controlplane._fleet import Fleet
from controlplane.app import create_app
from controlplane.auth import Role, create_token
from controlplane.settings import Settings

__all__ = ["DEMO_PROFILES", "run_demo"]

# Mixed device classes: one that may not train (Coral, full-int8 only), one that trains only while charging.
DEMO_PROFILES = ["raspberry-pi-5", "coral-dev-board", "jetson-orin-nano", "raspberry-pi-zero-2w",
                 "x86-gateway", "raspberry-pi-4"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Server:
    """uvicorn in a thread, for the demo only."""

    def __init__(self, app: Any, port: int) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the control-plane HTTP server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def _say(text: str) -> None:
    print(text, flush=True)


def run_demo(*, agents: int = 4, duration_s: float = 30.0, broker_url: str | None = None,
             data_dir: Path | None = None) -> dict[str, Any]:
    tmp = None
    if data_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="edgefleet-demo-")
        data_dir = Path(tmp.name)
    settings = Settings(data_dir=data_dir / "controlplane", broker_url=broker_url,
                        embedded_broker_port=_free_port(), database_url=None)
    fleet = Fleet(settings)
    procs: list[subprocess.Popen[bytes]] = []
    _say(f"[demo] data dir {data_dir}")
    try:
        fleet.start()
        _say(f"[demo] control plane up: broker {fleet.broker.url} ({'embedded' if fleet.embedded else 'external'}),"
             f" database {fleet.settings.database_url}")
        _, token = create_token(fleet.engine, Role.ADMIN, "demo")
        port = _free_port()
        with _Server(create_app(fleet=fleet), port):
            api = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token}"},
                               timeout=30)
            procs = _start_agents(api, agents, data_dir)
            summary = _watch(api, procs, duration_s)
            summary["devices"] = _fleet_table(api)
            _stop_agents(procs)
            summary["ingest"] = api.get("/api/v1/ingest/stats").json()
            _print_table(summary)
            return summary
    finally:
        _stop_agents(procs)
        fleet.stop()
        if tmp is not None:
            tmp.cleanup()


def _start_agents(api: httpx.Client, count: int, data_dir: Path) -> list[subprocess.Popen[bytes]]:
    procs = []
    for i in range(count):
        profile = DEMO_PROFILES[i % len(DEMO_PROFILES)]
        device_id = f"demo-{i + 1:02d}-{profile}"
        response = api.post("/api/v1/devices", json={"device_id": device_id, "profile": profile,
                                                      "tags": ["demo", f"site-{i % 2}"]})
        response.raise_for_status()
        creds = response.json()
        env = dict(os.environ, EDGEFLEET_MQTT_PASSWORD=creds["mqtt_password"])
        log = open(data_dir / f"{device_id}.log", "wb")  # noqa: SIM115 - closed with the process
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "controlplane._entry", "agent", "run", "--device-id", device_id,
             "--profile", profile, "--broker", creds["broker_url"], "--username", creds["mqtt_username"],
             "--data-dir", str(data_dir / "agents" / device_id), "--telemetry-interval", "1",
             "--power-source", "simulated", "--log-level", "warning"],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        ))
        _say(f"[demo] enrolled {device_id} ({profile}) and started its agent")
    return procs


def _watch(api: httpx.Client, procs: list[subprocess.Popen[bytes]], duration_s: float) -> dict[str, Any]:
    start = time.monotonic()
    pinged: dict[str, Any] = {}
    while (elapsed := time.monotonic() - start) < duration_s:
        time.sleep(min(5.0, duration_s - elapsed))
        devices = api.get("/api/v1/devices").json()
        stats = api.get("/api/v1/ingest/stats").json()
        online = sum(d["online"] for d in devices)
        _say(f"[demo] t={time.monotonic() - start:5.1f}s online {online}/{len(devices)}  telemetry received "
             f"{stats['received']} stored {stats['stored']} duplicates {stats['duplicates']}")
        for d in devices:
            if d["online"] and d["device_id"] not in pinged:
                t0 = time.monotonic()
                r = api.post(f"/api/v1/devices/{d['device_id']}/commands", json={"kind": "ping", "wait_s": 10})
                pinged[d["device_id"]] = {"status": r.json()["status"], "rtt_ms": round((time.monotonic() - t0) * 1e3, 1)}
    dead = [str(p.args[6]) for p in procs if p.poll() is not None and isinstance(p.args, list)]
    return {"duration_s": duration_s, "pings": pinged, "exited_agents": dead}


def _stop_agents(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
    procs.clear()


def _fleet_table(api: httpx.Client) -> list[dict[str, Any]]:
    rows = []
    for d in api.get("/api/v1/devices").json():
        records = api.get(f"/api/v1/devices/{d['device_id']}/telemetry", params={"limit": 10000}).json()
        last = records[-1]["payload"] if records else {}
        inference = [r["payload"].get("inference") or {} for r in records]
        p50 = [i["latency_p50_ms"] for i in inference if i.get("latency_p50_ms") is not None]
        state = d.get("reported_state") or {}
        rows.append({
            "device_id": d["device_id"],
            "profile": d["profile"],
            "online": d["online"],
            "runtime": f"{state.get('runtime')} {state.get('runtime_version')}",
            "model_version": state.get("active_model"),
            "telemetry_records": len(records),
            "inferences": sum(i.get("count", 0) for i in inference),
            "p50_latency_ms": round(sorted(p50)[len(p50) // 2], 3) if p50 else None,
            "battery_percent": (last.get("power") or {}).get("battery_percent"),
            "charging": (last.get("power") or {}).get("charging"),
            "power_source": (last.get("power") or {}).get("source"),
            "cpu_percent": (last.get("system") or {}).get("cpu_percent"),
        })
    return rows


def _print_table(summary: dict[str, Any]) -> None:
    cols = [("device_id", 34), ("profile", 21), ("online", 6), ("telemetry_records", 9), ("inferences", 10),
            ("p50_latency_ms", 8), ("battery_percent", 8), ("charging", 8)]
    heads = ["DEVICE", "PROFILE", "ONLINE", "RECORDS", "INFER", "P50 ms", "BATT %", "CHARGING"]
    _say("")
    _say(" ".join(h.ljust(w) for h, (_, w) in zip(heads, cols, strict=True)))
    for row in summary["devices"]:
        _say(" ".join(str(row[k]).ljust(w) for k, w in cols))
    s = summary["ingest"]
    _say(f"\ningest: received {s['received']}, stored {s['stored']}, duplicates {s['duplicates']}, "
         f"dead letters {s['dead_letters'] or 'none'}   (battery/charging figures are simulated)")
