"""A real network for tests: Linux network namespaces, one per host, joined by veth pairs to a bridge.

The bridge sits in a namespace of its own (the "switch"), so nothing in the test network can reach the machine's
own interfaces (its mosquitto and PostgreSQL on 127.0.0.1 included) and no packet leaves it. Each host has ``lo``
and ``eth0`` with a private address in 10.66.0.0/24; processes run in a host with ``ip netns exec``, from the
project's venv, as real ``edgefleet`` processes would on their own machines. There is no ``netem`` on these kernels:
a partition is the host's switch port set down (:meth:`Host.partition`), healing sets it up again; a slow link is a
token bucket (``tc ... tbf``) on that port (:meth:`Host.throttle`).

Needs root and iproute2 (``ip``). For humans::

    sudo python -m tests.netns up cp dev1 dev2 outsider     # prints each host's namespace and address
    # the control plane on its network address: beyond loopback, TLS is on (HTTPS; MQTTS on 8883) with the fleet CA
    sudo ip netns exec ef-<id>-cp .venv/bin/edgefleet controlplane serve --host 10.66.0.10 --data-dir /tmp/cp
    sudo ip netns exec ef-<id>-dev1 .venv/bin/edgefleet agent run --broker mqtts://10.66.0.10:8883 \
        --ca-file /tmp/cp/pki/ca-bundle.pem --controlplane https://10.66.0.10:8080 ...
    sudo python -m tests.netns down <id>

Standard library only (no pytest): tests/_services.py wraps it in a fixture.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

__all__ = ["Host", "Network", "cannot_build"]

SUBNET = "10.66.0"
_FIRST_HOST = 10


def cannot_build() -> str | None:
    """Why a test network cannot be built here (not root, no iproute2, no netns support), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    probe = f"ef-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


def _tc(netns: str, *args: str) -> None:
    result = subprocess.run(["ip", "netns", "exec", netns, "tc", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"tc {' '.join(args)} (in {netns}): {result.stderr.strip()}")


@dataclass
class Host:
    """One machine of the test network: a namespace with ``eth0`` at ``address``."""

    name: str
    netns: str
    address: str
    port: str  # the switch-side end of this host's cable
    switch: str  # the switch's namespace
    processes: list[subprocess.Popen[Any]] = field(default_factory=list)

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this host."""
        return ["ip", "netns", "exec", self.netns, *argv]

    def popen(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
              log: Path | None = None) -> subprocess.Popen[bytes]:
        """Start ``argv`` on this host (stdout and stderr to ``log``, else discarded); stopped with the network."""
        out: IO[bytes] | int = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115
        try:
            process = subprocess.Popen(self.argv(argv), env=dict(env) if env is not None else None, stdout=out,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            if not isinstance(out, int):
                out.close()  # the child holds its own descriptor
        self.processes.append(process)
        return process

    def run(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float = 60.0,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` on this host to completion; its output as text."""
        return subprocess.run(self.argv(argv), env=dict(env) if env is not None else None, capture_output=True,
                              text=True, timeout=timeout, check=check)

    def python(self, code: str, *args: str, env: Mapping[str, str] | None = None,
               timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run a Python snippet with the project's interpreter on this host (``check=False``: read returncode)."""
        return self.run([sys.executable, "-c", code, *args], env=env, timeout=timeout, check=False)

    def partition(self) -> None:
        """Unplug this host's cable: nothing reaches it, nothing leaves it, until :meth:`heal`."""
        _ip("-n", self.switch, "link", "set", self.port, "down")

    def heal(self) -> None:
        _ip("-n", self.switch, "link", "set", self.port, "up")

    def throttle(self, kbit_s: int) -> None:
        """Slow what reaches this host to ``kbit_s`` (a token bucket on its switch port: no netem needed), e.g. so
        that a download lasts long enough to be cut; :meth:`unthrottle` lifts it."""
        _tc(self.switch, "qdisc", "replace", "dev", self.port, "root", "tbf", "rate", f"{kbit_s}kbit",
            "burst", "16kb", "latency", "2s")

    def unthrottle(self) -> None:
        _tc(self.switch, "qdisc", "del", "dev", self.port, "root")

    def stop_processes(self, timeout: float = 15.0) -> None:
        for process in self.processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in self.processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)
        self.processes.clear()


class Network:
    """Hosts ``names`` on one switch; ``with Network([...]) as net: net["cp"].address``."""

    def __init__(self, names: Iterable[str], *, run_id: str | None = None) -> None:
        self.run_id = run_id or f"{os.getpid() % 100000}"
        self.switch = f"ef-{self.run_id}-switch"
        self.hosts: dict[str, Host] = {}
        for i, name in enumerate(names):
            if not name.isidentifier() or len(name) > 20:
                raise ValueError(f"host name {name!r}: letters, digits and _ only, at most 20 characters")
            self.hosts[name] = Host(name=name, netns=f"ef-{self.run_id}-{name}", address=f"{SUBNET}.{_FIRST_HOST + i}",
                                    port=f"ef{self.run_id}s{i}", switch=self.switch)
        if len(self.hosts) > 200:
            raise ValueError("at most 200 hosts")

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def up(self) -> Self:
        try:
            _ip("netns", "add", self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for i, host in enumerate(self.hosts.values()):
                _ip("netns", "add", host.netns)
                _ip("-n", host.netns, "link", "set", "lo", "up")
                cable = f"ef{self.run_id}h{i}"
                _ip("link", "add", cable, "type", "veth", "peer", "name", host.port)
                _ip("link", "set", cable, "netns", host.netns)
                _ip("link", "set", host.port, "netns", self.switch)
                _ip("-n", host.netns, "link", "set", cable, "name", "eth0")
                _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
                _ip("-n", host.netns, "link", "set", "eth0", "up")
                _ip("-n", self.switch, "link", "set", host.port, "master", "br0")
                _ip("-n", self.switch, "link", "set", host.port, "up")
        except Exception:
            self.down()
            raise
        return self

    def down(self) -> None:
        """Stop every process started on a host and remove the namespaces (which removes their cables)."""
        for host in self.hosts.values():
            host.stop_processes()
        for netns in [h.netns for h in self.hosts.values()] + [self.switch]:
            pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, check=False)
            for pid in pids.stdout.split():  # anything still running in it (a SuperNode a test left)
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", netns], capture_output=True, check=False)

    def __enter__(self) -> Self:
        return self.up()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.down()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.netns", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="build a test network and leave it up")
    up.add_argument("hosts", nargs="+", help="host names, e.g. cp dev1 dev2 outsider")
    down = commands.add_parser("down", help="remove a test network built with `up`")
    down.add_argument("run_id")
    down.add_argument("hosts", nargs="*", help="its host names (default: every ef-<run_id>-* namespace)")
    args = parser.parse_args(argv)
    why = cannot_build()
    if why:
        parser.exit(2, f"error: {why}\n")
    if args.command == "up":
        net = Network(args.hosts).up()
        print(f"test network {net.run_id} (switch namespace {net.switch}):")
        for host in net.hosts.values():
            print(f"  {host.name:<12} {host.address:<12} ip netns exec {host.netns} ...")
        print(f"remove it with: python -m tests.netns down {net.run_id}")
        return 0
    names = args.hosts or [n.split()[0].removeprefix(f"ef-{args.run_id}-") for n in
                           subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                          check=True).stdout.splitlines()
                           if n.startswith(f"ef-{args.run_id}-") and not n.split()[0].endswith("-switch")]
    Network(names, run_id=args.run_id).down()
    print(f"test network {args.run_id} removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
