"""The agent's recent log, kept in memory for the ``logs`` command: a bounded ring of redacted, truncated lines.

An operator asks a device for its last N log lines over MQTT (``logs``, args ``{"lines": N}``); the answer travels
in an :class:`agent.protocol.Ack` and lands in the control plane's database, where other people read it. So what the
ring keeps is bounded (entries, characters per entry, bytes in all: a chatty or hostile log never grows the
agent's memory) and redacted before it is stored, never at read time:

- values of fields whose name says credential (``password``, ``token``, ``secret``, ``authorization``, ...);
- the password in a URL's user info (``mqtt://user:pass@host`` -> ``mqtt://user:[redacted]@host``);
- ``name=value`` / ``"name": "value"`` pairs with such names in free text (query strings, exception messages);
- ``Bearer <token>`` and PEM private-key blocks;
- any literal secret the entry point registers (:meth:`LogRing.add_secret`: the broker password), wherever it
  appears.

Built by the entry point and attached to the root logger (:func:`agent.logsetup.configure_logging`), handed to the
:class:`agent._daemon.Agent`.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import deque
from typing import Any, Final

import msgspec

from agent.logsetup import _FIELDS, _EventFormatter
from agent.protocol import LOGS_DEFAULT_LINES, LOGS_MAX_LINES

__all__ = [
    "DEFAULT_LINES",
    "MAX_LINES",
    "LogRing",
    "LogsArgsError",
    "logs_result",
    "parse_logs_args",
    "redact",
]

# What `logs` may ask for. The ack's result is an agent.protocol free-form dict: lists hold at most 256 entries and
# the whole ack at most 64 KiB, so 200 lines of up to RESULT_BUDGET_BYTES in all is what one answer can carry.
DEFAULT_LINES: Final = LOGS_DEFAULT_LINES
MAX_LINES: Final = LOGS_MAX_LINES
RESULT_BUDGET_BYTES: Final = 60 * 1024  # the lines' JSON; the rest of the ack stays well under 4 KiB
MAX_LINE_CHARS: Final = 2048  # a free-form string may hold 4096: a traceback is cut at 2048
RING_LINES: Final = 1000
RING_BYTES: Final = 256 * 1024

_REDACTED: Final = "[redacted]"
_SECRET_WORDS: Final = ("password", "passwd", "secret", "token", "authorization", "credential", "bearer",
                        "api_key", "apikey", "private_key", "privatekey", "signature")
_SECRET_NAME: Final = r"[A-Za-z0-9_.-]*(?:" + "|".join(_SECRET_WORDS) + r")[A-Za-z0-9_.-]*"
_PATTERNS: Final = (
    # -----BEGIN ... PRIVATE KEY----- ... -----END ... PRIVATE KEY----- (or to the end of a cut entry)
    (re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)",
                re.DOTALL),
     "[redacted private key]"),
    # scheme://user:password@host -> scheme://user:[redacted]@host
    (re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@?#]*):[^\s/?#]*@"), rf"\g<head>:{_REDACTED}@"),
    # "name": "value" (JSON, repr of dicts with double quotes)
    (re.compile(rf"""(?i)(?P<head>["']{_SECRET_NAME}["']\s*:\s*)(?P<q>["'])(?:\\.|(?!(?P=q)).)*(?P=q)"""),
     rf"\g<head>\g<q>{_REDACTED}\g<q>"),
    # name=value, name: value (query strings, key=value logs, headers); value up to a separator
    (re.compile(rf"""(?i)(?P<head>\b{_SECRET_NAME}\s*[=:]\s*)(?!\[redacted)(?:bearer\s+)?"""
                rf"""(?:'[^']*'|"[^"]*"|[^\s&,;"'}}\])]+)"""),
     rf"\g<head>{_REDACTED}"),
    # Authorization: Bearer <token>, or a bare "Bearer <token>"
    (re.compile(r"(?i)\bbearer\s+(?!\[redacted)[A-Za-z0-9._~+/=-]+"), f"Bearer {_REDACTED}"),
)


def redact(text: str, secrets: frozenset[str] = frozenset()) -> str:
    """``text`` with credentials replaced by ``[redacted]`` (see the module's list)."""
    for secret in secrets:
        text = text.replace(secret, _REDACTED)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _is_secret_name(name: object) -> bool:
    lowered = str(name).lower()
    return any(word in lowered for word in _SECRET_WORDS)


class _RedactingFormatter(_EventFormatter):
    """The log's text form (``ts [level] event k=v``), with credential-named fields' values replaced."""

    def __init__(self) -> None:
        super().__init__(json=False)

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] | None = getattr(record, _FIELDS, None)
        if fields and any(_is_secret_name(k) for k in fields):
            # A copy on a copy of the record: the other handlers format the original.
            record = logging.makeLogRecord(record.__dict__)
            setattr(record, _FIELDS, {k: _REDACTED if _is_secret_name(k) else v for k, v in fields.items()})
        return super().format(record)


class LogRing(logging.Handler):
    """The newest log entries of this process, redacted and bounded.

    Parameters
    ----------
    lines
        At most this many entries (one entry per log record: a traceback stays with its event).
    max_bytes
        At most this many bytes (UTF-8) in all; the oldest entries go first.
    max_line_chars
        An entry longer than this is cut, with ``... [N more characters]`` at its end.
    """

    def __init__(self, lines: int = RING_LINES, max_bytes: int = RING_BYTES,
                 max_line_chars: int = MAX_LINE_CHARS, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self._entries: deque[str] = deque()
        self._bytes = 0
        self._max_lines = lines
        self._max_bytes = max_bytes
        self._max_line_chars = max_line_chars
        self._secrets: frozenset[str] = frozenset()
        self._ring_lock = threading.Lock()
        self.dropped = 0  # entries pushed out by newer ones
        self.setFormatter(_RedactingFormatter())

    def add_secret(self, secret: str | None) -> None:
        """Redact this literal string wherever it appears from now on (ignored when shorter than 6 characters:
        a short one would blank ordinary words)."""
        if secret and len(secret) >= 6:
            self._secrets = self._secrets | {secret}

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = redact(self.format(record), self._secrets)
        except Exception:  # noqa: BLE001 - logging must never raise into the code that logs
            self.handleError(record)
            return
        if len(text) > self._max_line_chars:
            cut = self._max_line_chars - 40
            text = f"{text[:cut]} ... [{len(text) - cut} more characters]"
        size = len(text.encode("utf-8", "replace"))
        with self._ring_lock:
            self._entries.append(text)
            self._bytes += size
            while len(self._entries) > self._max_lines or (self._bytes > self._max_bytes and len(self._entries) > 1):
                self._bytes -= len(self._entries.popleft().encode("utf-8", "replace"))
                self.dropped += 1

    def tail(self, n: int) -> list[str]:
        """The newest ``n`` entries, oldest first."""
        with self._ring_lock:
            count = len(self._entries)
            return [self._entries[i] for i in range(max(0, count - n), count)]

    def __len__(self) -> int:
        with self._ring_lock:
            return len(self._entries)


class LogsArgsError(ValueError):
    """The ``logs`` command's arguments are not ``{"lines": 1..MAX_LINES}``."""


def parse_logs_args(args: dict[str, Any]) -> int:
    """How many lines a ``logs`` command asks for.

    Raises
    ------
    LogsArgsError
        An unknown argument, or ``lines`` that is not an integer in 1..MAX_LINES.
    """
    unknown = sorted(set(args) - {"lines"})
    if unknown:
        raise LogsArgsError(f"logs takes only 'lines'; unknown argument(s): {', '.join(map(repr, unknown))}"[:512])
    lines = args.get("lines", DEFAULT_LINES)
    if isinstance(lines, bool) or not isinstance(lines, int) or not 1 <= lines <= MAX_LINES:
        raise LogsArgsError(f"logs: 'lines' must be an integer in 1..{MAX_LINES}, got {lines!r}"[:512])
    return lines


def logs_result(ring: LogRing, lines: int, budget_bytes: int = RESULT_BUDGET_BYTES) -> dict[str, Any]:
    """The ack's result for ``logs``: the newest ``lines`` entries that fit ``budget_bytes`` of JSON.

    ``{"lines": [oldest, ..., newest], "requested": N, "available": entries in the ring, "truncated": bool,
    "dropped": entries the ring has pushed out since the agent started}``; ``truncated`` says that the byte
    budget left out older entries that were asked for.
    """
    wanted = ring.tail(lines)
    kept: list[str] = []
    used = 2  # []
    for line in reversed(wanted):  # the newest matter most: keep them, cut the oldest
        size = len(msgspec.json.encode(line)) + 1
        if used + size > budget_bytes:
            break
        kept.append(line)
        used += size
    kept.reverse()
    return {"lines": kept, "requested": lines, "available": len(ring), "truncated": len(kept) < len(wanted),
            "dropped": ring.dropped}
