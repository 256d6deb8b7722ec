"""agent.sdnotify: the datagrams systemd's notify socket receives (a real Unix datagram socket stands in for it)."""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.sdnotify import Notifier


@pytest.fixture(name="notify_socket")
def fx_notify_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A bound datagram socket, as systemd's; yields ($NOTIFY_SOCKET, the socket)."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(2)
        yield str(path), sock


def test_ready_status_and_stopping_reach_the_socket(notify_socket: tuple[str, socket.socket]) -> None:
    # Prepare
    path, sock = notify_socket
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path})
    # Execute
    sent = [notifier.ready("online"), notifier.status("backoff"), notifier.stopping()]
    # Assert
    assert sent == [True, True, True]
    assert [sock.recv(4096) for _ in sent] == [b"READY=1\nSTATUS=online", b"STATUS=backoff", b"STOPPING=1"]


def test_an_abstract_socket_address_works() -> None:
    # Prepare: systemd names abstract sockets with a leading @
    name = f"edgefleet-test-{secrets.token_hex(6)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        # Execute
        sent = Notifier.from_env({"NOTIFY_SOCKET": "@" + name}).ready()
        # Assert
        assert sent
        assert sock.recv(4096) == b"READY=1"


def test_the_watchdog_is_fed_at_half_its_interval(notify_socket: tuple[str, socket.socket]) -> None:
    # Prepare: WatchdogSec=10 for this process
    path, sock = notify_socket
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "10000000",
                                  "WATCHDOG_PID": str(os.getpid())})
    # Execute
    sent = [notifier.watchdog_if_due(now) for now in (100.0, 101.0, 104.9, 105.0, 106.0, 110.0)]
    # Assert
    assert notifier.watchdog_s == 10.0
    assert sent == [True, False, False, True, False, True]
    assert [sock.recv(4096) for _ in range(3)] == [b"WATCHDOG=1"] * 3


def test_outside_systemd_or_for_another_pid_nothing_is_sent() -> None:
    # Execute
    bare = Notifier.from_env({})
    other_pid = Notifier.from_env({"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "1000000",
                                   "WATCHDOG_PID": str(os.getpid() + 1)})
    gone = Notifier.from_env({"NOTIFY_SOCKET": "/nonexistent/notify"})
    # Assert: no socket, no watchdog for a child that inherited the variables, a dead socket is not an error
    assert (bare.enabled, bare.ready(), bare.watchdog_if_due()) == (False, False, False)
    assert other_pid.watchdog_s is None
    assert gone.ready() is False


@pytest.mark.integration
@pytest.mark.slow
def test_a_real_agent_is_ready_pings_the_watchdog_and_says_it_stops(notify_socket: tuple[str, socket.socket],
                                                                    tmp_path: Path) -> None:
    """What the installed unit (Type=notify, WatchdogSec=) relies on, from the agent process itself: READY once it
    runs (with its broker unreachable: the outbox keeps telemetry), WATCHDOG pings from its loop, STOPPING on
    SIGTERM."""
    import signal
    import subprocess
    import sys
    import time

    from tests._services import free_port

    # Prepare: a 2 s watchdog, a broker port nobody listens on
    path, sock = notify_socket
    env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"}
    env.pop("WATCHDOG_PID", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", "--device-id", "notify-1", "--profile", "raspberry-pi-5",
         "--broker", f"mqtt://127.0.0.1:{free_port()}", "--data-dir", str(tmp_path / "agent")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Execute / Assert
        sock.settimeout(60)
        assert sock.recv(4096) == b"READY=1"
        sock.settimeout(5)
        started = time.monotonic()
        pings = [sock.recv(4096) for _ in range(3)]
        assert pings == [b"WATCHDOG=1"] * 3
        assert time.monotonic() - started < 4.5  # every ~1 s: half the watchdog interval
        proc.send_signal(signal.SIGTERM)
        received = b""
        while received != b"STOPPING=1":
            received = sock.recv(4096)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
