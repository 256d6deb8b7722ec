"""Ports and child processes, for the tests and the benchmarks: the one copy of these helpers.

Standard library only and no pytest, because ``bench/`` imports it too (a benchmark runs without the test
dependencies). A public module name because it is imported from outside ``tests/`` (``bench/_common.py``);
``tests/_services.py`` and ``tests/conftest.py`` re-export it for the test modules.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

__all__ = ["free_port", "mosquitto_binary", "port_open", "stop_process", "wait_for_port"]

_SBIN = ("/usr/sbin", "/usr/local/sbin")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether ``host:port`` accepts a TCP connection now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(
    host: str, port: int, timeout: float, process: subprocess.Popen[bytes] | None = None
) -> bool:
    """Wait until ``host:port`` accepts TCP connections; False on timeout or as soon as ``process`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            return False
        if port_open(host, port, timeout=0.5):
            return True
        time.sleep(0.05)
    return False


def stop_process(process: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds; reaps the child either way."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def mosquitto_binary() -> str | None:
    """The mosquitto executable (on PATH or in an sbin that is not on a user's PATH), or None."""
    return shutil.which("mosquitto") or next(
        (p for p in (f"{d}/mosquitto" for d in _SBIN) if os.access(p, os.X_OK)), None
    )
