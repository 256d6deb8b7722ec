"""Logging for every EdgeFleet process: structured events over the standard library, set up by entry points only.

Agent modules log with :func:`get_logger`: ``log.info("ota.downloading", url=url)`` and ``log.bind(device_id=...)``,
the call style of structlog, over stdlib :mod:`logging`. Hand-written on purpose (a small adapter instead of
structlog in the device process): importing structlog imports asyncio and, where installed, rich (~3 MB of RSS on
a device whose whole budget over the bare runtime is ~13 MB; see bench/agent_footprint.py). The control plane keeps
structlog: :func:`configure_logging` sets it up too unless told not to (the agent's entry point does not).

Output, on stderr: one JSON object per line when stderr is not a TTY (``timestamp``, ``level``, ``logger``,
``event``, the event's fields, ``exception``), else ``timestamp [level] event key=value ...``.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

__all__ = ["EventLogger", "configure_logging", "get_logger"]

_FIELDS = "edgefleet_fields"


class EventLogger:
    """A named stdlib logger with bound fields; each call is one event with keyword fields."""

    __slots__ = ("_fields", "_logger")

    def __init__(self, logger: logging.Logger, fields: dict[str, Any] | None = None) -> None:
        self._logger = logger
        self._fields = fields or {}

    def bind(self, **fields: Any) -> EventLogger:
        """A logger that adds ``fields`` to every event (this one is unchanged)."""
        return EventLogger(self._logger, {**self._fields, **fields})

    def _log(self, level: int, event: str, fields: dict[str, Any], exc_info: bool = False) -> None:
        if self._logger.isEnabledFor(level):
            self._logger.log(level, event, exc_info=exc_info, stacklevel=3,
                             extra={_FIELDS: {**self._fields, **fields} if self._fields else fields})

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, event, fields)

    def exception(self, event: str, **fields: Any) -> None:
        """An error event with the current exception's traceback."""
        self._log(logging.ERROR, event, fields, exc_info=True)


def get_logger(name: str, **fields: Any) -> EventLogger:
    """The event logger ``name`` (a stdlib logger name, e.g. ``edgefleet.agent.ota``), with ``fields`` bound."""
    return EventLogger(logging.getLogger(name), fields)


class _EventFormatter(logging.Formatter):
    """Renders a record, with its event fields, as one JSON line or as ``ts [level] event k=v``."""

    def __init__(self, *, json: bool) -> None:
        super().__init__()
        self.json = json

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        fields: dict[str, Any] = getattr(record, _FIELDS, None) or {}
        exception = self.formatException(record.exc_info) if record.exc_info else None
        if self.json:
            import json

            line = {"timestamp": ts, "level": record.levelname.lower(), "logger": record.name,
                    "event": record.getMessage(), **fields}
            if exception:
                line["exception"] = exception
            return json.dumps(line, default=str, ensure_ascii=False)
        text = f"{ts} [{record.levelname.lower():<7}] {record.getMessage()}"
        if fields:
            text += "  " + " ".join(f"{k}={v!r}" if isinstance(v, str) and " " in v else f"{k}={v}"
                                    for k, v in fields.items())
        return text + (f"\n{exception}" if exception else "")


def configure_logging(level: str = "info", *, json: bool | None = None, structlog: bool = True,
                      ring: logging.Handler | None = None) -> None:
    """Send EdgeFleet's events at ``level`` and up, and other libraries' warnings, to stderr.

    ``json``: JSON lines (default: when stderr is not a TTY). ``structlog``: also configure structlog, which the
    control plane logs with (the agent's entry point passes False and so never imports it). ``ring``: a second
    handler that gets the same events (the agent's :class:`agent._logring.LogRing`, which the ``logs`` command
    reads).
    """
    if json is None:
        json = not sys.stderr.isatty()
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_EventFormatter(json=json))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h.formatter, _EventFormatter)]:
        root.removeHandler(old)
    root.addHandler(handler)
    if ring is not None:
        root.addHandler(ring)
    root.setLevel(max(numeric, logging.WARNING))  # third-party libraries: warnings and up
    logging.getLogger("edgefleet").setLevel(numeric)
    if structlog:
        _configure_structlog(numeric, json=json)


def _configure_structlog(numeric: int, *, json: bool) -> None:
    try:
        import structlog
    except ImportError:  # a device install without the control plane: nothing logs through structlog
        return
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[*processors, structlog.processors.format_exc_info, renderer] if json else [*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
