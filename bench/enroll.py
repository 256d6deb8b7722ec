"""Bulk enrolment and broker reconnect at fleet scale (issue 10 §3), ours against the code before the rework.

    python bench/enroll.py [--devices 10000] [--clients 8] [--baseline-devices 300]
                           [--baseline-ref REF | --no-baseline] [--ours-first] [--connect-window 32] [--json PATH]

Each side runs `edgefleet controlplane serve` in a subprocess on a fresh data dir (SQLite, embedded broker):

* enrol      C client threads (httpx, one connection each) POST /api/v1/devices with an admin token (from
             `edgefleet tokens create --role admin`) until N devices are enrolled. Clock: first request -> last
             response. Per request latency; ms per device over the first and the last 10% of the fleet (does
             enrolment slow down as the fleet grows?).
* reconnect  every enrolled device opens a real MQTT 3.1.1 connection to the embedded broker with its own
             credentials (client id = username = device id, clean session), from one asyncio process with raw
             sockets: CONNECT, read CONNACK (must be 0 "accepted"); at most --connect-window handshakes in flight
             (amqtt's listener has asyncio's default accept backlog). Every connection stays open until all are
             connected. Clock: first CONNECT -> last CONNACK.

The baseline is the same two steps against the tree at --baseline-ref (git archive into a temp dir, run with this
venv): PBKDF2-SHA512 at 100k iterations on every enrolment and every CONNECT, the JSON credentials file rewritten
whole per enrolment, the database write lock held across the broker call. It runs at a smaller N
(--baseline-devices): at 10,000 it would take many minutes. Ratios compare rates of the same invocation.
Any commit can be the baseline: `--baseline-ref COMMIT --baseline-devices 10000` measures one change at full N
(alternate with --ours-first: which side runs first gets a different share of shared cores).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from _common import ROOT, free_port, port_open

# The last commit before the rework (issue 10 §3): PBKDF2 per CONNECT, JSON credentials file.
BASELINE_REF = "f0fcc30"
ENROL_TARGET_S = 120.0  # 10,000 devices
RECONNECT_TARGET_S = 30.0  # 10,000 devices
PROFILE = "raspberry-pi-5"


@dataclass
class Result:
    side: str  # "ours" | "baseline"
    step: str  # "enrol" | "reconnect"
    devices: int
    seconds: float
    failures: int = 0
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    first_ms_per_device: float = 0.0
    last_ms_per_device: float = 0.0
    cpu_s_server: float = 0.0  # the control plane and its embedded broker
    cpu_s_client: float = 0.0  # this process (HTTP clients, or the MQTT load generator)
    still_open: int | None = None  # reconnect: connections the broker still held open once all were connected

    @property
    def rate(self) -> float:
        return self.devices / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        if not self.latencies_ms:
            return 0.0
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("latencies_ms")
        data.update(rate_per_s=round(self.rate, 1), p50_ms=round(self.pct(0.5), 2), p99_ms=round(self.pct(0.99), 2),
                    max_ms=round(max(self.latencies_ms, default=0.0), 2))
        return data


# --------------------------------------------------------------------------------------------- control plane


class ControlPlane:
    """`edgefleet controlplane serve` from ``tree`` (the repository, or a checkout of the baseline)."""

    def __init__(self, tree: Path, workdir: Path) -> None:
        self.tree = tree
        self.data_dir = workdir / "cp"
        self.port, self.broker_port = free_port(), free_port()
        self.env = {**os.environ, "PYTHONPATH": str(tree), "EDGEFLEET_LOG_LEVEL": "warning"}
        self.log = open(workdir / "serve.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "controlplane._entry", "controlplane", "serve", "--port", str(self.port),
             "--data-dir", str(self.data_dir), "--embedded-broker-port", str(self.broker_port),
             "--log-level", "warning"],
            cwd=tree, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 90
        while not (port_open("127.0.0.1", self.port) and port_open("127.0.0.1", self.broker_port)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"control plane did not start: see {self.log.name}")
            time.sleep(0.2)
        created = subprocess.run(
            [sys.executable, "-m", "controlplane._entry", "tokens", "create", "--role", "admin", "--name", "bench",
             "--data-dir", str(self.data_dir)],
            cwd=tree, env=self.env, capture_output=True, text=True, check=True,
        )
        self.token = created.stdout.strip().splitlines()[-1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cpu_s(self) -> float:
        """CPU seconds of the control plane and its children (the embedded broker) so far."""
        import psutil

        total = 0.0
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(self.proc.pid)
            for p in [proc, *proc.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    total += t.user + t.system
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def baseline_tree(ref: str, workdir: Path) -> Path:
    tree = workdir / "baseline-tree"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


# --------------------------------------------------------------------------------------------------- enrol


def _csrs(ids: list[str]) -> list[str]:
    """What each device sends with a provisioning enrolment: a CSR for a key made on the device (made here
    before the clock starts: on a real fleet each device spends that CPU itself)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    return [x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
            .sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())
            .public_bytes(serialization.Encoding.PEM).decode() for device_id in ids]


def enrol(cp: ControlPlane, side: str, n: int, clients: int, prefix: str,
          via: str = "api") -> tuple[Result, dict[str, str]]:
    """``via``: ``api`` (an admin token, POST /api/v1/devices) or ``provisioning`` (one provisioning token for N
    devices, each POST /api/v1/enroll with its own CSR: the production path, a client certificate signed per
    device)."""
    import httpx

    ids = [f"{prefix}-{i:05d}" for i in range(n)]
    csrs = _csrs(ids) if via == "provisioning" else []
    path = "/api/v1/enroll" if via == "provisioning" else "/api/v1/devices"
    token = cp.token
    if via == "provisioning":
        created = httpx.post(f"{cp.url}/api/v1/provisioning-tokens", headers={"Authorization": f"Bearer {token}"},
                             json={"profile": PROFILE, "tags": ["bench"], "max_uses": n, "expires_in_s": 86400})
        created.raise_for_status()
        token = created.json()["token"]
    done_at: list[float] = [0.0] * n  # monotonic time each device's enrolment returned
    latencies: list[float] = [0.0] * n
    passwords: dict[str, str] = {}
    failures: list[str] = []
    lock = threading.Lock()
    next_index = iter(range(n))
    headers = {"Authorization": f"Bearer {token}"}

    def worker() -> None:
        with httpx.Client(base_url=cp.url, headers=headers, timeout=120) as client:
            while True:
                with lock:
                    i = next(next_index, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                body = ({"device_id": ids[i], "csr": csrs[i]} if via == "provisioning"
                        else {"device_id": ids[i], "profile": PROFILE, "tags": ["bench"]})
                response = client.post(path, json=body)
                latencies[i] = (time.perf_counter() - t0) * 1000
                done_at[i] = time.monotonic()
                if response.status_code != 201:
                    with lock:
                        failures.append(f"{ids[i]}: {response.status_code} {response.text[:200]}")
                    continue
                body = response.json()
                with lock:
                    passwords[body["mqtt_username"]] = body["mqtt_password"]

    cpu0, client0 = cp.cpu_s(), time.process_time()
    start = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.monotonic() - start
    if failures:
        print(f"  {side} enrol: {len(failures)} failure(s), first: {failures[0]}", file=sys.stderr)
    # Throughput over the first and the last tenth of the fleet, by completion order.
    ends = sorted(done_at)
    tenth = max(1, n // 10)
    first = (ends[tenth - 1] - start) / tenth * 1000
    last = (ends[-1] - ends[-tenth - 1]) / tenth * 1000 if n > tenth else first
    return Result(side, "enrol", n, seconds, len(failures), latencies, first, last, cp.cpu_s() - cpu0,
                  time.process_time() - client0), passwords


# ----------------------------------------------------------------------------------------------- reconnect


def _mqtt_string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("!H", len(data)) + data


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def connect_packet(username: str, password: str, keep_alive: int = 300) -> bytes:
    """MQTT 3.1.1 CONNECT: clean session, username + password, client id = username."""
    flags = 0x80 | 0x40 | 0x02
    variable = _mqtt_string("MQTT") + bytes([4, flags]) + struct.pack("!H", keep_alive)
    payload = _mqtt_string(username) + _mqtt_string(username) + _mqtt_string(password)
    body = variable + payload
    return bytes([0x10]) + _remaining_length(len(body)) + body


async def _reconnect_all(host: str, port: int, creds: dict[str, str], window: int,
                         release: asyncio.Event) -> tuple[float, list[float], list[str], int]:
    sem = asyncio.Semaphore(window)
    latencies: list[float] = []
    failures: list[str] = []
    writers: list[asyncio.StreamWriter] = []
    connected = 0
    all_connected = asyncio.Event()
    total = len(creds)

    async def one(username: str, password: str) -> None:
        nonlocal connected
        async with sem:
            t0 = time.perf_counter()
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 60)
                writer.write(connect_packet(username, password))
                connack = await asyncio.wait_for(reader.readexactly(4), 60)
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                failures.append(f"{username}: {exc!r}")
                return
            latencies.append((time.perf_counter() - t0) * 1000)
        writers.append(writer)
        if connack[0] != 0x20 or connack[3] != 0:
            failures.append(f"{username}: CONNACK {connack.hex()}")
            return
        connected += 1
        if connected + len(failures) >= total:
            all_connected.set()

    start = time.monotonic()
    tasks = [asyncio.create_task(one(u, p)) for u, p in creds.items()]
    await asyncio.gather(*tasks)
    seconds = time.monotonic() - start
    # Every connection stayed open until here: count them still open (the broker must not have closed any).
    await asyncio.sleep(0.5)
    still_open = sum(1 for w in writers if not w.is_closing() and not w.transport.is_closing())
    for w in writers:
        w.close()
    with contextlib.suppress(Exception):
        await asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)
    return seconds, latencies, failures, still_open


def reconnect(cp: ControlPlane, side: str, creds: dict[str, str], window: int) -> Result:
    cpu0, client0 = cp.cpu_s(), time.process_time()
    seconds, latencies, failures, still_open = asyncio.run(
        _reconnect_all("127.0.0.1", cp.broker_port, creds, window, asyncio.Event()))
    if failures:
        print(f"  {side} reconnect: {len(failures)} failure(s), first: {failures[0]}", file=sys.stderr)
    n = len(creds)
    result = Result(side, "reconnect", n, seconds, len(failures), latencies, cpu_s_server=cp.cpu_s() - cpu0,
                    cpu_s_client=time.process_time() - client0, still_open=still_open)
    if still_open < n - len(failures):
        print(f"  {side} reconnect: only {still_open} of {n} connections still open at the end", file=sys.stderr)
    return result


# ---------------------------------------------------------------------------------------------------- main


def run_side(side: str, tree: Path, n: int, clients: int, window: int, via: str = "api") -> list[Result]:
    with tempfile.TemporaryDirectory(prefix=f"edgefleet-bench-enroll-{side}-") as tmp:
        cp = ControlPlane(tree, Path(tmp))
        try:
            print(f"{side}: enrolling {n} devices with {clients} clients via {via} ...", flush=True)
            enrolled, creds = enrol(cp, side, n, clients, f"bench-{side[:4]}", via)
            print(f"  {enrolled.seconds:.1f} s ({enrolled.rate:.0f}/s)", flush=True)
            print(f"{side}: reconnecting {len(creds)} devices to the embedded broker ...", flush=True)
            reconnected = reconnect(cp, side, creds, window)
            print(f"  {reconnected.seconds:.1f} s ({reconnected.rate:.0f}/s)", flush=True)
            return [enrolled, reconnected]
        finally:
            cp.stop()


def table(results: list[Result], targets: dict[str, float], n_target: int) -> str:
    head = (f"{'side':8} | {'step':9} | {'devices':>7} | {'seconds':>7} | {'per s':>6} | {'p50 ms':>7} | "
            f"{'p99 ms':>7} | {'max ms':>8} | {'ms/dev first 10%':>16} | {'last 10%':>8} | {'fail':>4} | "
            f"{'cpu ms/dev srv, cli':>19} | ratio vs baseline")
    lines = [head, "-" * len(head)]
    base = {r.step: r for r in results if r.side == "baseline"}
    for r in results:
        ratio = f"{r.rate / base[r.step].rate:.1f}x" if r.step in base and base[r.step].rate else "-"
        first = f"{r.first_ms_per_device:.2f}" if r.step == "enrol" else "-"
        last = f"{r.last_ms_per_device:.2f}" if r.step == "enrol" else "-"
        lines.append(f"{r.side:8} | {r.step:9} | {r.devices:7} | {r.seconds:7.1f} | {r.rate:6.0f} | "
                     f"{r.pct(0.5):7.1f} | {r.pct(0.99):7.1f} | {max(r.latencies_ms, default=0):8.1f} | "
                     f"{first:>16} | {last:>8} | {r.failures:4} | "
                     f"{f'{r.cpu_s_server / r.devices * 1000:.2f}, {r.cpu_s_client / r.devices * 1000:.2f}':>19} | {ratio}")
    lines.append(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end")
    for r in results:
        if r.side == "ours" and r.step in targets:
            limit = targets[r.step] * r.devices / n_target
            met = r.seconds < limit and r.failures == 0
            lines.append(f"target {r.step}: {n_target} devices in < {targets[r.step]:.0f} s "
                         f"(scaled to {r.devices}: < {limit:.1f} s): {'met' if met else 'NOT met'}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=8, help="concurrent HTTP clients (threads)")
    parser.add_argument("--baseline-devices", type=int, default=300)
    parser.add_argument("--baseline-ref", default=BASELINE_REF, help="git ref of the code before the rework")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--ours-first", action="store_true",
                        help="run this tree before the baseline (alternate invocations: the 2 cores' load drifts)")
    parser.add_argument("--via", choices=["provisioning", "api"], default="provisioning",
                        help="how this tree's devices enrol: a provisioning token + CSR per device (POST "
                             "/api/v1/enroll, the production path) or the admin API (POST /api/v1/devices); the "
                             "baseline has only the admin API")
    parser.add_argument("--connect-window", type=int, default=32, help="MQTT handshakes in flight at once")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "enroll.json")
    args = parser.parse_args()

    results: list[Result] = []
    if args.ours_first:
        results += run_side("ours", ROOT, args.devices, args.clients, args.connect_window, args.via)
    if not args.no_baseline:
        with tempfile.TemporaryDirectory(prefix="edgefleet-bench-enroll-tree-") as tmp:
            tree = baseline_tree(args.baseline_ref, Path(tmp))
            results += run_side("baseline", tree, args.baseline_devices, args.clients, args.connect_window)
            shutil.rmtree(tree, ignore_errors=True)
    if not args.ours_first:
        results += run_side("ours", ROOT, args.devices, args.clients, args.connect_window, args.via)

    targets = {"enrol": ENROL_TARGET_S, "reconnect": RECONNECT_TARGET_S}
    text = table(results, targets, 10_000)
    text += (f"\nours enrolled via {args.via}"
             + (" (a provisioning token for N devices, a CSR per device, a client certificate signed for each)"
                if args.via == "provisioning" else " (admin API)") + "; the baseline via the admin API")
    print()
    print(text)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "bench": "enroll",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_avg": os.getloadavg()},
        "args": {k: str(v) for k, v in vars(args).items()},
        "results": [r.summary() for r in results],
        "ratios_vs_baseline": {o.step: round(o.rate / b.rate, 2) for o in results for b in results
                               if o.side == "ours" and b.side == "baseline" and o.step == b.step and b.rate},
        "median_latency_ms": {f"{r.side}-{r.step}": round(statistics.median(r.latencies_ms), 2)
                              for r in results if r.latencies_ms},
        "table": text,
    }, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
