"""Helpers shared by the benchmarks: a private mosquitto (the system one is never touched) and the repository root.

Ports and child processes come from ``tests/processes.py``, the one copy the tests use too. bench/ is a folder of
scripts, not a package: the import-direction rules (tests/test_packaging.py) bind the shipped packages, which never
import tests/ or bench/. That module is standard library only, so a benchmark does not pull in pytest.
"""

from __future__ import annotations

import contextlib
import getpass
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Below the sys.path line: run as `python bench/x.py`, the repository root is not importable before it.
from tests import processes
from tests.processes import free_port, port_open, stop_process, wait_for_port

__all__ = ["ROOT", "Mosquitto", "free_port", "mosquitto_binary", "port_open"]


def mosquitto_binary() -> str:
    found = processes.mosquitto_binary()
    if found is None:
        sys.exit("mosquitto not found (apt-get install mosquitto)")
    return found


class Mosquitto:
    """A private, anonymous mosquitto on a free port, persistence off; with ``tls=(ca, cert, key)`` (PEM files) also
    an MQTT-over-TLS listener on ``tls_port``."""

    def __init__(self, workdir: Path, *, tls: tuple[Path, Path, Path] | None = None) -> None:
        self.port = free_port()
        self.tls_port = free_port() if tls else None
        self.workdir = workdir
        self.config = workdir / f"mosquitto-{self.port}.conf"
        tls_listener = ""
        if tls:
            ca, cert, key = tls
            tls_listener = f"listener {self.tls_port} 127.0.0.1\ncafile {ca}\ncertfile {cert}\nkeyfile {key}\n"
        self.config.write_text(
            # As root mosquitto would drop to the `mosquitto` user; stay who we are.
            f"user {getpass.getuser()}\nper_listener_settings false\nallow_anonymous true\npersistence false\n"
            # Without these the broker drops QoS 1 messages queued for a slow subscriber.
            "max_queued_messages 100000\nmax_inflight_messages 1000\n"
            f"listener {self.port} 127.0.0.1\n{tls_listener}"
        )
        self.log = open(workdir / f"mosquitto-{self.port}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen([mosquitto_binary(), "-c", str(self.config)], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        if not all(wait_for_port("127.0.0.1", port, 10.0, self.proc) for port in (self.port, self.tls_port) if port):
            self.stop()
            raise RuntimeError(f"mosquitto did not start on {self.port}: see {self.log.name}")

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
        stop_process(self.proc)
        self.log.close()
