"""Agent footprint: RSS and CPU of a real agent against a bare LiteRT process doing the same inference work.

    python bench/agent_footprint.py [--seconds 30] [--warmup 5] [--json PATH] [--no-imports] [--no-variants]
                                    [--python PATH]

Both processes run from a device install: a venv with only ``pip install -e '.[agent]'`` (``.venv-agent``,
built on first use; ``--python`` names another interpreter), and MQTT goes over TLS (the fleet's default):

* floor  ``python -c ...``: imports ai_edge_litert.interpreter, numpy and ssl (with a default TLS context, as any
         MQTT-over-TLS device holds), loads the starter model, allocates tensors and runs inference on one sample
         of the shipped digits data at 5 Hz (num_threads=1, as the agent loads it).
* agent  ``python -m controlplane._entry agent run`` (1 Hz telemetry, 5 Hz inference, simulated power) against a
         private mosquitto's TLS listener on a free port (a CA and server certificate made for the run, trusted
         through ``SSL_CERT_FILE``); mosquitto acks its QoS 1 publishes, no control plane needed.
* agent-devvenv (unless --no-variants): the same agent from the development venv (rich, structlog, typer installed).

All run at the same time (the machine is shared and noisy: the ratio is what counts). After the warm-up, RSS
is sampled every 0.5 s (psutil); CPU % of one core = CPU time over the window / window length. The agents'
telemetry is received from the broker over the window as a check that they really worked (messages, inferences).

Unless --no-imports: what each import adds to a process that already holds the floor (numpy + LiteRT + ssl + the
loaded model), alone and cumulatively in the order the agent imports them, in the device venv.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _common import ROOT, Mosquitto

RSS_TARGET = 1.3
CPU_TARGET = 2.0
RATE_HZ = 5.0

FLOOR_SRC = r"""
import signal, ssl, sys, time
import numpy as np
from ai_edge_litert.interpreter import Interpreter

tls = ssl.create_default_context()  # what any device speaking MQTT over TLS holds

model, data, rate = sys.argv[1], sys.argv[2], float(sys.argv[3])
interpreter = Interpreter(model_path=model, num_threads=1)
interpreter.allocate_tensors()
inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
with np.load(data) as npz:
    x = (npz["x"].astype(np.float32) / 16.0).astype(inp["dtype"])
count, stop = 0, False

def _stop(*_):
    global stop
    stop = True

signal.signal(signal.SIGTERM, _stop)
deadline = time.monotonic()
while not stop:
    interpreter.set_tensor(inp["index"], x[count % len(x)][None, :])
    interpreter.invoke()
    interpreter.get_tensor(out["index"])
    count += 1
    deadline += 1.0 / rate
    time.sleep(max(0.0, deadline - time.monotonic()))
print(count, flush=True)
"""

# RSS of a process that holds the floor, then after each import (one run per line of IMPORTS, and one cumulative).
IMPORT_PROBE_SRC = r"""
import json, os, sys
def rss():
    with open(f"/proc/{os.getpid()}/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
import ssl
import numpy as np
from ai_edge_litert.interpreter import Interpreter
tls = ssl.create_default_context()
it = Interpreter(model_path=sys.argv[1], num_threads=1); it.allocate_tensors()
out = [("floor", rss())]
for stmt in json.loads(sys.argv[2]):
    try:
        exec(stmt)
    except ImportError:
        out.append((stmt, None))
        continue
    out.append((stmt, rss()))
print(json.dumps(out))
"""

# In the order `edgefleet agent run` pulls them in (controlplane/_entry.py -> agent/cli.py, then agent/_daemon.py
# and what it imports); "alone" measures each in a fresh floor process, "in agent order" what it adds after the
# ones above it (shared dependencies are counted once, where they first come in).
IMPORTS = [
    ("controlplane._entry + agent.cli (argparse) + agent.logsetup", "import controlplane._entry, agent.cli, agent.logsetup"),
    ("urllib.request (+ http, email; paho imports it)", "import urllib.request"),
    ("paho.mqtt.client (the rest of it)", "import paho.mqtt.client"),
    ("msgspec + agent.protocol", "import agent.protocol"),
    ("sqlite3 (the outbox)", "import sqlite3"),
    ("psutil", "import psutil"),
    ("firmware_profiles (+ tomllib), one profile loaded",
     "import firmware_profiles; firmware_profiles.get_profile('raspberry-pi-5')"),
    ("agent._daemon and the modules it imports", "import agent._daemon"),
]
# Not imported by the agent any more (for reference; None where not installed in the venv measured).
ALSO_ALONE = [("structlog (imports asyncio; the control plane's logging)", "import structlog"),
              ("asyncio alone", "import asyncio"),
              ("rich alone (console + traceback)", "import rich.console, rich.traceback")]


def sample_process(pid: int, seconds: float, warmup: float, stop: threading.Event) -> dict[str, Any]:
    import psutil

    proc = psutil.Process(pid)
    if stop.wait(warmup):
        return {}
    t0, c0 = time.monotonic(), proc.cpu_times()
    rss, uss, pss, threads = [], [], [], []
    end = t0 + seconds
    while not stop.is_set() and time.monotonic() < end:
        mem = proc.memory_full_info()
        rss.append(mem.rss / 2**20)
        uss.append(mem.uss / 2**20)
        pss.append(mem.pss / 2**20)
        threads.append(proc.num_threads())
        stop.wait(0.5)
    t1, c1 = time.monotonic(), proc.cpu_times()
    cpu = (c1.user + c1.system) - (c0.user + c0.system)
    return {
        "samples": len(rss),
        "rss_mb_mean": statistics.fmean(rss), "rss_mb_max": max(rss), "rss_mb_min": min(rss),
        "uss_mb_mean": statistics.fmean(uss), "pss_mb_mean": statistics.fmean(pss),
        "threads": max(threads),
        "cpu_percent_of_core": 100.0 * cpu / (t1 - t0),
        "cpu_s": cpu, "window_s": t1 - t0,
    }


def agent_commands(tls_port: int, workdir: Path, device_python: str, variants: bool) -> dict[str, list[str]]:
    """name -> argv of each agent process (device id = bench-<name>)."""
    def cli_args(name: str) -> list[str]:
        return ["agent", "run", "--device-id", f"bench-{name}", "--profile", "raspberry-pi-5",
                "--broker", f"mqtts://127.0.0.1:{tls_port}", "--data-dir", str(workdir / name),
                "--telemetry-interval", "1", "--inference-rate", str(RATE_HZ), "--power-source", "simulated"]

    commands = {"agent": [device_python, "-m", "controlplane._entry", *cli_args("agent")]}
    if variants:
        commands["agent-devvenv"] = [sys.executable, "-m", "controlplane._entry", *cli_args("agent-devvenv")]
    return commands


def fleet_pki(workdir: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it (PEM files: ca, cert, key), made for this run."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgefleet bench CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = (workdir / "ca.pem", workdir / "server.pem", workdir / "server.key")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


def device_python(requested: str | None) -> str:
    """The interpreter of a device install: ``requested``, else ``.venv-agent`` (``pip install -e '.[agent]'``,
    built here on first use and again when pyproject.toml is newer than it)."""
    if requested:
        return requested
    venv = ROOT / ".venv-agent"
    stamp = venv / ".installed"
    if not stamp.exists() or stamp.stat().st_mtime < (ROOT / "pyproject.toml").stat().st_mtime:
        print(f"building the device venv {venv} (pip install -e '.[agent]') ...", flush=True)
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run(["python3.11", "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "--disable-pip-version-check", "-q", "install", "-e",
                        f"{ROOT}[agent]"], check=True)
        stamp.touch()
    return str(venv / "bin" / "python")


def telemetry_counter(port: int) -> tuple[Any, dict[str, Any]]:
    """Counts every agent's telemetry (messages, bytes, reported inferences) while `counting` is set."""
    import paho.mqtt.client as mqtt

    from agent import protocol as wire

    seen: dict[str, Any] = {"counting": False}

    def on_message(c: Any, u: Any, msg: Any) -> None:
        t = wire.decode(msg.payload, wire.Telemetry)
        if seen["counting"]:
            tally = seen.setdefault(t.device_id, {"messages": 0, "bytes": 0, "inferences": 0})
            tally["messages"] += 1
            tally["bytes"] += len(msg.payload)
            tally["inferences"] += t.inference.count if t.inference else 0

    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="bench-footprint-watch",
                         protocol=mqtt.MQTTv5)
    client.on_message = on_message
    client.on_connect = lambda c, u, f, r, p: c.subscribe(wire.subscription(wire.Channel.TELEMETRY), qos=1)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client, seen


def run_processes(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from agent.runtime import DEFAULT_DATA_RESOURCE, starter_model_path

    model = starter_model_path()
    data = ROOT / DEFAULT_DATA_RESOURCE[0].replace(".", "/") / DEFAULT_DATA_RESOURCE[1]
    ca, cert, key = fleet_pki(workdir)
    broker = Mosquitto(workdir, tls=(ca, cert, key))
    assert broker.tls_port is not None
    # The agent's TLS client trusts the system store, which OpenSSL reads from SSL_CERT_FILE when it is set.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SSL_CERT_FILE": str(ca)}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs: dict[str, Path] = {}
    results: dict[str, Any] = {}
    watcher, seen = telemetry_counter(broker.port)
    window = 0.0
    try:
        procs["floor"] = subprocess.Popen(
            [args.python, "-c", FLOOR_SRC, str(model), str(data), str(RATE_HZ)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,  # LiteRT's "XNNPACK delegate" line
        )
        for name, argv in agent_commands(broker.tls_port, workdir, args.python, args.variants).items():
            logs[name] = workdir / f"{name}.log"
            with open(logs[name], "wb") as log:
                procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        stop = threading.Event()
        samplers: dict[str, threading.Thread] = {}
        for name, proc in procs.items():
            def target(name: str = name, pid: int = proc.pid) -> None:
                results[name] = sample_process(pid, args.seconds, args.warmup, stop)
            samplers[name] = threading.Thread(target=target, daemon=True)
            samplers[name].start()
        time.sleep(args.warmup)
        seen["counting"] = True
        t0 = time.monotonic()
        for thread in samplers.values():
            thread.join(args.seconds + 30)
        seen["counting"] = False
        window = time.monotonic() - t0
        for name, proc in procs.items():
            if proc.poll() is not None:
                tail = logs[name].read_text(errors="replace")[-2000:] if name in logs else ""
                raise RuntimeError(f"{name} exited early with {proc.returncode}:\n{tail}")
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        floor_count = None
        for name, proc in procs.items():
            try:
                if name == "floor":
                    out, _ = proc.communicate(timeout=10)
                    floor_count = int(out.decode().split()[-1])
                else:
                    proc.wait(10)
            except (subprocess.TimeoutExpired, ValueError, IndexError):
                proc.kill()
                proc.wait()
        watcher.disconnect()
        watcher.loop_stop()
        broker.stop()
    results = {name: results[name] for name in procs}
    for name in procs:
        if name == "floor":
            results[name]["inferences_per_s"] = None
            results[name]["inferences_total"] = floor_count
            continue
        tally = seen.get(f"bench-{name}", {"messages": 0, "bytes": 0, "inferences": 0})
        results[name]["telemetry_messages_in_window"] = tally["messages"]
        results[name]["telemetry_bytes_mean"] = tally["bytes"] / tally["messages"] if tally["messages"] else None
        results[name]["inferences_per_s"] = tally["inferences"] / window if window else None
        results[name]["log_tail"] = logs[name].read_text(errors="replace").splitlines()[-3:]
    return results


def import_costs(model: Path, python: str) -> dict[str, Any]:
    """MB each import adds on top of the floor: alone (fresh process each) and cumulative (agent order)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def probe(stmts: list[str]) -> list[tuple[str, float | None]]:
        out = subprocess.run([python, "-c", IMPORT_PROBE_SRC, str(model), json.dumps(stmts)],
                             check=True, capture_output=True, text=True, env=env, cwd=ROOT).stdout
        return [(s, None if v is None else float(v)) for s, v in json.loads(out.splitlines()[-1])]

    def adds(before: float | None, after: float | None) -> float | None:
        return None if before is None or after is None else after - before

    alone: dict[str, float | None] = {}
    for label, stmt in IMPORTS + ALSO_ALONE:
        values = [adds(v[0][1], v[1][1]) for v in (probe([stmt]) for _ in range(3))]  # median of 3 processes
        alone[label] = None if None in values else statistics.median(v for v in values if v is not None)
    labels = {stmt: label for label, stmt in IMPORTS}
    runs = [probe([stmt for _, stmt in IMPORTS]) for _ in range(3)]
    cumulative = []
    for i, (stmt, _) in enumerate(runs[0][1:], start=1):
        steps = [adds(r[i - 1][1], r[i][1]) for r in runs]
        cumulative.append({"import": labels[stmt],
                           "adds_mb": None if None in steps else statistics.median(v for v in steps if v is not None)})
    return {
        "floor_rss_mb": statistics.median(float(r[0][1] or 0.0) for r in runs),
        "all_imports_rss_mb": statistics.median(float(r[-1][1] or 0.0) for r in runs),
        "alone_mb": alone, "cumulative": cumulative,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="measurement window after the warm-up")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "agent_footprint.json")
    parser.add_argument("--no-imports", action="store_true", help="skip the per-import RSS analysis")
    parser.add_argument("--no-variants", dest="variants", action="store_false",
                        help="measure only floor and agent (not the agent from the development venv too)")
    parser.add_argument("--python", help="interpreter of a device install (default: .venv-agent, built if missing)")
    args = parser.parse_args()
    args.python = device_python(args.python)

    from agent.runtime import starter_model_path

    print(f"agent footprint: {args.warmup:.0f} s warm-up, {args.seconds:.0f} s window, both processes at once; "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="edgefleet-footprint-") as tmp:
        results = run_processes(args, Path(tmp))
    floor, agent = results["floor"], results["agent"]
    ratio_mean = agent["rss_mb_mean"] / floor["rss_mb_mean"]
    ratio_max = agent["rss_mb_max"] / floor["rss_mb_max"]
    header = (f"{'process':<20} | {'RSS MB mean':>11} | {'RSS MB max':>10} | {'USS MB':>6} | {'CPU % of a core':>15} | "
              f"{'ratio RSS vs floor':>18} | {'telemetry msgs':>14} | {'inferences/s':>12}")
    print()
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        ratio = r["rss_mb_mean"] / floor["rss_mb_mean"]
        r["rss_ratio_mean"], r["rss_ratio_max"] = ratio, r["rss_mb_max"] / floor["rss_mb_max"]
        msgs = r.get("telemetry_messages_in_window", "-")
        ips = f"{r['inferences_per_s']:.2f}" if r.get("inferences_per_s") is not None else \
            f"{(r.get('inferences_total') or 0) / (args.warmup + args.seconds):.2f}*"
        print(f"{name:<20} | {r['rss_mb_mean']:>11.1f} | {r['rss_mb_max']:>10.1f} | {r['uss_mb_mean']:>6.1f} | "
              f"{r['cpu_percent_of_core']:>15.2f} | {ratio:>17.2f}x | {msgs:>14} | {ips:>12}")
    print(f"(floor and agent: {args.python}, a device install; agent-devvenv: the development venv; MQTT over TLS; "
          "* floor: total inferences / run time)")
    rss_ok = ratio_mean <= RSS_TARGET and ratio_max <= RSS_TARGET
    cpu_ok = agent["cpu_percent_of_core"] <= CPU_TARGET
    print(f"targets (agent): RSS <= {RSS_TARGET}x floor: {'met' if rss_ok else 'MISSED'} "
          f"({ratio_mean:.2f}x mean, {ratio_max:.2f}x max); CPU <= {CPU_TARGET}% of a core: "
          f"{'met' if cpu_ok else 'MISSED'} ({agent['cpu_percent_of_core']:.2f}%)")

    imports = None
    if not args.no_imports:
        imports = import_costs(starter_model_path(), args.python)
        print(f"\nwhat imports add to a device-venv process holding the floor (numpy + LiteRT + ssl + model: "
              f"{imports['floor_rss_mb']:.1f} MB RSS); MB, median of 3 fresh processes:")
        print(f"  {'import':<58} {'alone':>6} {'in agent order':>15}")
        cumulative = {c["import"]: c["adds_mb"] for c in imports["cumulative"]}

        def mb(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.1f}"

        for label, value in imports["alone_mb"].items():
            cum = mb(cumulative[label]) if label in cumulative else "-"
            print(f"  {label:<58} {mb(value):>6} {cum:>15}")
        total = imports["all_imports_rss_mb"] - imports["floor_rss_mb"]
        rest = (agent["rss_mb_mean"] - floor["rss_mb_mean"]) - total
        imports["runtime_state_mb"] = rest
        print(f"  {'all imports together':<58} {'':>6} {total:>15.1f}")
        print(f"  {'the rest: running agent state (agent - floor - imports)':<58} {'':>6} {rest:>15.1f}")
        print("  (n/a: not installed in the device venv)")

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "benchmark": "agent_footprint", "seconds": args.seconds, "warmup_s": args.warmup, "inference_hz": RATE_HZ,
        "targets": {"rss_ratio": RSS_TARGET, "cpu_percent_of_core": CPU_TARGET},
        "device_python": args.python, "mqtt": "TLS (mqtts://, server verified against a CA made for the run)",
        "rss_ratio_mean": ratio_mean, "rss_ratio_max": ratio_max, "rss_target_met": rss_ok, "cpu_target_met": cpu_ok,
        "processes": results, "imports": imports,
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(), "load_avg_at_end": os.getloadavg()},
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
