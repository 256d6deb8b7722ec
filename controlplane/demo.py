"""`edgefleet demo`: a control plane, a broker and N agents on this machine, driven through the public API."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Self

import httpx
import uvicorn

from controlplane.app import create_app
from controlplane.auth import Role, create_token
from controlplane.broker import free_port
from controlplane.output import Progress, deployment_progress, round_progress, summarize_skipped
from controlplane.settings import Settings
from controlplane.statuses import DeploymentStatus, RoundStatus
from controlplane.wiring import Fleet

__all__ = ["DEMO_PROFILES", "AppServer", "run_demo"]

# Mixed device classes: one that may not train (Coral, full-int8 only), one on tflite-runtime 2.14 (Pi 4), and
# with 5+ devices one that trains only while charging (Pi Zero 2 W).
DEMO_PROFILES = ["raspberry-pi-5", "coral-dev-board", "jetson-orin-nano", "raspberry-pi-4",
                 "raspberry-pi-zero-2w", "x86-gateway"]



class AppServer:
    """The control-plane app served by uvicorn in a thread of this process (the demo, the benchmarks, the tests)."""

    def __init__(self, app: Any, port: int) -> None:
        # log_config=None: uvicorn's loggers go through the root handler (JSON lines in the demo's log file) instead
        # of handlers of its own that print plain text on stderr
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                                    log_config=None))
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


def run_demo(*, agents: int = 4, duration_s: float = 20.0, broker_url: str | None = None,
             data_dir: Path | None = None, rounds: int = 3, alpha: float = 0.5, strategy: str = "fedavg",
             learn: bool | None = None, burst: str | None = None, port: int = 0, serve: bool = False,
             stop: threading.Event | None = None, log_path: Path | None = None) -> dict[str, Any]:
    """The whole loop: fleet up → scheduled federated rounds → build, gate, sign → rollout → on-device inference.

    `learn=False` (or no flwr installed) runs the fleet part only: enrol, telemetry, commands. `burst` ("qat",
    "finetune", "distill") attaches that burst job to the round: it runs on the federated result before the build.
    `port`: the HTTP port of the API and console (0: a free one). `serve`: after the summary, keep the control plane,
    the console and the agents up until `stop` is set (or Ctrl-C). `log_path`: where the logs went (printed).
    """
    _quiet_ml_logs()
    if learn is None:
        import importlib.util

        learn = importlib.util.find_spec("flwr") is not None and importlib.util.find_spec("litert_torch") is not None
    tmp = None
    if data_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="edgefleet-demo-")
        data_dir = Path(tmp.name)
    settings = Settings(data_dir=data_dir / "controlplane", broker_url=broker_url,
                        embedded_broker_port=free_port(), database_url=None)
    fleet = Fleet(settings)
    procs: list[subprocess.Popen[bytes]] = []
    started = time.monotonic()
    _say(f"[demo] data dir {data_dir}")
    if log_path is not None:
        _say(f"[demo] logs (JSON lines; the ML libraries' output too): {log_path}")
    try:
        fleet.start()
        _say(f"[demo] control plane up: broker {fleet.broker.url} ({'embedded' if fleet.embedded else 'external'}),"
             f" database {fleet.settings.database_url}")
        _, token = create_token(fleet.engine, Role.ADMIN, "demo")
        port = port or free_port()
        with AppServer(create_app(fleet=fleet), port):
            url = f"http://127.0.0.1:{port}"
            _say(f"[demo] API and console on {url}/")
            api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
            partitions = _write_partitions(data_dir, agents, alpha) if learn else {}
            procs = _start_agents(api, agents, data_dir, url, partitions)
            summary = _watch(api, procs, 8.0 if learn else duration_s)
            if learn:
                summary.update(_learn(api, fleet, rounds=rounds, strategy=strategy, partitions=partitions,
                                      burst=burst))
                _say(f"[demo] on-device inference with the new model for {duration_s:.0f} s")
                time.sleep(duration_s)
            summary["devices"] = _fleet_table(api, summary.get("model_version"))
            if not serve:
                _stop_agents(procs)
            summary["ingest"] = api.get("/api/v1/ingest/stats").json()
            summary["wall_time_s"] = round(time.monotonic() - started, 1)
            summary["url"] = f"{url}/"
            _print_table(summary)
            _say("")
            if serve:
                _serve_until_stopped(url, token, stop or threading.Event())
            else:
                _say(f"console: {url}/ (served while the demo ran; `edgefleet demo --serve` keeps it up)")
            return summary
    finally:
        _stop_agents(procs)
        fleet.stop()
        if tmp is not None:
            tmp.cleanup()


def _serve_until_stopped(url: str, token: str, stop: threading.Event) -> None:
    """Say where the console is and how to log in, then wait for Ctrl-C (SIGINT) or SIGTERM (or `stop`)."""
    _say(f"console: {url}/  (log in with the demo's admin token below; the agents keep running)")
    _say(f"token:   {token}")
    _say(f"CLI:     EDGEFLEET_URL={url} EDGEFLEET_TOKEN=<the token> edgefleet status")
    _say("serving until Ctrl-C")
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        # SIGINT too, explicitly: a process started in the background by a non-interactive shell (CI, nohup, a
        # script's `&`) inherits SIGINT ignored, and Python then never raises KeyboardInterrupt.
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    _say("[demo] stopping: agents, console, control plane")


def _quiet_ml_logs() -> None:
    """The converters log a lot at import and conversion time; the demo prints its own progress."""
    import logging
    import warnings

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("GLOG_minloglevel", "2")
    warnings.filterwarnings("ignore", module="ai_edge_litert")
    warnings.filterwarnings("ignore", module="torch")
    for name in ("torchao", "torch", "absl", "litert_torch", "ai_edge_quantizer"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _write_partitions(data_dir: Path, count: int, alpha: float) -> dict[str, Path]:
    """Each device gets its own non-IID share of the digits (Dirichlet alpha) under its data dir."""
    from federated.tasks import get_task

    task = get_task("digits")
    parts = task.partition(count, alpha=alpha, seed=0)
    paths = {}
    for i, part in enumerate(parts):
        device_id = _device_id(i)
        path = data_dir / "agents" / device_id / "data" / "partition.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        task.write_partition(part, path)
        paths[device_id] = path
        labels = sorted({int(v) for v in part.y})
        _say(f"[demo] {device_id}: {len(part.y)} local samples, labels {labels}")
    return paths


def _device_id(i: int) -> str:
    profile = DEMO_PROFILES[i % len(DEMO_PROFILES)]
    return f"demo-{i + 1:02d}-{profile}"


def _start_agents(api: httpx.Client, count: int, data_dir: Path, url: str,
                  partitions: dict[str, Path]) -> list[subprocess.Popen[bytes]]:
    procs = []
    for i in range(count):
        profile = DEMO_PROFILES[i % len(DEMO_PROFILES)]
        device_id = _device_id(i)
        response = api.post("/api/v1/devices", json={"device_id": device_id, "profile": profile,
                                                      "tags": ["demo", f"site-{i % 2}"]})
        response.raise_for_status()
        creds = response.json()
        env = dict(os.environ, EDGEFLEET_MQTT_PASSWORD=creds["mqtt_password"])
        log = open(data_dir / f"{device_id}.log", "wb")  # noqa: SIM115 - closed with the process
        args = [sys.executable, "-m", "controlplane._entry", "agent", "run", "--device-id", device_id,
                "--profile", profile, "--broker", creds["broker_url"], "--username", creds["mqtt_username"],
                "--data-dir", str(data_dir / "agents" / device_id), "--telemetry-interval", "1",
                "--power-source", "simulated", "--log-level", "info", "--controlplane", url,
                "--signing-key", creds["signing_public_key"]]
        if device_id in partitions:
            args += ["--data", str(partitions[device_id])]
        procs.append(subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT))
        _say(f"[demo] enrolled {device_id} ({profile}) and started its agent")
    return procs


def _centralized_accuracy(paths: list[Path]) -> float:
    import numpy as np

    from federated.tasks import Dataset
    from federated.tasks.digits import DEFAULT_EPOCHS, DigitsTask

    task = DigitsTask()
    parts = [task.load_partition(p) for p in paths]
    pooled = Dataset(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]))
    model = task.model()
    task.train(model, pooled, epochs=DEFAULT_EPOCHS, lr=task.default_lr, batch_size=task.default_batch_size)
    return round(float(task.evaluate(model, task.heldout())["accuracy"]), 4)


def _learn(api: httpx.Client, fleet: Fleet, *, rounds: int, strategy: str,
           partitions: dict[str, Path], burst: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    schedule: dict[str, Any] = {"id": "demo-nightly", "interval_s": 1, "max_runs": 1,
                "round": {"task": "digits", "strategy": strategy, "rounds": rounds, "min_clients": 2,
                          "local_epochs": 10, "learning_rate": 0.02, "round_timeout_s": 60, "deploy": True,
                          # Simulated batteries and links; and every "device" shares this machine's CPU, so
                          # the demo does not hold a busy CPU against them.
                          "eligibility": {"allow_metered": True, "min_battery_percent": 10,
                                          "max_cpu_percent": 100}}}
    if burst is not None:
        schedule["round"]["burst"] = {"kind": burst, "epochs": 3}
    api.post("/api/v1/schedules", json=schedule).raise_for_status()
    step = f", then a {burst} burst job" if burst else ""
    _say(f"[demo] schedule 'demo-nightly' created: {rounds} round(s) of {strategy}{step}, then build and roll out")
    record: dict[str, Any] = {}
    progress = Progress("[demo] round")
    while progress.elapsed() < 400:
        listed = api.get("/api/v1/rounds").json()
        if listed:
            record = listed[0]
            progress.label = f"[demo] round #{record['id']}"
            if RoundStatus(record["status"]).finished:
                break
            progress.update(round_progress(record))
        else:
            progress.update("waiting for the schedule to fire")
        time.sleep(2)
    progress.done(round_progress(record) if record else "the schedule did not fire")
    out["round_record"] = record
    skipped = record.get("skipped", {})
    if skipped:
        _say(f"[demo] not invited or dropped: {len(skipped)} of {len(skipped) + len(record.get('participants', []))}"
             f" device(s), by reason:")
        for line in summarize_skipped(skipped):
            _say(f"[demo] {line}")
    out["rounds"] = [{"round": m["round"], "accuracy": m.get("accuracy"), "loss": m.get("loss"),
                      "participants": m.get("participants", [])} for m in record.get("metrics", []) if m["round"] > 0]
    for r in out["rounds"]:
        _say(f"[demo]   round {r['round']}: accuracy {r['accuracy']:.3f} loss {r['loss']:.3f} "
             f"participants {len(r['participants'])}")
    # The comparison federated learning is held to: the same model trained centrally on the same data (the
    # participants' partitions pooled), evaluated on the same held-out set.
    participants = sorted(record.get("participants", []))
    if participants and partitions:
        out["centralized_accuracy"] = _centralized_accuracy([partitions[d] for d in participants if d in partitions])
        _say(f"[demo] centralised training on the participants' pooled data: {out['centralized_accuracy']:.4f}")
    if record.get("job_id") is not None:
        job = api.get(f"/api/v1/jobs/{record['job_id']}").json()
        out["burst_job"] = {k: job[k] for k in ("id", "kind", "status", "reason", "placement", "placement_reason",
                                                "metrics", "model_version")}
        _say(f"[demo] burst step: job {job['id']} {job['kind']} {job['status']} on {job['placement']} "
             f"({job['placement_reason']}); accuracy {job['metrics'].get('accuracy')}")
    if record.get("status") != RoundStatus.SUCCEEDED:
        _say(f"[demo] round failed: {record.get('reason')}")
        return out
    version = record["model_version"]
    out["model_version"] = version
    model = api.get(f"/api/v1/models/{version}").json()
    for v in model["variants"]:
        state = "published" if v["published"] else f"rejected: {v['reason']}"
        _say(f"[demo]   {version} {v['variant']:<12} {v['size_bytes'] or 0:>7} B  accuracy {v['accuracy']}  {state}")
    deployment: dict[str, Any] = {}
    progress = Progress("[demo] rollout")
    while progress.elapsed() < 180:
        deployments = api.get("/api/v1/deployments").json()
        if deployments:
            deployment = deployments[0]
            progress.label = f"[demo] rollout #{deployment['id']} of {version}"
            if deployment["status"] != DeploymentStatus.RUNNING:
                break
            progress.update(deployment_progress(deployment))
        else:
            progress.update("waiting for the rollout to start")
        time.sleep(2)
    out["deployment"] = deployment
    progress.done(deployment_progress(deployment) if deployment else "no rollout started")
    sizes = {v["variant"]: v for v in model["variants"]}
    profiles = {d["device_id"]: d["profile"] for d in api.get("/api/v1/devices").json()}
    variants = {}
    for target in deployment.get("targets", []):
        variant = target["variant"]
        if variant is not None:
            variants[profiles[target["device_id"]]] = {
                "profile": profiles[target["device_id"]], "variant": variant,
                "size_bytes": sizes[variant]["size_bytes"], "accuracy": sizes[variant]["accuracy"]}
    out["variants"] = list(variants.values())
    return out
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


def _fleet_table(api: httpx.Client, model_version: str | None = None) -> list[dict[str, Any]]:
    rows = []
    for d in api.get("/api/v1/devices").json():
        records = api.get(f"/api/v1/devices/{d['device_id']}/telemetry", params={"limit": 10000}).json()
        last = records[-1]["payload"] if records else {}
        state = d.get("reported_state") or {}
        active = state.get("active_model")
        inference = [r["payload"].get("inference") or {} for r in records]
        # On-device figures of the model the device runs now (after the rollout, if there was one).
        current = [i for i in inference if i.get("model_version") == active] or inference
        p50 = sorted(i["latency_p50_ms"] for i in current if i.get("latency_p50_ms") is not None)
        labelled = sum(i.get("labelled", 0) for i in current)
        rows.append({
            "device_id": d["device_id"],
            "profile": d["profile"],
            "online": d["online"],
            "runtime": f"{state.get('runtime')} {state.get('runtime_version')}",
            "model_version": active,
            "variant": state.get("active_variant"),
            "on_device_accuracy": round(sum(i.get("correct", 0) for i in current) / labelled, 4) if labelled else None,
            "p50_latency_ms": p50[len(p50) // 2] if p50 else None,
            "telemetry_records": len(records),
            "inferences": sum(i.get("count", 0) for i in inference),
            "battery_percent": (last.get("power") or {}).get("battery_percent"),
            "charging": (last.get("power") or {}).get("charging"),
            "power_source": (last.get("power") or {}).get("source"),
        })
    return rows


def _print_table(summary: dict[str, Any]) -> None:
    if summary.get("rounds") is not None:
        _say("")
        _say("ROUND  ACCURACY  LOSS    PARTICIPANTS")
        for r in summary["rounds"]:
            _say(f"{r['round']:<6} {r['accuracy']:<9.4f} {r['loss']:<7.4f} {len(r['participants'])}")
        if summary.get("centralized_accuracy") is not None and summary["rounds"]:
            final = summary["rounds"][-1]["accuracy"]
            gap = (summary["centralized_accuracy"] - final) * 100
            _say(f"centralised training on the same data: {summary['centralized_accuracy']:.4f} "
                 f"(federated is {abs(gap):.1f} points {'below' if gap > 0 else 'above'})")
    if summary.get("burst_job"):
        job = summary["burst_job"]
        accuracy = (job.get("metrics") or {}).get("accuracy")
        shown = f"{accuracy:.4f}" if isinstance(accuracy, float) else "-"
        _say(f"burst step: job {job['id']} {job['kind']} on {job['placement']}: {job['status']}, accuracy {shown} "
             f"-> {job.get('model_version')}")
    if summary.get("variants"):
        _say("")
        _say(f"{'PROFILE':<22} {'VARIANT':<13} {'SIZE B':>8} {'ACCURACY':>9}")
        for v in summary["variants"]:
            _say(f"{v['profile']:<22} {v['variant']:<13} {v['size_bytes']:>8} {v['accuracy']:>9}")
    keys = ["device_id", "profile", "model_version", "variant", "on_device_accuracy", "p50_latency_ms",
            "telemetry_records", "battery_percent"]
    heads = ["DEVICE", "PROFILE", "MODEL", "VARIANT", "ACCURACY", "P50 ms", "RECORDS", "BATT %"]
    widths = [max([len(h)] + [len(str(row[k])) for row in summary["devices"]]) for h, k in zip(heads, keys, strict=True)]
    _say("")
    _say("  ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True)).rstrip())
    for row in summary["devices"]:
        _say("  ".join(str(row[k]).ljust(w) for k, w in zip(keys, widths, strict=True)).rstrip())
    s = summary["ingest"]
    _say(f"\ningest: received {s['received']}, stored {s['stored']}, duplicates {s['duplicates']}, "
         f"dead letters {s['dead_letters'] or 'none'}   (battery/charging figures are simulated)")
    _say(f"demo wall time: {summary.get('wall_time_s')} s")
