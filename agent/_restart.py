"""The ``restart`` command: when a restart is allowed, how it happens, and the record that keeps it from repeating.

How the agent comes back (:class:`RestartMode`, ``edgefleet agent run --on-restart`` / ``EDGEFLEET_AGENT_RESTART``):

- ``exit``: the agent stops cleanly and exits with :data:`RESTART_EXIT_CODE` (75, ``EX_TEMPFAIL``) for its
  supervisor to start it again. The unit ``edgefleet agent install`` writes has ``Restart=on-failure`` and
  ``RestartSec=10s``: any non-zero exit is restarted, so the agent is back about 10 s later. The same holds for a
  container with a restart policy (``on-failure`` / ``always``).
- ``exec``: the agent stops cleanly and replaces itself with the same command line (``os.execv``: same PID, same
  environment), for an agent run by hand or by a supervisor that would not restart it.
- ``auto`` (the default): ``exit`` under systemd's notify protocol (``$NOTIFY_SOCKET``, which the installed unit's
  ``Type=notify`` sets), else ``exec``.

When a restart is refused (acked with an error, nothing happens):

- the command is older than :data:`MAX_AGE_S` (or carries no time, or one from the future by more than that):
  a restart that waited at the broker through an outage is stale, and executing it on reconnect would restart a
  device nobody asked to restart now;
- the last restart was less than :data:`MIN_INTERVAL_S` ago (a script in a loop does not keep a device down).

A restart runs at most once: its command id and ack are written (atomically) to ``restart.json`` in the data dir
before it is acked, and a restarted agent answers a redelivery of that command (QoS 1 redelivers a command whose
PUBACK the broker did not see) with the recorded ack instead of restarting again.
"""

from __future__ import annotations

import enum
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from agent import protocol as wire
from agent.fsutil import write_atomic

__all__ = [
    "MAX_AGE_S",
    "MIN_INTERVAL_S",
    "RESTART_EXIT_CODE",
    "RestartLog",
    "RestartMode",
    "refusal",
    "resolve_mode",
]

RESTART_EXIT_CODE: Final = 75  # EX_TEMPFAIL: "try again"; any non-zero code makes Restart=on-failure restart
MAX_AGE_S: Final = 60.0
MIN_INTERVAL_S: Final = 15.0
# How long the agent waits for the broker to acknowledge the restart's ack before it stops anyway (the ack stays
# in the outbox and is sent after the restart).
ACK_WAIT_S: Final = 5.0
_KEEP: Final = 16  # restarts remembered


class RestartMode(enum.StrEnum):
    AUTO = "auto"
    EXIT = "exit"
    EXEC = "exec"


def resolve_mode(mode: RestartMode, environ: Mapping[str, str]) -> RestartMode:
    """``auto`` made concrete: ``exit`` under systemd's notify protocol, else ``exec``."""
    if mode is not RestartMode.AUTO:
        return mode
    return RestartMode.EXIT if environ.get("NOTIFY_SOCKET") else RestartMode.EXEC


def refusal(command: wire.Command, now: float, last_restart: float | None) -> str | None:
    """Why this restart command must not run, or None."""
    if command.args:
        return f"restart takes no arguments, got {', '.join(map(repr, sorted(command.args)))}"[:512]
    if not command.ts or command.ts <= 0:
        return "restart refused: the command carries no send time, so its age cannot be checked"
    age = now - command.ts
    if age > MAX_AGE_S:
        return (f"restart refused: the command is stale (sent {age:.0f} s ago, the limit is {MAX_AGE_S:.0f} s; "
                "it probably waited at the broker while the device was offline): send a new one")
    if age < -MAX_AGE_S:
        return (f"restart refused: the command was sent {-age:.0f} s in the device's future: the device's clock "
                "and the control plane's disagree")
    if last_restart is not None and 0 <= now - last_restart < MIN_INTERVAL_S:
        return (f"restart refused: the agent restarted {now - last_restart:.0f} s ago "
                f"(at most one restart per {MIN_INTERVAL_S:.0f} s)")
    return None


class RestartLog:
    """The restarts this agent executed (``restart.json``): their command ids, acks and times."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: list[dict[str, Any]] = []
        try:
            loaded = json.loads(path.read_bytes())
        except (OSError, ValueError):
            loaded = None
        if isinstance(loaded, dict) and isinstance(loaded.get("restarts"), list):
            self.entries = [e for e in loaded["restarts"][-_KEEP:]
                            if isinstance(e, dict) and isinstance(e.get("command_id"), str)
                            and isinstance(e.get("at"), int | float) and isinstance(e.get("ack"), dict)]

    def acks(self) -> list[wire.Ack]:
        """The recorded acks, oldest first (unreadable ones left out)."""
        acks = []
        for entry in self.entries:
            try:
                acks.append(wire.decode(json.dumps(entry["ack"]).encode(), wire.Ack))
            except wire.ProtocolError:
                continue
        return acks

    @property
    def last(self) -> float | None:
        return float(self.entries[-1]["at"]) if self.entries else None

    def record(self, ack: wire.Ack) -> None:
        """Write down a restart about to happen (before its ack is queued: a crash in between still counts)."""
        entry = {"command_id": ack.command_id, "at": time.time(), "pid": os.getpid(),
                 "ack": json.loads(wire.encode(ack))}
        self.entries = [*self.entries, entry][-_KEEP:]
        write_atomic(self.path, json.dumps({"restarts": self.entries}).encode())
