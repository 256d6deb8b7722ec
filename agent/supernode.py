"""Flower processes on the device side: a SuperNode for one device and the process plumbing it needs.

The control plane's side (SuperLink supervision, run submission) is in :mod:`federated.flower.runtime`, which
builds on this module (federated -> agent, never the other way). flwr itself is not imported here: a device
without ``flwr`` gets :class:`FlowerNotInstalled` from :func:`flower_executable`.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, Self

__all__ = [
    "FlowerNotInstalled",
    "SuperNodeProcess",
    "flower_env",
    "flower_executable",
    "free_port",
    "node_config_arg",
    "open_log",
    "terminate_group",
    "token_hiding_bin",
    "wait_healthy",
]

log = logging.getLogger("edgefleet.agent.flower")

TASK_POLL_INTERVAL_ENV: Final = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"


class FlowerNotInstalled(RuntimeError):
    """The Flower executables are not there: ``pip install 'edgefleet[train]'``."""



def flower_executable(name: str) -> str:
    """Path of a Flower console script: beside the running interpreter (its venv), else on ``PATH``."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    raise FlowerNotInstalled(f"{name} not found: flwr is not installed (install edgefleet[train])")


def flower_env(
    flwr_home: Path, extra: Mapping[str, str] | None = None, *, task_poll_interval_s: float | None = None,
    first_bin: Path | None = None,
) -> dict[str, str]:
    """The environment for a Flower process: our bin dir first on ``PATH`` (the SuperLink and SuperNode start
    ``flower-superexec``, ``flwr-serverapp`` and ``flwr-clientapp`` by name), ``FLWR_HOME``, telemetry off.
    ``first_bin`` goes before it (see :func:`token_hiding_bin`)."""
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    path = env.get("PATH", "")
    if bin_dir not in path.split(os.pathsep):
        env["PATH"] = path = f"{bin_dir}{os.pathsep}{path}" if path else bin_dir
    if first_bin is not None:
        env["PATH"] = f"{first_bin}{os.pathsep}{path}"
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env.setdefault("PYTHONUNBUFFERED", "1")
    if task_poll_interval_s is not None:
        env[TASK_POLL_INTERVAL_ENV] = f"{task_poll_interval_s:g}"
    if extra:
        env.update(extra)
    return env


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def node_config_arg(values: Mapping[str, str | int | float | bool]) -> str:
    """``--node-config`` value: ``key='text' n=3 flag=true`` (Flower parses it as TOML key/value pairs).

    Strings are single-quoted TOML literals, so they may contain spaces but no ``'`` and no line breaks.
    """
    parts: list[str] = []
    for key, value in values.items():
        if not key or not all(c.isalnum() or c in "-_" for c in key):
            raise ValueError(f"invalid node config key {key!r}")
        if isinstance(value, bool):
            parts.append(f"{key}={'true' if value else 'false'}")
        elif isinstance(value, int | float):
            parts.append(f"{key}={value!r}")
        else:
            text = str(value)
            if "'" in text or "\n" in text or "\r" in text:
                raise ValueError(f"node config {key!r}: {text!r} may contain neither ' nor line breaks")
            parts.append(f"{key}='{text}'")
    return " ".join(parts)


def token_hiding_bin(directory: Path) -> Path:
    """A bin directory holding a ``flower-superexec`` that starts each ServerApp / ClientApp with its run token in
    an in-memory file (``--token-file /dev/fd/N``) instead of ``--token <token>`` on its command line, which
    every user of the machine can read in the process list. Put it first on the Flower process's ``PATH``
    (``flower_env(first_bin=...)``): Flower starts ``flower-superexec`` by name. See :mod:`federated.flower.superexec` (run as a program, not imported: the agent imports no flwr)."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "flower-superexec"
    text = f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m federated.flower.superexec \"$@\"\n"
    if not script.is_file() or script.read_text() != text:
        tmp = directory / ".flower-superexec.tmp"
        tmp.write_text(text)
        tmp.chmod(0o755)
        tmp.replace(script)
    return directory


def wait_healthy(url: str, process: subprocess.Popen[bytes], timeout: float, *, ca_file: Path | None = None) -> bool:
    import ssl

    context = ssl.create_default_context(cafile=str(ca_file)) if ca_file is not None else None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=1.0, context=context) as response:
                if response.status == 200:
                    return True
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.1)
    return False


def _descendants(process: subprocess.Popen[bytes]) -> list[Any]:
    """The live descendants (psutil.Process) of a running ``process``; empty once it has ended."""
    import psutil

    if process.poll() is not None:
        return []
    try:
        children: list[Any] = psutil.Process(process.pid).children(recursive=True)
    except psutil.Error:
        return []
    return children


def _signal_group(process: subprocess.Popen[bytes], descendants: list[Any], sig: signal.Signals) -> None:
    """``sig`` to the process's group and to each descendant still the same process (psutil compares its start
    time, so a reused pid is left alone)."""
    import psutil

    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)
    for child in descendants:
        with contextlib.suppress(psutil.Error):
            child.send_signal(sig)


def kill_group(process: subprocess.Popen[bytes], descendants: list[Any] | None = None) -> None:
    """SIGKILL the process, its group and its descendants at once, as a power loss would."""
    _signal_group(process, _descendants(process) if descendants is None else descendants, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5.0)


def terminate_group(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM the process and its descendants, SIGKILL what is left after ``timeout``.

    Flower detaches some of its children (the SuperLink starts ``flower-superexec`` in a session of its own,
    which starts the ServerApp), so the process group alone is not enough: the descendants are found (psutil)
    while the process still runs.
    """
    import psutil

    descendants = _descendants(process)
    if process.poll() is None:
        _signal_group(process, descendants, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=timeout)
        psutil.wait_procs(descendants, timeout=max(0.0, min(timeout, 1.0)))
    kill_group(process, descendants)


def open_log(path: Path | None) -> IO[bytes] | int:
    if path is None:
        return subprocess.DEVNULL
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "ab")


# -------------------------------------------------------------------------------------------- SuperNode


class SuperNodeProcess:
    """``flower-supernode`` for one device: ``device-id`` and ``data-path`` (and optionally ``round-id`` and
    ``status-path``, see :mod:`federated.flower.client_app`) in its node config.

    ``isolation="subprocess"`` (Flower's default): the SuperNode starts its own ``flower-superexec``, which
    starts a ``flwr-clientapp`` process per message. ``"process"``: the SuperNode does not, and this class
    starts that ``flower-superexec`` beside it (same result, but the executor can be placed and limited
    separately). Each SuperNode serves its ClientApps on a Runtime API port of its own (``runtime_port``).
    """

    def __init__(
        self,
        superlink: str,
        *,
        device_id: str,
        data_path: Path,
        flwr_home: Path,
        round_id: str = "",
        status_path: Path | None = None,
        isolation: str = "subprocess",
        runtime_port: int | None = None,
        log_path: Path | None = None,
        env: Mapping[str, str] | None = None,
        max_wait_time_s: float | None = None,
        task_poll_interval_s: float | None = None,
        extra_node_config: Mapping[str, str | int | float | bool] | None = None,
        root_certificates: Path | None = None,
        auth_key_file: Path | None = None,
        tls: bool | None = None,
    ) -> None:
        """``tls``: HTTPS to the SuperLink, verified with ``root_certificates`` (else the system store); default:
        whether ``root_certificates`` is given. ``auth_key_file``: the device's SuperNode key (TLS only)."""
        if isolation not in ("subprocess", "process"):
            raise ValueError(f"isolation must be 'subprocess' or 'process', got {isolation!r}")
        self.tls = root_certificates is not None if tls is None else tls
        if not self.tls and (auth_key_file is not None or root_certificates is not None):
            raise ValueError("root certificates and a SuperNode key are used over TLS only")
        self.root_certificates = root_certificates
        self.auth_key_file = auth_key_file
        self.superlink = superlink
        self.device_id = device_id
        self.data_path = Path(data_path)
        self.flwr_home = Path(flwr_home)
        self.round_id = round_id
        self.status_path = status_path
        self.isolation = isolation
        self.runtime_port = runtime_port or free_port()
        self.log_path = log_path
        self.extra_env = dict(env or {})
        self.max_wait_time_s = max_wait_time_s
        self.task_poll_interval_s = task_poll_interval_s
        config: dict[str, str | int | float | bool] = {"device-id": device_id, "data-path": str(self.data_path)}
        if round_id:
            config["round-id"] = round_id
        if status_path is not None:
            config["status-path"] = str(status_path)
        config.update(extra_node_config or {})
        self.node_config = node_config_arg(config)
        self._process: subprocess.Popen[bytes] | None = None
        self._executor: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | int | None = None

    @property
    def runtime_address(self) -> str:
        return f"127.0.0.1:{self.runtime_port}"

    def command(self) -> list[str]:
        if not self.tls:
            security = ["--insecure"]
        else:
            # TLS to the SuperLink, verified against the fleet CA (or the system store); the SuperNode's own
            # Runtime API (its ClientApps, on loopback) stays plaintext: flwr uses TLS there only with --ssl-*
            # files of its own.
            security = [] if self.root_certificates is None else ["--root-certificates", str(self.root_certificates)]
            if self.auth_key_file is not None:
                security += ["--auth-supernode-private-key", str(self.auth_key_file)]
        cmd = [
            flower_executable("flower-supernode"),
            *security,
            "--superlink", self.superlink,
            "--node-config", self.node_config,
            "--isolation", self.isolation,
            "--port", str(self.runtime_port),
        ]
        if self.max_wait_time_s is not None:
            cmd += ["--max-wait-time", f"{self.max_wait_time_s:g}"]
        return cmd

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._process.poll() if self._process is not None else None

    def start(self) -> Self:
        if self.alive:
            return self
        executable = flower_executable("flower-supernode")  # FlowerNotInstalled before anything else
        del executable
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self._log_file = open_log(self.log_path)
        env = flower_env(self.flwr_home, self.extra_env, task_poll_interval_s=self.task_poll_interval_s,
                         first_bin=token_hiding_bin(self.flwr_home / "bin"))
        self._process = subprocess.Popen(
            self.command(), env=env, cwd=self.flwr_home, stdin=subprocess.DEVNULL,
            stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )
        if self.isolation == "process":
            self._executor = subprocess.Popen(
                [sys.executable, "-m", "federated.flower.superexec", "--insecure", "--runtime-api-address",
                 self.runtime_address, "--parent-pid", str(self._process.pid)],
                env=env, cwd=self.flwr_home, stdin=subprocess.DEVNULL, stdout=self._log_file,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        atexit.register(self.stop)  # do not leave a SuperNode behind if our process exits without stop()
        log.info("supernode.started device_id=%s superlink=%s pid=%s", self.device_id, self.superlink,
                 self._process.pid)
        return self

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit code, or None if still running after ``timeout`` seconds."""
        if self._process is None:
            return None
        try:
            return self._process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (the SuperNode says goodbye to the SuperLink), then SIGKILL whatever is left."""
        atexit.unregister(self.stop)
        if self._process is not None:
            terminate_group(self._process, timeout)
        if self._executor is not None:
            terminate_group(self._executor, 5.0)
        self._close_log()

    def kill(self) -> None:
        """SIGKILL the SuperNode and its ClientApps at once, as a power loss would (no goodbye)."""
        atexit.unregister(self.stop)
        for process in (self._executor, self._process):
            if process is not None:
                kill_group(process)
        self._close_log()

    def _close_log(self) -> None:
        if self._log_file is not None and not isinstance(self._log_file, int):
            self._log_file.close()
        self._log_file = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
