"""Agent footprint: RSS and CPU of a real agent against a bare LiteRT process doing the same inference work.

    python bench/agent_footprint.py [--seconds 30] [--warmup 5] [--json PATH] [--no-imports]

* floor  `python -c ...`: imports ai_edge_litert.interpreter (and numpy), loads the starter model, allocates
         tensors and runs inference on one sample of the shipped digits data at 5 Hz (num_threads=1, as the
         agent loads it).
* agent  `python -m controlplane.cli agent run` (1 Hz telemetry, 5 Hz inference, simulated power) against a
         private mosquitto on a free port; mosquitto acks its QoS 1 publishes, no control plane needed.

Both run at the same time (the machine is shared and noisy: the ratio is what counts). After the warm-up, RSS
is sampled every 0.5 s (psutil); CPU % of one core = CPU time over the window / window length. The agent's
telemetry is received from the broker over the window as a check that it really worked (messages, inferences).

Unless --no-imports: what each import adds to a process that already holds the floor (numpy + LiteRT +
the loaded model), alone and cumulatively in the order the agent imports them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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

RSS_TARGET = 1.25
CPU_TARGET = 2.0
RATE_HZ = 5.0

FLOOR_SRC = r"""
import signal, sys, time
import numpy as np
from ai_edge_litert.interpreter import Interpreter

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
import numpy as np
from ai_edge_litert.interpreter import Interpreter
it = Interpreter(model_path=sys.argv[1], num_threads=1); it.allocate_tensors()
out = [("floor", rss())]
for stmt in json.loads(sys.argv[2]):
    exec(stmt)
    out.append((stmt, rss()))
print(json.dumps(out))
"""

# In the order `edgefleet agent run` pulls them in (controlplane/_entry.py -> agent/cli.py, then agent/_daemon.py
# and what it imports); "alone" measures each in a fresh floor process, "in agent order" what it adds after the
# ones above it (shared dependencies are counted once, where they first come in).
IMPORTS = [
    ("controlplane._entry + agent.cli (argparse)", "import controlplane._entry, agent.cli"),
    ("ssl (libssl/libcrypto; paho imports it)", "import ssl"),
    ("urllib.request (+ http, email; paho imports it)", "import urllib.request"),
    ("paho.mqtt.client (the rest of it)", "import paho.mqtt.client"),
    ("asyncio (structlog imports it)", "import asyncio"),
    ("rich.traceback (structlog.dev imports it if installed; not on an [agent] install)", "import rich.traceback"),
    ("structlog (the rest of it)", "import structlog"),
    ("msgspec + agent.protocol", "import agent.protocol"),
    ("sqlite3 (the outbox)", "import sqlite3"),
    ("psutil", "import psutil"),
    ("firmware_profiles (+ tomllib), one profile loaded",
     "import firmware_profiles; firmware_profiles.get_profile('raspberry-pi-5')"),
    ("agent._daemon, _outbox, _telemetry, runtime, logsetup",
     "import agent._daemon, agent._outbox, agent._telemetry, agent.runtime, agent.logsetup"),
]
# What an agent needs at the least with today's libraries (paho with ssl + urllib, msgspec, sqlite3, psutil,
# profiles, stdlib logging): no typer/click/rich, no structlog/asyncio. The agent's own modules and its running
# state are added from the measurements above (they import structlog, so they cannot be probed without it).
LEAN = ["import logging", "import paho.mqtt.client", "import agent.protocol", "import sqlite3", "import psutil",
        "import firmware_profiles; firmware_profiles.get_profile('raspberry-pi-5')"]
ALSO_ALONE = [("click alone", "import click"), ("rich alone (console + traceback)", "import rich.console, rich.traceback")]


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


# Diagnostic variant: `rich` blocked, i.e. what an `edgefleet[agent]` install runs (rich comes only with the
# control plane's typer; structlog.dev imports it when it is installed, as in a development venv).
BLOCK_RICH = "import sys; sys.modules['rich'] = None\n"
VIA_ENTRY = ("import sys, runpy; sys.argv = ['edgefleet', *sys.argv[1:]]; "
             "runpy.run_module('controlplane._entry', run_name='__main__')\n")


def agent_commands(port: int, workdir: Path, variants: bool) -> dict[str, list[str]]:
    """name -> argv of each agent process (device id = bench-<name>)."""
    def cli_args(name: str) -> list[str]:
        return ["agent", "run", "--device-id", f"bench-{name}", "--profile", "raspberry-pi-5",
                "--broker", f"mqtt://127.0.0.1:{port}", "--data-dir", str(workdir / name),
                "--telemetry-interval", "1", "--inference-rate", str(RATE_HZ), "--power-source", "simulated"]

    commands = {"agent": [sys.executable, "-m", "controlplane._entry", *cli_args("agent")]}
    if variants:
        commands["agent-norich"] = [sys.executable, "-c", BLOCK_RICH + VIA_ENTRY, *cli_args("agent-norich")]
    return commands


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
    broker = Mosquitto(workdir)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs: dict[str, Path] = {}
    results: dict[str, Any] = {}
    watcher, seen = telemetry_counter(broker.port)
    window = 0.0
    try:
        procs["floor"] = subprocess.Popen(
            [sys.executable, "-c", FLOOR_SRC, str(model), str(data), str(RATE_HZ)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,  # LiteRT's "XNNPACK delegate" line
        )
        for name, argv in agent_commands(broker.port, workdir, args.variants).items():
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


def import_costs(model: Path) -> dict[str, Any]:
    """MB each import adds on top of the floor: alone (fresh process each) and cumulative (agent order)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def probe(stmts: list[str]) -> list[tuple[str, float]]:
        out = subprocess.run([sys.executable, "-c", IMPORT_PROBE_SRC, str(model), json.dumps(stmts)],
                             check=True, capture_output=True, text=True, env=env, cwd=ROOT).stdout
        return [(s, float(v)) for s, v in json.loads(out)]

    alone = {}
    for label, stmt in IMPORTS + ALSO_ALONE:
        values = [probe([stmt]) for _ in range(3)]  # median of 3 fresh processes
        alone[label] = statistics.median(v[1][1] - v[0][1] for v in values)
    labels = {stmt: label for label, stmt in IMPORTS}
    runs = [probe([stmt for _, stmt in IMPORTS]) for _ in range(3)]
    cumulative = []
    for i, (stmt, _) in enumerate(runs[0][1:], start=1):
        adds = statistics.median(r[i][1] - r[i - 1][1] for r in runs)
        cumulative.append({"import": labels[stmt], "adds_mb": adds})
    lean = statistics.median(r[-1][1] - r[0][1] for r in (probe(LEAN) for _ in range(3)))
    return {
        "lean_imports_mb": lean,
        "floor_rss_mb": statistics.median(r[0][1] for r in runs),
        "all_imports_rss_mb": statistics.median(r[-1][1] for r in runs),
        "alone_mb": alone, "cumulative": cumulative,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="measurement window after the warm-up")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "agent_footprint.json")
    parser.add_argument("--no-imports", action="store_true", help="skip the per-import RSS analysis")
    parser.add_argument("--no-variants", dest="variants", action="store_false",
                        help="measure only floor and agent (no diagnostic agent variants)")
    args = parser.parse_args()

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
    print("(agent-norich: the same entry point with `rich` unimportable, as on an `edgefleet[agent]` install; "
          "* floor: total inferences / run time)")
    rss_ok = ratio_mean <= RSS_TARGET and ratio_max <= RSS_TARGET
    cpu_ok = agent["cpu_percent_of_core"] <= CPU_TARGET
    print(f"targets (agent): RSS <= {RSS_TARGET}x floor: {'met' if rss_ok else 'MISSED'} "
          f"({ratio_mean:.2f}x mean, {ratio_max:.2f}x max); CPU <= {CPU_TARGET}% of a core: "
          f"{'met' if cpu_ok else 'MISSED'} ({agent['cpu_percent_of_core']:.2f}%)")

    imports = None
    if not args.no_imports:
        imports = import_costs(starter_model_path())
        print(f"\nwhat imports add to a process holding the floor (numpy + LiteRT + model: "
              f"{imports['floor_rss_mb']:.1f} MB RSS); MB, median of 3 fresh processes:")
        print(f"  {'import':<58} {'alone':>6} {'in agent order':>15}")
        cumulative = {c["import"]: c["adds_mb"] for c in imports["cumulative"]}
        for label, mb in imports["alone_mb"].items():
            cum = f"{cumulative[label]:.1f}" if label in cumulative else "-"
            print(f"  {label:<58} {mb:>6.1f} {cum:>15}")
        total = imports["all_imports_rss_mb"] - imports["floor_rss_mb"]
        rest = (agent["rss_mb_mean"] - floor["rss_mb_mean"]) - total
        imports["runtime_state_mb"] = rest
        print(f"  {'all imports together':<58} {'':>6} {total:>15.1f}")
        print(f"  {'the rest: running agent state (agent - floor - imports)':<58} {'':>6} {rest:>15.1f}")
        own = cumulative[IMPORTS[-1][0]]
        lean = floor["rss_mb_mean"] + imports["lean_imports_mb"] + own + rest
        imports["lean_estimate_rss_mb"] = lean
        imports["lean_estimate_ratio"] = lean / floor["rss_mb_mean"]
        print(f"lean estimate (no typer/click/rich, stdlib logging instead of structlog/asyncio; paho, msgspec, "
              f"sqlite3, psutil kept): floor {floor['rss_mb_mean']:.1f} + imports {imports['lean_imports_mb']:.1f} + "
              f"agent modules {own:.1f} + state {rest:.1f} = {lean:.1f} MB = {lean / floor['rss_mb_mean']:.2f}x floor "
              f"(target {RSS_TARGET}x = {RSS_TARGET * floor['rss_mb_mean']:.1f} MB)")

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "benchmark": "agent_footprint", "seconds": args.seconds, "warmup_s": args.warmup, "inference_hz": RATE_HZ,
        "targets": {"rss_ratio": RSS_TARGET, "cpu_percent_of_core": CPU_TARGET},
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
