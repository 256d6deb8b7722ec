"""Output people read, shared by the CLI and the demo: a long step's progress line, why devices were not invited
summarized by reason, and the one-line status of a round and of a rollout as the API reports them.

A leaf module (standard library and :mod:`controlplane.statuses` only): the demo and every command group import it.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable
from typing import Any

from controlplane.statuses import RoundStatus, TargetStatus

__all__ = ["Progress", "deployment_progress", "round_progress", "summarize_ids", "summarize_skipped"]


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
            line = self._line(text)
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
