"""`edgefleet demo`: the whole loop on this machine."""

from __future__ import annotations

import io
import json
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from federated.burst.spec import JobKind
from federated.flower.config import Strategy


def demo(
    agents: Annotated[int, typer.Option(help="Number of simulated devices.")] = 4,
    duration: Annotated[float, typer.Option(help="Seconds of on-device inference at the end.")] = 20.0,
    rounds: Annotated[int, typer.Option(help="Federated rounds the schedule runs.")] = 3,
    strategy: Annotated[Strategy, typer.Option(help="Flower strategy.")] = Strategy.FEDAVG,
    alpha: Annotated[float, typer.Option(help="Dirichlet alpha of the devices' non-IID data.")] = 0.5,
    learn: Annotated[bool, typer.Option(help="Run the learning loop (needs edgefleet[train,build]).")] = True,
    burst: Annotated[JobKind | None, typer.Option(
        help="Attach this burst job to the round: it runs on the federated result before the build.")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the summary as JSON.")] = None,
    broker: Annotated[str | None, typer.Option(help="Use this broker instead of the embedded one.")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Demo state (default: a temporary directory).")] = None,
    serve: Annotated[bool, typer.Option(
        help="After the summary, keep the control plane, its web console and the agents up until Ctrl-C.")] = False,
    port: Annotated[int, typer.Option(help="HTTP port of the API and console (0: a free port).", min=0,
                                      max=65535)] = 0,
    log_file: Annotated[Path | None, typer.Option(
        help="Where the logs go: the control plane's JSON events and the ML libraries' output "
             "(default: DATA_DIR/demo.log, or a new edgefleet-demo-*.log in the temporary directory).")] = None,
) -> None:
    """The whole loop on this machine: control plane, broker, N agents, scheduled federated rounds, build, signed
    rollout, on-device inference; prints the summary and the console's URL (--serve: keeps serving it)."""
    # Before anything imports TensorFlow, LiteRT, torch or absl (here and in the processes the demo starts): their
    # C++ logging reads these at load time.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("ABSL_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    if log_file is None:
        if data_dir is not None:
            data_dir.mkdir(parents=True, exist_ok=True)
            log_file = data_dir / "demo.log"
        else:  # outlives the temporary data dir, so it can be read after the demo
            fd, name = tempfile.mkstemp(prefix="edgefleet-demo-", suffix=".log")
            os.close(fd)
            log_file = Path(name)
    with stderr_to(log_file):
        from agent.logsetup import configure_logging
        from controlplane.demo import run_demo

        # stderr is the log file now: JSON lines, one per event, the control plane's at info and up
        configure_logging("info", json=True)
        summary = run_demo(agents=agents, duration_s=duration, broker_url=broker, data_dir=data_dir, rounds=rounds,
                           alpha=alpha, strategy=strategy.value, learn=None if learn else False,
                           burst=None if burst is None else burst.value, port=port, serve=serve, log_path=log_file)
    if json_path is not None:
        json_path.write_text(json.dumps(summary, indent=2))
        typer.echo(f"summary written to {json_path}")


class JsonLines:
    """The demo's log file, JSON lines only: a line that is already a JSON object (structlog's, the stdlib's event
    formatter's) is written as it is; any other (a C++ library's, torch's own format, a stray print) becomes
    ``{"timestamp", "level", "logger": source, "event": the line}``. Safe from several threads."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - closed by close()
        self._lock = threading.Lock()

    def line(self, text: str, source: str) -> None:
        text = text.rstrip("\r\n")
        if not text.strip():
            return
        if not (text.startswith("{") and text.endswith("}")):
            ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z"
            level = ("warning" if _WARNING.match(text) else "error" if _ERROR.match(text) else "info")
            text = json.dumps({"timestamp": ts, "level": level, "logger": source, "event": text}, ensure_ascii=False)
        with self._lock:
            self._file.write(text + "\n")

    def close(self) -> None:
        with self._lock:
            self._file.close()


# glog / absl ("W1126 08:02:37.17 ...", "E0000 ..."), Python logging and TFLite ("WARNING: ...", "ERROR: ...")
_WARNING = re.compile(r"^(?:W\d{4} |WARNING\b|\S*Warning:)")
_ERROR = re.compile(r"^(?:[EF]\d{4} |ERROR\b|CRITICAL\b|Traceback)")


class _LineWriter(io.TextIOBase):
    """``sys.stderr`` while the demo runs: whole lines to the JSON log."""

    def __init__(self, log: JsonLines) -> None:
        super().__init__()
        self._log, self._partial = log, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        *lines, self._partial = (self._partial + text).split("\n")
        for line in lines:
            self._log.line(line, "stderr")
        return len(text)

    def flush(self) -> None:
        if self._partial:
            self._log.line(self._partial, "stderr")
            self._partial = ""

    def fileno(self) -> int:
        return 2

    def isatty(self) -> bool:
        return False


@contextmanager
def stderr_to(path: Path) -> Iterator[None]:
    """Send everything written to stderr during the block to ``path`` as JSON lines, then give stderr back.

    Both ``sys.stderr`` (the loggers, warnings) and file descriptor 2: TensorFlow/LiteRT, absl, oneDNN and XNNPACK
    write from C++, and processes started in the block inherit it; a pipe read by a thread turns those lines into
    JSON too. What the demo has to say goes to stdout; an error after the block (or a traceback) reaches the
    terminal again.
    """
    import logging

    log = JsonLines(path)
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        with os.fdopen(read_end, "rb") as pipe:
            for raw in pipe:  # until every writer (this process, children that inherited it) has closed it
                log.line(raw.decode("utf-8", "replace"), "native")

    reader = threading.Thread(target=pump, name="demo-stderr", daemon=True)
    reader.start()
    logging.captureWarnings(True)  # warnings.warn() as log records: JSON lines
    # Not closed after: loggers configured in the block keep it, and their lines still reach the log file.
    previous, sys.stderr = sys.stderr, _LineWriter(log)
    try:
        yield
    finally:
        sys.stderr.flush()
        sys.stderr = previous
        os.dup2(saved, 2)  # this process's write end of the pipe closes here
        os.close(saved)
        logging.captureWarnings(False)
        reader.join(timeout=2)  # a child still holding the pipe: its lines still go on being logged
