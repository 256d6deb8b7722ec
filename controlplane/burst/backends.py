"""Where burst jobs run: a local worker process, or Ray through its Jobs API (a local head on demand or RAY_ADDRESS).

Both run the same entrypoint, `python -m federated.burst.worker --spec SPEC --out-dir DIR`, which writes progress
lines (`EDGEFLEET_PROGRESS {...}`) to its log, checkpoints, and `result.json` + `weights.npz` into DIR.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Protocol

import structlog

from controlplane.broker import free_port

__all__ = ["Backend", "LocalBackend", "RayBackend", "RayHead", "Resources"]

log = structlog.get_logger("edgefleet.jobs")

Resources = dict[str, float]
LOG_WINDOW = 64 * 1024  # what the service keeps of a job's log: the latest progress and the tail users see


class Backend(Protocol):
    name: str

    def submit(self, job_id: int, spec_path: Path, out_dir: Path, resources: Resources) -> str: ...

    def status(self, backend_id: str) -> str:
        """PENDING | RUNNING | SUCCEEDED | FAILED | STOPPED"""

    def logs(self, backend_id: str, final: bool = False) -> str:
        """The end of the job's log (at most LOG_WINDOW characters); `final` once the job has ended."""

    def stop(self, backend_id: str) -> None: ...


def _entrypoint(spec_path: Path, out_dir: Path) -> list[str]:
    return [sys.executable, "-m", "federated.burst.worker", "--spec", str(spec_path), "--out-dir", str(out_dir)]


class LocalBackend:
    """A worker process on the control plane's machine (small jobs that devices could run too).

    The backend id is `local:<pid>:<out_dir>`, so a restarted control plane re-attaches to a worker that is still
    running (the worker outlives the control plane: it runs in its own session).
    """

    name = "local"

    def __init__(self) -> None:
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    def submit(self, job_id: int, spec_path: Path, out_dir: Path, resources: Resources) -> str:
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / "worker.log", "ab") as log_file:
            proc = subprocess.Popen(_entrypoint(spec_path, out_dir), stdout=log_file, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        backend_id = f"local:{proc.pid}:{out_dir}"
        self._procs[backend_id] = proc
        return backend_id

    @staticmethod
    def _parse(backend_id: str) -> tuple[int, Path]:
        _, pid, out_dir = backend_id.split(":", 2)
        return int(pid), Path(out_dir)

    def status(self, backend_id: str) -> str:
        proc = self._procs.get(backend_id)
        if proc is not None:
            code = proc.poll()
            if code is None:
                return "RUNNING"
            return "SUCCEEDED" if code == 0 else ("STOPPED" if code < 0 else "FAILED")
        pid, out_dir = self._parse(backend_id)  # started by an earlier control plane
        if _is_worker(pid, out_dir):
            return "RUNNING"
        return "SUCCEEDED" if (out_dir / "result.json").is_file() else "FAILED"

    def logs(self, backend_id: str, final: bool = False) -> str:
        """The end of the worker's log (it grows by a line per epoch; the service polls it every second)."""
        try:
            with open(self._parse(backend_id)[1] / "worker.log", "rb") as fh:
                fh.seek(max(0, fh.seek(0, os.SEEK_END) - LOG_WINDOW))
                return fh.read().decode(errors="replace")
        except (OSError, ValueError):
            return ""

    def stop(self, backend_id: str) -> None:
        proc = self._procs.get(backend_id)
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            return
        pid, out_dir = self._parse(backend_id)
        if _is_worker(pid, out_dir):
            os.kill(pid, signal.SIGTERM)


def _cmdline(pid: int) -> list[str] | None:
    """The command line of a live process (psutil), or None if there is none with that pid."""
    import psutil

    try:
        return list(psutil.Process(pid).cmdline())
    except psutil.Error:
        return None


def _is_worker(pid: int, out_dir: Path) -> bool:
    """Is `pid` still our worker for `out_dir` (and not a recycled pid)?"""
    cmdline = _cmdline(pid) or []
    return "federated.burst.worker" in cmdline and str(out_dir) in cmdline



class RayHead:
    """A local Ray head (`ray start --head --block`) in its own process group, for the Jobs API on 127.0.0.1.

    Its pid and ports are kept in `state_path`, so that a control plane restarted after a crash adopts the head that
    is still running (and re-attaches to its jobs) instead of leaking it and starting another.
    """

    def __init__(self, temp_dir: Path, num_cpus: int | None = None, state_path: Path | None = None) -> None:
        self.temp_dir = temp_dir
        self.num_cpus = num_cpus or max(1, os.cpu_count() or 1)
        self.state_path = state_path
        self.port = free_port()
        self.dashboard_port = free_port()
        self.pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.address}/api/version", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    @classmethod
    def adopt(cls, state_path: Path) -> RayHead | None:
        """The head an earlier control plane left running (it crashed), if it is still ours and answers."""
        try:
            state = json.loads(state_path.read_text())
            head = cls(Path(state["temp_dir"]), state_path=state_path)
            head.pid, head.port, head.dashboard_port = int(state["pid"]), int(state["port"]), int(state["dashboard_port"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        cmdline = _cmdline(head.pid) or []
        if "--head" not in cmdline or f"--dashboard-port={head.dashboard_port}" not in cmdline:
            return None  # gone, or the pid now belongs to something else
        if not head._answers():
            return None
        log.info("ray.head_adopted", address=head.address, pid=head.pid)
        return head

    def start(self, timeout_s: float = 90.0) -> RayHead:
        if len(str(self.temp_dir)) > 40:
            # Ray puts AF_UNIX sockets under its temp dir, and their paths may not exceed 107 bytes.
            self.temp_dir = Path(tempfile.mkdtemp(prefix="edgefleet-ray-"))
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        ray = str(Path(sys.executable).parent / "ray")
        command = [ray, "start", "--head", "--block", f"--port={self.port}", "--node-ip-address=127.0.0.1",
                   "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}", "--include-dashboard=true",
                   f"--num-cpus={self.num_cpus}", "--num-gpus=0", f"--temp-dir={self.temp_dir}",
                   "--disable-usage-stats",
                   # Ray's fixed default ports (agent 52365, client 10001, ...) would make a second head on this
                   # machine (another control plane, a user's own Ray, one a crash left) start without a job agent.
                   *(f"--{name}={free_port()}" for name in (
                       "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
                       "metrics-export-port", "ray-client-server-port"))]
        env = dict(os.environ, RAY_TMPDIR=str(self.temp_dir), RAY_USAGE_STATS_ENABLED="0")
        log_path = self.temp_dir / "ray-head.log"
        with open(log_path, "ab") as log_file:
            self._proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True)
        self.pid = self._proc.pid
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"ray head exited: {log_path.read_text(errors='replace')[-2000:]}")
            if self._answers():
                log.info("ray.head_started", address=self.address)
                if self.state_path is not None:
                    self.state_path.parent.mkdir(parents=True, exist_ok=True)
                    self.state_path.write_text(json.dumps({
                        "pid": self.pid, "port": self.port, "dashboard_port": self.dashboard_port,
                        "temp_dir": str(self.temp_dir)}))
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the local Ray head did not answer on {self.address} within {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.pid is not None:
            try:
                os.killpg(self.pid, signal.SIGTERM)
                if not _wait_gone(self.pid, self._proc, 30.0):
                    os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.state_path is not None:
            self.state_path.unlink(missing_ok=True)
        self.pid = self._proc = None


def _wait_gone(pid: int, proc: subprocess.Popen[bytes] | None, timeout_s: float) -> bool:
    if proc is not None:
        try:
            proc.wait(timeout_s)
            return True
        except subprocess.TimeoutExpired:
            return False
    import psutil

    try:
        psutil.Process(pid).wait(timeout_s)
    except psutil.NoSuchProcess:
        return True
    except psutil.TimeoutExpired:
        return False
    return True


class RayBackend:
    """Ray Jobs API: `RAY_ADDRESS` (a cluster's dashboard, e.g. KubeRay's head service :8265) or a local head
    started on the first burst job."""

    name = "ray"

    def __init__(self, temp_dir: Path, address: str | None = None) -> None:
        self.temp_dir = temp_dir
        self._address = address
        self._head: RayHead | None = None
        self._client: Any = None
        self._tails: dict[str, _LogTail] = {}
        self._lock = threading.Lock()
        self._closed = False

    def _jobs(self) -> Any:
        with self._lock:  # jobs are launched on their own threads: one head, however many arrive at once
            if self._closed:
                raise RuntimeError("the Ray backend is shut down")
            if self._client is None:
                from ray.job_submission import JobSubmissionClient

                address = self._address
                if address is None:
                    state = self.temp_dir / "head.json"
                    self._head = RayHead.adopt(state) or RayHead(self.temp_dir, state_path=state).start()
                    address = self._head.address
                self._client = JobSubmissionClient(address)
            return self._client

    def submit(self, job_id: int, spec_path: Path, out_dir: Path, resources: Resources,
               agent_wait_s: float = 60.0) -> str:
        client = self._jobs()
        extra = {"TPU": resources["tpus"]} if resources.get("tpus") else None
        submission_id = f"edgefleet-job-{job_id}-{int(time.time())}"
        deadline = time.monotonic() + agent_wait_s
        while True:
            try:
                return str(client.submit_job(
                    entrypoint=shlex.join(_entrypoint(spec_path, out_dir)),
                    submission_id=submission_id,
                    entrypoint_num_cpus=resources.get("cpus", 1.0),
                    entrypoint_num_gpus=resources.get("gpus", 0.0),
                    entrypoint_memory=int(resources.get("memory_gb", 1.0) * 2**30),
                    entrypoint_resources=extra,
                    runtime_env={"env_vars": _worker_env()},
                ))
            except RuntimeError as exc:
                # A head that has just started (or restarted) answers before its job agent has registered.
                if "No available agent" not in str(exc) or time.monotonic() > deadline:
                    raise
                log.info("ray.waiting_for_job_agent", job_id=job_id)
                time.sleep(1.0)

    def status(self, backend_id: str) -> str:
        return str(self._jobs().get_job_status(backend_id).value)

    def logs(self, backend_id: str, final: bool = False) -> str:
        """Followed over the Jobs API's log websocket while the job runs (a full fetch each second would grow with
        the log); fetched whole once at the end, so nothing the follower had not received yet is missed."""
        tail = self._tails.get(backend_id)
        if final or (tail is not None and tail.failed):
            self._tails.pop(backend_id, None)
            return str(self._jobs().get_job_logs(backend_id))[-LOG_WINDOW:]
        if tail is None:
            tail = self._tails[backend_id] = _LogTail(self._jobs(), backend_id)
        return tail.text

    def stop(self, backend_id: str) -> None:
        self._tails.pop(backend_id, None)
        self._jobs().stop_job(backend_id)

    def close(self, drain_timeout_s: float = 30.0) -> None:
        with self._lock:  # a head still starting for a launch is stopped here, not left behind
            self._closed = True
            self._tails.clear()  # their websockets end with the head (or the job)
            if self._head is not None:
                # Ray starts entrypoints in their own session, so the head's end would orphan them: stop ours
                # first. Each checkpoints and exits; a restarted control plane re-submits it and it resumes.
                self._drain(drain_timeout_s)
                self._head.stop()
                self._head = None
            self._client = None

    def _drain(self, timeout_s: float) -> None:
        client = self._client
        if client is None:
            return
        active = set()
        try:  # our own head: every job on it is ours, also those re-attached after a restart
            running = [j.submission_id for j in client.list_jobs() if str(j.status.value) in ("PENDING", "RUNNING")]
        except Exception as exc:  # noqa: BLE001 - the head is going anyway; say that jobs may be orphaned
            log.warning("ray.list_failed", error=str(exc))
            return
        for backend_id in running:
            try:
                client.stop_job(backend_id)
                active.add(backend_id)
            except Exception as exc:  # noqa: BLE001 - the head is going anyway; say which job may be orphaned
                log.warning("ray.stop_failed", job=backend_id, error=str(exc))
        deadline = time.monotonic() + timeout_s
        while active and time.monotonic() < deadline:
            time.sleep(0.2)
            active = {b for b in active if str(client.get_job_status(b).value) in ("PENDING", "RUNNING")}
        if active:
            log.warning("ray.jobs_still_running_at_shutdown", jobs=sorted(active))


class _LogTail:
    """The last LOG_WINDOW characters of one Ray job's log, followed on a thread over the Jobs API websocket."""

    def __init__(self, client: Any, backend_id: str) -> None:
        self.text = ""
        self.failed = False  # the websocket broke: the caller falls back to full fetches
        self._client = client
        self._id = backend_id
        threading.Thread(target=asyncio.run, args=(self._follow(),), name=f"ray-logs-{backend_id}",
                         daemon=True).start()

    async def _follow(self) -> None:
        try:
            async for chunk in self._client.tail_job_logs(self._id):
                self.text = (self.text + chunk)[-LOG_WINDOW:]  # one writer; readers see whole strings
        except Exception as exc:  # noqa: BLE001 - a broken stream only costs the optimisation
            log.info("ray.log_tail_broke", job=self._id, error=str(exc))
            self.failed = True


def _worker_env() -> dict[str, str]:
    """What a Ray worker needs from this process's environment: the task allow-list, so that a remote cluster
    resolves the same registered tasks (a local head inherits it anyway)."""
    from federated.tasks import TASKS_ENV

    env = {"PYTHONUNBUFFERED": "1"}
    if os.environ.get(TASKS_ENV):
        env[TASKS_ENV] = os.environ[TASKS_ENV]
    return env
