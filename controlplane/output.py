"""Output people read, shared by the CLI and the demo: a long step's progress line, why devices were not invited
summarized by reason, the one-line status of a round and of a rollout as the API reports them, and
:func:`stderr_to`, which keeps the ML libraries' output off the console (into a JSON-lines log file).

A leaf module (standard library and :mod:`controlplane.statuses` only): the demo and every command group import it.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from controlplane.statuses import RoundStatus, TargetStatus

__all__ = [
    "JsonLines",
    "Progress",
    "deployment_progress",
    "round_progress",
    "stderr_to",
    "summarize_ids",
    "summarize_skipped",
]


def summarize_skipped(skipped: dict[str, str], *, examples: int = 3) -> list[str]:
    """Why devices were not invited, as one line per reason (count, a few example ids) instead of one per device.

    Reasons that carry a device's own reading ("battery 12% < 30% ...") are grouped on the rule, the reading shown
    as ``x``; the lines are ordered by count, largest first.
    """
    groups: dict[str, list[str]] = {}
    for device_id, why in sorted(skipped.items()):
        rule = re.sub(r"\b\d+(?:\.\d+)?(?=\s*(?:%|°C|s)?\s*(?:[<>]|old\b))", "x", why)
        groups.setdefault(rule, []).append(device_id)
    lines = []
    for rule, ids in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        shown = ", ".join(ids[:examples]) + (f", +{len(ids) - examples} more" if len(ids) > examples else "")
        lines.append(f"{len(ids):>5}  {rule}  ({shown})")
    return lines


def summarize_ids(ids: list[str], *, examples: int = 5) -> str:
    """``3: a, b, c`` or ``100: a, b, c, d, e, +95 more``."""
    if not ids:
        return "nobody"
    shown = ", ".join(ids[:examples]) + (f", +{len(ids) - examples} more" if len(ids) > examples else "")
    return f"{len(ids)}: {shown}"


class Progress:
    """A long step's status as one line that updates in place on a terminal; elsewhere (a pipe, a log, CI) a plain
    line when the status changes, or every ``every_s`` while it does not, so a log shows the step is alive.

    ``update(text)`` with the status the API reports; ``done(text)`` ends the line with the final status.
    """

    def __init__(self, label: str, *, stream: Any = None, tty: bool | None = None, every_s: float = 15.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.label, self.every_s, self.clock = label, every_s, clock
        self.stream = stream if stream is not None else sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)()) if tty is None else tty
        self.started = clock()
        self._last_text: str | None = None
        self._last_print = 0.0
        self._width = 0

    def elapsed(self) -> float:
        return self.clock() - self.started

    def _line(self, text: str) -> str:
        return f"{self.label} {text} ({self.elapsed():.0f} s)"

    def update(self, text: str) -> None:
        now = self.clock()
        if self.tty:
            import shutil

            # a line longer than the terminal wraps, and \r would then rewrite only its last row
            line = self._line(text)[:max(20, shutil.get_terminal_size().columns - 1)]
            # \r and pad over the previous line: no cursor codes, so it also reads right in a dumb terminal
            self.stream.write("\r" + line.ljust(self._width))
            self._width = len(line)
        elif text != self._last_text or now - self._last_print >= self.every_s:
            self.stream.write(self._line(text) + "\n")
            self._last_print = now
        self._last_text = text
        self.stream.flush()

    def done(self, text: str) -> None:
        line = self._line(text)
        self.stream.write(("\r" + line.ljust(self._width) if self.tty else line) + "\n")
        self.stream.flush()


def round_progress(r: dict[str, Any]) -> str:
    """What a round is doing, from its record: invited, then the Flower rounds' results as they come, the build."""
    done = [m for m in r.get("metrics") or [] if m.get("round", 0) > 0]
    planned = (r.get("config") or {}).get("rounds", "?")
    text = f"{r['status']}: invited {len(r['invited'])}"
    if not done:
        return text + (f", {planned} flower round(s), no results yet" if r["status"] == RoundStatus.RUNNING else "")
    last = done[-1]
    text += f", flower round {len(done)}/{planned}, took part {len(last.get('participants') or [])}"
    if isinstance(last.get("accuracy"), float):
        text += f", accuracy {last['accuracy']:.3f}"
    if len(done) == planned and r["status"] == RoundStatus.RUNNING:
        text += ", building"
    return text


def deployment_progress(d: dict[str, Any]) -> str:
    """A rollout's progress as the API reports it: status, wave, devices done of all, counts by status."""
    counts: dict[str, int] = d.get("counts") or {}
    total = sum(counts.values())
    unfinished = sum(n for status, n in counts.items() if status in {s.value for s in TargetStatus if s.unfinished})
    waves = d.get("waves") or [100]
    by_status = ", ".join(f"{status} {n}" for status, n in sorted(counts.items()))
    return (f"{d['status']}: wave {d.get('current_wave', 0) + 1}/{len(waves)}, {total - unfinished}/{total} devices "
            f"done" + (f" ({by_status})" if by_status else ""))


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
