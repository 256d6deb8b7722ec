"""Flower 1.41 deployment processes and run submission, without Litestar and without importing flwr up front.

* :class:`SuperLinkProcess` (control plane): ``flower-superlink --insecure`` supervised (restarted when it dies),
  with ``FLWR_HOME`` under a data dir, telemetry off and runtime dependency installation disabled. In Flower
  1.41 one HTTP port carries the Fleet API (SuperNodes), the Control API (run submission) and the Runtime API
  (the ServerApp), so there is one port to pick.
* :func:`submit_run` / :func:`wait_run` / :func:`run_status` / :func:`stop_run`: the Control API from Python,
  built the way ``flwr run`` builds its request (FAB from the app directory, ``StartRunRequest`` with the run
  config overrides); the ``flwr`` CLI itself is not used.
* :class:`SuperNodeProcess` (device agent, tests, benchmarks): ``flower-supernode`` for one device, with its
  node config (``device-id``, ``data-path``, ...), until stopped.

flwr is imported inside the functions that need it: the agent imports this module to spawn a SuperNode on
devices where ``flwr`` may be missing (:func:`flower_executable` then raises :class:`FlowerNotInstalled`).

Security: ``--insecure`` means plain HTTP and, in Flower 1.41, no authentication of Control API callers: anyone
who reaches the SuperLink's port can submit a run, i.e. run code on the SuperLink host and on every connected
SuperNode. Bind it to a private network (``host``) or put TLS and SuperNode authentication in front of it.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, Self

from agent.supernode import (
    FlowerNotInstalled,
    SuperNodeProcess,
    flower_env,
    flower_executable,
    free_port,
    node_config_arg,
    open_log,
    terminate_group,
    wait_healthy,
)
from federated.flower.config import APP_DIR, DEFAULT_RUN_CONFIG

__all__ = [
    "FlowerControlError",
    "FlowerNotInstalled",
    "RunStatus",
    "SuperLinkProcess",
    "SuperNodeProcess",
    "build_fab",
    "flower_env",
    "flower_executable",
    "free_port",
    "node_config_arg",
    "online_nodes",
    "run_logs",
    "run_status",
    "stop_run",
    "submit_run",
    "wait_run",
]

log = logging.getLogger("edgefleet.federated.flower")

_LOCAL_HOSTS: Final = ("0.0.0.0", "::", "")


class FlowerControlError(RuntimeError):
    """The SuperLink's Control API refused a request or could not be reached."""


@dataclass(frozen=True)
class RunStatus:
    """A run as the SuperLink sees it: ``status`` pending | starting | running | finished; ``sub_status``
    completed | failed | stopped once finished; ``details``: Flower's failure details."""

    run_id: int
    status: str
    sub_status: str = ""
    details: str = ""

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    @property
    def completed(self) -> bool:
        return self.finished and self.sub_status == "completed"


# ------------------------------------------------------------------------------------------------- helpers


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in _LOCAL_HOSTS else host


# ----------------------------------------------------------------------------------------- Control API


def build_fab(app: Path | str | bytes | None = None) -> bytes:
    """A FAB: ``None`` -> the EdgeFleet app (``federated/flower/app``); a directory -> built like ``flwr build``;
    a ``.fab`` file or bytes -> as they are."""
    if isinstance(app, bytes):
        return app
    path = Path(app) if app is not None else APP_DIR
    if path.is_file():
        return path.read_bytes()
    from flwr.cli.build import build_fab_from_disk

    fab: bytes = build_fab_from_disk(path)
    return fab


def _control_client(address: str) -> Any:
    try:
        from flwr.supercore.control import ControlHttpClient
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    except ImportError as exc:
        raise FlowerNotInstalled(f"flwr is not installed (install edgefleet[train]): {exc}") from exc
    # What `flwr run` builds (flwr.cli.utils.init_http_client_from_connection), minus CLI account auth.
    return ControlHttpClient.from_server_address(
        server_address=address,
        insecure=True,
        root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr CLI")],
    )


def _call(address: str, method: str, request: Any) -> Any:
    import httpx

    client = _control_client(address)
    try:
        return getattr(client, method)(request)
    except httpx.HTTPStatusError as exc:
        raise FlowerControlError(
            f"Control API {method} at {address}: HTTP {exc.response.status_code}: {exc.response.text.strip()}"
        ) from exc
    except httpx.HTTPError as exc:
        raise FlowerControlError(f"Control API {method} at {address}: {exc}") from exc
    finally:
        client.close()


def submit_run(
    control_address: str,
    app: Path | str | bytes | None = None,
    run_config: Mapping[str, str | int | float | bool] | None = None,
    *,
    federation: str = "",
) -> int:
    """Start a run on the SuperLink at ``control_address`` (``host:port``); returns Flower's run id.

    ``app``: see :func:`build_fab`. ``run_config`` overrides the app's ``[tool.flwr.app.config]`` defaults;
    for the EdgeFleet app unknown keys raise ValueError here (Flower would fail the run later).
    """
    from flwr.common.serde import fab_to_proto, user_config_to_proto
    from flwr.proto.control_pb2 import StartRunRequest
    from flwr.supercore.fab import Fab

    overrides = dict(run_config or {})
    if app is None:
        unknown = sorted(set(overrides) - set(DEFAULT_RUN_CONFIG))
        if unknown:
            raise ValueError(f"unknown run config key(s) {', '.join(unknown)}; known: {', '.join(DEFAULT_RUN_CONFIG)}")
    for key, value in overrides.items():
        if not isinstance(value, str | int | float | bool):
            raise TypeError(f"run config {key!r}: {type(value).__name__} is not a bool, int, float or str")
    fab_bytes = build_fab(app)
    fab = Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})
    request = StartRunRequest(
        fab=fab_to_proto(fab), override_config=user_config_to_proto(overrides), federation=federation
    )
    response = _call(control_address, "StartRun", request)
    if not response.HasField("run_id"):
        note = response.note if response.HasField("note") else "no run id in the answer"
        raise FlowerControlError(f"the SuperLink did not start the run: {note}")
    return int(response.run_id)


def run_status(control_address: str, run_id: int) -> RunStatus:
    """The run's status; raises :class:`FlowerControlError` if the SuperLink does not know it."""
    from flwr.proto.control_pb2 import ListRunsRequest

    response = _call(control_address, "ListRuns", ListRunsRequest(run_id=run_id))
    if run_id not in response.run_dict:
        raise FlowerControlError(f"run {run_id} is unknown to the SuperLink at {control_address}")
    status = response.run_dict[run_id].status
    return RunStatus(run_id, status.status, status.sub_status, status.details)


def wait_run(control_address: str, run_id: int, timeout: float, poll_interval_s: float = 0.5) -> RunStatus:
    """Block until the run is finished; TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        status = run_status(control_address, run_id)
        if status.finished:
            return status
        if time.monotonic() >= deadline:
            raise TimeoutError(f"run {run_id} not finished after {timeout:g}s (status {status.status})")
        time.sleep(poll_interval_s)


def run_logs(control_address: str, run_id: int) -> str:
    """The ServerApp's log output of a run so far (what ``flwr log`` prints)."""
    import httpx
    from flwr.proto.control_pb2 import StreamLogsRequest

    client = _control_client(control_address)
    try:
        for response in client.StreamLogs(StreamLogsRequest(run_id=run_id, after_timestamp=0.0)):
            return str(response.log_output)
        return ""
    except httpx.HTTPError as exc:
        raise FlowerControlError(f"Control API StreamLogs at {control_address}: {exc}") from exc
    finally:
        client.close()


def online_nodes(control_address: str) -> list[int]:
    """Node ids of the SuperNodes the SuperLink currently sees online (a SIGKILLed one stays "online" until it
    misses its heartbeats, ~1 min with Flower's defaults)."""
    from flwr.proto.control_pb2 import ListNodesRequest

    response = _call(control_address, "ListNodes", ListNodesRequest())
    return sorted(int(n.node_id) for n in response.nodes_info if n.status == "online")


def stop_run(control_address: str, run_id: int) -> bool:
    from flwr.proto.control_pb2 import StopRunRequest

    return bool(_call(control_address, "StopRun", StopRunRequest(run_id=run_id)).success)


# -------------------------------------------------------------------------------------------- SuperLink


class SuperLinkProcess:
    """A supervised ``flower-superlink --insecure``: started, health-checked, restarted when it dies, stopped.

    ``host`` is where the SuperLink listens (Fleet, Control and Runtime API share ``port``); SuperNodes on
    other machines need it on a reachable interface. With ``database=None`` the SuperLink keeps its state in
    memory: a restart forgets runs in progress (SuperNodes reconnect by themselves).
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        isolation: str = "subprocess",
        database: Path | None = None,
        env: Mapping[str, str] | None = None,
        supervise: bool = True,
        startup_timeout_s: float = 60.0,
        task_poll_interval_s: float | None = None,
        log_path: Path | None = None,
    ) -> None:
        if isolation not in ("subprocess", "process"):
            raise ValueError(f"isolation must be 'subprocess' or 'process', got {isolation!r}")
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port or free_port(_client_host(host))
        self.isolation = isolation
        self.database = database
        self.extra_env = dict(env or {})
        self.supervise = supervise
        self.startup_timeout_s = startup_timeout_s
        self.task_poll_interval_s = task_poll_interval_s
        self.log_path = log_path or self.data_dir / "superlink.log"
        self.restarts = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | int | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None

    # -- addresses ----------------------------------------------------------------------------------------
    @property
    def address(self) -> str:
        """``host:port`` for SuperNodes and Control API calls on this machine."""
        return f"{_client_host(self.host)}:{self.port}"

    @property
    def health_url(self) -> str:
        return f"http://{self.address}/health"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # -- lifecycle ----------------------------------------------------------------------------------------
    def command(self) -> list[str]:
        cmd = [
            flower_executable("flower-superlink"),
            "--insecure",
            "--host", self.host,
            "--port", str(self.port),
            "--isolation", self.isolation,
            "--disable-runtime-dependency-installation",
        ]
        if self.database is not None:
            cmd += ["--database", str(self.database)]
        return cmd

    def _spawn(self) -> subprocess.Popen[bytes]:
        flwr_home = self.data_dir / "flwr-home"
        flwr_home.mkdir(parents=True, exist_ok=True)
        if self._log_file is None:
            self._log_file = open_log(self.log_path)
        env = flower_env(flwr_home, self.extra_env, task_poll_interval_s=self.task_poll_interval_s)
        process = subprocess.Popen(
            self.command(), env=env, cwd=self.data_dir, stdin=subprocess.DEVNULL,
            stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )
        if not wait_healthy(self.health_url, process, self.startup_timeout_s):
            code = process.poll()
            terminate_group(process, 5.0)
            raise RuntimeError(
                f"flower-superlink on {self.address} did not become healthy within {self.startup_timeout_s:g}s"
                f" (exit code {code}); see {self.log_path}"
            )
        return process

    def start(self) -> Self:
        with self._lock:
            if self.alive:
                return self
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self._stopping.clear()
            self._process = self._spawn()
            atexit.register(self.stop)  # the SuperLink runs in a session of its own: do not leave it behind
            log.info("superlink.started address=%s pid=%s", self.address, self._process.pid)
            if self.supervise and (self._supervisor is None or not self._supervisor.is_alive()):
                self._supervisor = threading.Thread(target=self._watch, name="superlink-supervisor", daemon=True)
                self._supervisor.start()
        return self

    def _watch(self) -> None:
        backoff = 1.0
        while not self._stopping.is_set():
            process = self._process
            if process is None:
                return
            code = process.wait()
            if self._stopping.is_set():
                return
            log.warning("superlink.died address=%s code=%s; restarting in %.0fs", self.address, code, backoff)
            terminate_group(process, 1.0)  # its group; detached children watch its pid and exit themselves
            if self._stopping.wait(backoff):
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                try:
                    self._process = self._spawn()
                except (OSError, RuntimeError) as exc:
                    log.error("superlink.restart_failed address=%s error=%s", self.address, exc)
                    backoff = min(backoff * 2.0, 30.0)
                    continue
                self.restarts += 1
                backoff = 1.0
                log.info("superlink.restarted address=%s pid=%s restarts=%d", self.address,
                         self._process.pid, self.restarts)

    def stop(self, timeout: float = 10.0) -> None:
        atexit.unregister(self.stop)
        self._stopping.set()
        with self._lock:
            process = self._process
            if process is not None:
                terminate_group(process, timeout)
            if isinstance(self._log_file, int) or self._log_file is None:
                pass
            else:
                self._log_file.close()
            self._log_file = None
        supervisor = self._supervisor
        if supervisor is not None and supervisor is not threading.current_thread():
            supervisor.join(timeout=timeout)
        self._supervisor = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- runs ---------------------------------------------------------------------------------------------
    def submit_run(
        self, app: Path | str | bytes | None = None, run_config: Mapping[str, str | int | float | bool] | None = None
    ) -> int:
        return submit_run(self.address, app, run_config)

    def run_status(self, run_id: int) -> RunStatus:
        return run_status(self.address, run_id)

    def wait_run(self, run_id: int, timeout: float) -> RunStatus:
        return wait_run(self.address, run_id, timeout)

    def stop_run(self, run_id: int) -> bool:
        return stop_run(self.address, run_id)

    def online_nodes(self) -> list[int]:
        return online_nodes(self.address)

    def run_logs(self, run_id: int) -> str:
        return run_logs(self.address, run_id)

    def wait_for_nodes(self, count: int, timeout: float) -> list[int]:
        """Block until at least ``count`` SuperNodes are online; TimeoutError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while len(nodes := self.online_nodes()) < count:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{len(nodes)} of {count} SuperNodes online after {timeout:g}s")
            time.sleep(0.2)
        return nodes
