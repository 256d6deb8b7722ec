"""Helpers shared by the benchmarks: free ports and a private mosquitto (the system one is never touched)."""

from __future__ import annotations

import contextlib
import getpass
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

__all__ = ["ROOT", "Mosquitto", "free_port", "mosquitto_binary", "port_open"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if found is None:
        sys.exit("mosquitto not found (apt-get install mosquitto)")
    return found


class Mosquitto:
    """A private, anonymous mosquitto on a free port, persistence off."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.config = workdir / f"mosquitto-{self.port}.conf"
        self.config.write_text(
            # As root mosquitto would drop to the `mosquitto` user; stay who we are.
            f"user {getpass.getuser()}\nlistener {self.port} 127.0.0.1\nallow_anonymous true\n"
            "persistence false\n"
            # Without these the broker drops QoS 1 messages queued for a slow subscriber.
            "max_queued_messages 100000\nmax_inflight_messages 1000\n"
        )
        self.log = open(workdir / f"mosquitto-{self.port}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen([mosquitto_binary(), "-c", str(self.config)], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while not port_open(self.port):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"mosquitto did not start on {self.port}: see {self.log.name}")
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}?protocol=5"

    def cpu_s(self) -> float:
        import psutil

        with contextlib.suppress(psutil.Error):
            t = psutil.Process(self.proc.pid).cpu_times()
            return float(t.user + t.system)
        return 0.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
