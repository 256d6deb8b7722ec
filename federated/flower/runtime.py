"""Flower 1.41 deployment processes and run submission, without Litestar and without importing flwr up front.

* :class:`SuperLinkProcess` (control plane): ``flower-superlink`` supervised (restarted when it dies), with
  ``FLWR_HOME`` under a data dir, telemetry off and runtime dependency installation disabled. In Flower 1.41 one
  HTTP port carries the Fleet API (SuperNodes), the Control API (run submission, SuperNode keys) and the Runtime
  API (the ServerApp). With ``tls`` it speaks HTTPS with the fleet's server certificate, optionally with
  ``--enable-supernode-auth``, listens on loopback only, and devices reach the Fleet API through a
  :class:`~federated.flower.fleet_proxy.FleetProxy` (``fleet_host``) that forwards ``/v1/fleet/*`` only.
* :func:`register_supernode` / :func:`unregister_supernode` / :func:`registered_supernodes`: SuperNode public
  keys through the Control API (what ``flwr supernode register|unregister|list`` call).
* :func:`submit_run` / :func:`wait_run` / :func:`run_status` / :func:`stop_run`: the Control API from Python,
  built the way ``flwr run`` builds its request (FAB from the app directory, ``StartRunRequest`` with the run
  config overrides); the ``flwr`` CLI itself is not used.
* :class:`SuperNodeProcess` (device agent, tests, benchmarks): ``flower-supernode`` for one device, with its
  node config (``device-id``, ``data-path``, ...), until stopped.

flwr is imported inside the functions that need it: the agent imports this module to spawn a SuperNode on
devices where ``flwr`` may be missing (:func:`flower_executable` then raises :class:`FlowerNotInstalled`).

Security: the open-source Control API has no authentication of its callers: anyone who reaches the SuperLink's
port can submit a run, i.e. run code on the SuperLink host and on every connected SuperNode, or register a
SuperNode key. Without ``tls`` (development) it is plain HTTP: keep it on loopback. With ``tls`` the port stays
on loopback and only the Fleet API proxy faces the network.
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
from typing import IO, Any, Final, Protocol, Self

from agent.supernode import (
    FlowerNotInstalled,
    SuperNodeProcess,
    flower_env,
    flower_executable,
    free_port,
    node_config_arg,
    open_log,
    terminate_group,
    token_hiding_bin,
    wait_healthy,
)
from federated.flower.config import APP_DIR, DEFAULT_RUN_CONFIG
from federated.flower.fleet_proxy import FleetProxy

__all__ = [
    "FlowerControlError",
    "FlowerNotInstalled",
    "RunStatus",
    "SuperLinkProcess",
    "SuperNodeProcess",
    "TlsFiles",
    "build_fab",
    "flower_env",
    "flower_executable",
    "free_port",
    "node_config_arg",
    "online_nodes",
    "register_supernode",
    "registered_supernodes",
    "run_logs",
    "run_status",
    "stop_run",
    "submit_run",
    "supernode_public_key_pem",
    "unregister_supernode",
    "wait_run",
]

log = logging.getLogger("edgefleet.federated.flower")

_LOCAL_HOSTS: Final = ("0.0.0.0", "::", "")


class FlowerControlError(RuntimeError):
    """The SuperLink's Control API refused a request or could not be reached."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class TlsFiles(Protocol):
    """A TLS server identity (``controlplane.pki.ServerIdentity`` is one): PEM files."""

    @property
    def cert_file(self) -> Path: ...
    @property
    def key_file(self) -> Path: ...
    @property
    def ca_file(self) -> Path: ...


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


def _control_client(address: str, ca_file: Path | None = None) -> Any:
    try:
        from flwr.supercore.control import ControlHttpClient
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    except ImportError as exc:
        raise FlowerNotInstalled(f"flwr is not installed (install edgefleet[train]): {exc}") from exc
    # What `flwr run` builds (flwr.cli.utils.init_http_client_from_connection), minus CLI account auth.
    return ControlHttpClient.from_server_address(
        server_address=address,
        insecure=ca_file is None,
        root_certificates=None if ca_file is None else str(ca_file),
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr CLI")],
    )


def _call(address: str, method: str, request: Any, ca_file: Path | None = None) -> Any:
    import httpx

    client = _control_client(address, ca_file)
    try:
        return getattr(client, method)(request)
    except httpx.HTTPStatusError as exc:
        raise FlowerControlError(
            f"Control API {method} at {address}: HTTP {exc.response.status_code}: {exc.response.text.strip()}",
            exc.response.status_code,
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
    ca_file: Path | None = None,
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
    response = _call(control_address, "StartRun", request, ca_file)
    if not response.HasField("run_id"):
        note = response.note if response.HasField("note") else "no run id in the answer"
        raise FlowerControlError(f"the SuperLink did not start the run: {note}")
    return int(response.run_id)


def run_status(control_address: str, run_id: int, *, ca_file: Path | None = None) -> RunStatus:
    """The run's status; raises :class:`FlowerControlError` if the SuperLink does not know it."""
    from flwr.proto.control_pb2 import ListRunsRequest

    response = _call(control_address, "ListRuns", ListRunsRequest(run_id=run_id), ca_file)
    if run_id not in response.run_dict:
        raise FlowerControlError(f"run {run_id} is unknown to the SuperLink at {control_address}")
    status = response.run_dict[run_id].status
    return RunStatus(run_id, status.status, status.sub_status, status.details)


def wait_run(control_address: str, run_id: int, timeout: float, poll_interval_s: float = 0.5, *,
             ca_file: Path | None = None) -> RunStatus:
    """Block until the run is finished; TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        status = run_status(control_address, run_id, ca_file=ca_file)
        if status.finished:
            return status
        if time.monotonic() >= deadline:
            raise TimeoutError(f"run {run_id} not finished after {timeout:g}s (status {status.status})")
        time.sleep(poll_interval_s)


def run_logs(control_address: str, run_id: int, *, ca_file: Path | None = None) -> str:
    """The ServerApp's log output of a run so far (what ``flwr log`` prints)."""
    import httpx
    from flwr.proto.control_pb2 import StreamLogsRequest

    client = _control_client(control_address, ca_file)
    try:
        for response in client.StreamLogs(StreamLogsRequest(run_id=run_id, after_timestamp=0.0)):
            return str(response.log_output)
        return ""
    except httpx.HTTPError as exc:
        raise FlowerControlError(f"Control API StreamLogs at {control_address}: {exc}") from exc
    finally:
        client.close()


def online_nodes(control_address: str, *, ca_file: Path | None = None) -> list[int]:
    """Node ids of the SuperNodes the SuperLink currently sees online (a SIGKILLed one stays "online" until it
    misses its heartbeats, ~1 min with Flower's defaults)."""
    from flwr.proto.control_pb2 import ListNodesRequest

    response = _call(control_address, "ListNodes", ListNodesRequest(), ca_file)
    return sorted(int(n.node_id) for n in response.nodes_info if n.status == "online")


def stop_run(control_address: str, run_id: int, *, ca_file: Path | None = None) -> bool:
    from flwr.proto.control_pb2 import StopRunRequest

    return bool(_call(control_address, "StopRun", StopRunRequest(run_id=run_id), ca_file).success)


def supernode_public_key_pem(public_key: str | bytes) -> bytes:
    """A SuperNode public key as the SuperLink stores it (SubjectPublicKeyInfo PEM) from OpenSSH
    (``ecdsa-sha2-nistp384 AAAA...``) or PEM text; ValueError unless it is an EC key on a NIST curve."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    data = public_key.encode() if isinstance(public_key, str) else public_key
    data = data.strip()
    try:
        key = (serialization.load_pem_public_key(data) if data.startswith(b"-----")
               else serialization.load_ssh_public_key(data))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not an OpenSSH or PEM public key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in ("secp256r1", "secp384r1",
                                                                                   "secp521r1"):
        raise ValueError("a SuperNode key must be an EC key on a NIST curve (P-384)")
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def registered_supernodes(control_address: str, *, ca_file: Path | None = None) -> dict[bytes, int]:
    """Registered SuperNode public keys (PEM) -> node id (unregistered ones left out)."""
    from flwr.proto.control_pb2 import ListNodesRequest

    response = _call(control_address, "ListNodes", ListNodesRequest(), ca_file)
    return {bytes(n.public_key): int(n.node_id) for n in response.nodes_info
            if n.public_key and n.status != "unregistered"}


def register_supernode(control_address: str, public_key: str | bytes, *, name: str | None = None,
                       ca_file: Path | None = None) -> int:
    """Register a SuperNode's public key (OpenSSH or PEM) with the SuperLink; returns its node id. Idempotent: a
    key registered already returns the node id it has."""
    from flwr.proto.control_pb2 import RegisterNodeRequest

    pem = supernode_public_key_pem(public_key)
    known = registered_supernodes(control_address, ca_file=ca_file)
    if pem in known:
        return known[pem]
    try:
        response = _call(control_address, "RegisterNode", RegisterNodeRequest(public_key=pem, name=name), ca_file)
    except FlowerControlError as exc:
        if exc.status_code == 412:  # registered meanwhile (PUBLIC_KEY_ALREADY_IN_USE)
            known = registered_supernodes(control_address, ca_file=ca_file)
            if pem in known:
                return known[pem]
        raise
    if not response.node_id:
        raise FlowerControlError("the SuperLink did not register the SuperNode key")
    return int(response.node_id)


def unregister_supernode(control_address: str, public_key: str | bytes, *, ca_file: Path | None = None) -> bool:
    """Unregister the SuperNode with this public key; False if it was not registered."""
    from flwr.proto.control_pb2 import UnregisterNodeRequest

    node_id = registered_supernodes(control_address, ca_file=ca_file).get(supernode_public_key_pem(public_key))
    if node_id is None:
        return False
    _call(control_address, "UnregisterNode", UnregisterNodeRequest(node_id=node_id), ca_file)
    return True


# -------------------------------------------------------------------------------------------- SuperLink


class SuperLinkProcess:
    """A supervised ``flower-superlink``: started, health-checked, restarted when it dies, stopped.

    Without ``tls`` (development): plain HTTP on ``host`` (Fleet, Control and Runtime API share ``port``);
    SuperNodes on other machines need it on a reachable interface, and so does everyone else.

    With ``tls`` (the fleet's server certificate, key and CA bundle): HTTPS on loopback only (``host`` must be
    loopback: the Control API has no authentication), ``--enable-supernode-auth`` when ``supernode_auth``, and,
    when ``fleet_host`` is given, a :class:`FleetProxy` on ``fleet_host:fleet_port`` that forwards only the Fleet
    API: :attr:`device_address` is what SuperNodes are given. The ServerApp's run token never appears on a
    command line (:func:`agent.supernode.token_hiding_bin`).

    With ``database=None`` the SuperLink keeps its state in memory: a restart forgets runs in progress and
    registered SuperNode keys (register them again before each round; SuperNodes reconnect by themselves).
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
        tls: TlsFiles | None = None,
        supernode_auth: bool = False,
        fleet_host: str | None = None,
        fleet_port: int | None = None,
    ) -> None:
        if isolation not in ("subprocess", "process"):
            raise ValueError(f"isolation must be 'subprocess' or 'process', got {isolation!r}")
        if supernode_auth and tls is None:
            raise ValueError("SuperNode authentication needs TLS (flower-superlink refuses it in plaintext)")
        if tls is not None and _client_host(host) not in ("127.0.0.1", "::1", "localhost"):
            raise ValueError(f"with TLS the SuperLink listens on loopback only (its Control API has no "
                             f"authentication); devices reach the Fleet API through fleet_host, not {host}")
        if fleet_host is not None and tls is None:
            raise ValueError("the Fleet API proxy serves TLS only: give tls")
        self.tls = tls
        self.supernode_auth = supernode_auth
        self.fleet_host = fleet_host
        self.fleet_port = fleet_port
        self.fleet_proxy: FleetProxy | None = None
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
    def device_address(self) -> str:
        """``host:port`` devices' SuperNodes connect to: the Fleet API proxy with TLS, else :attr:`address`."""
        return self.fleet_proxy.address if self.fleet_proxy is not None else self.address

    @property
    def ca_file(self) -> Path | None:
        """The CA bundle clients verify the SuperLink with (None in plaintext)."""
        return Path(self.tls.ca_file) if self.tls is not None else None

    @property
    def health_url(self) -> str:
        return f"{'https' if self.tls is not None else 'http'}://{self.address}/health"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # -- lifecycle ----------------------------------------------------------------------------------------
    def command(self) -> list[str]:
        if self.tls is None:
            security = ["--insecure"]
        else:
            security = ["--ssl-certfile", str(self.tls.cert_file), "--ssl-keyfile", str(self.tls.key_file),
                        "--ssl-ca-certfile", str(self.tls.ca_file)]
            if self.supernode_auth:
                security.append("--enable-supernode-auth")
        cmd = [
            flower_executable("flower-superlink"),
            *security,
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
        env = flower_env(flwr_home, self.extra_env, task_poll_interval_s=self.task_poll_interval_s,
                         first_bin=token_hiding_bin(self.data_dir / "bin"))
        process = subprocess.Popen(
            self.command(), env=env, cwd=self.data_dir, stdin=subprocess.DEVNULL,
            stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )
        if not wait_healthy(self.health_url, process, self.startup_timeout_s, ca_file=self.ca_file):
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
            if self.fleet_host is not None and self.fleet_proxy is None and self.tls is not None:
                proxy = FleetProxy(self.address, listen_host=self.fleet_host, listen_port=self.fleet_port,
                                   cert_file=self.tls.cert_file, key_file=self.tls.key_file,
                                   ca_file=self.tls.ca_file)
                try:
                    self.fleet_proxy = proxy.start()
                except BaseException:
                    terminate_group(self._process, 5.0)
                    self._process = None
                    raise
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
        if self.fleet_proxy is not None:
            self.fleet_proxy.stop()
            self.fleet_proxy = None
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
        return submit_run(self.address, app, run_config, ca_file=self.ca_file)

    def run_status(self, run_id: int) -> RunStatus:
        return run_status(self.address, run_id, ca_file=self.ca_file)

    def wait_run(self, run_id: int, timeout: float) -> RunStatus:
        return wait_run(self.address, run_id, timeout, ca_file=self.ca_file)

    def stop_run(self, run_id: int) -> bool:
        return stop_run(self.address, run_id, ca_file=self.ca_file)

    def online_nodes(self) -> list[int]:
        return online_nodes(self.address, ca_file=self.ca_file)

    def run_logs(self, run_id: int) -> str:
        return run_logs(self.address, run_id, ca_file=self.ca_file)

    # -- SuperNode keys -----------------------------------------------------------------------------------
    def register_supernode(self, public_key: str | bytes, name: str | None = None) -> int:
        return register_supernode(self.address, public_key, name=name, ca_file=self.ca_file)

    def unregister_supernode(self, public_key: str | bytes) -> bool:
        return unregister_supernode(self.address, public_key, ca_file=self.ca_file)

    def registered_supernodes(self) -> dict[bytes, int]:
        return registered_supernodes(self.address, ca_file=self.ca_file)

    def clock_skews(self, since: float = 0.0) -> dict[bytes, float]:
        """Public keys (PEM) the SuperLink refused for their clock since ``since``, with the skew (s)."""
        return self.fleet_proxy.clock_skews(since) if self.fleet_proxy is not None else {}

    def wait_for_nodes(self, count: int, timeout: float) -> list[int]:
        """Block until at least ``count`` SuperNodes are online; TimeoutError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while len(nodes := self.online_nodes()) < count:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{len(nodes)} of {count} SuperNodes online after {timeout:g}s")
            time.sleep(0.2)
        return nodes
