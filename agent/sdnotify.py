"""systemd's notify protocol (``sd_notify(3)``) with the standard library: one datagram per message to the Unix
socket systemd names in ``$NOTIFY_SOCKET``, so the device needs no libsystemd binding.

With ``Type=notify`` systemd considers the agent started once it sends ``READY=1``; with ``WatchdogSec=`` it kills and
restarts an agent whose main loop stops sending ``WATCHDOG=1`` (a hang that ``Restart=on-failure`` alone never sees).
Outside systemd (no ``$NOTIFY_SOCKET``) every call does nothing, so the agent runs the same by hand.

Built once from the environment in the entry point (:meth:`Notifier.from_env`) and passed down::

    notifier = Notifier.from_env(os.environ)
    notifier.ready()                      # started: inference running (the broker may still be away)
    notifier.watchdog_if_due()            # from every main-loop turn; sends at half the watchdog interval
    notifier.stopping()                   # shutdown begins
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["Notifier"]


@dataclass
class Notifier:
    """Sends sd_notify messages to ``socket_path`` (None: not under systemd's notify, every call is a no-op).

    ``watchdog_s``: the watchdog interval systemd asked for (``WatchdogSec=``), None when there is none.
    """

    socket_path: str | None = None
    watchdog_s: float | None = None
    _last_ping: float = field(default=float("-inf"), repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Notifier:
        """The notifier systemd's environment describes (``NOTIFY_SOCKET``, ``WATCHDOG_USEC``, ``WATCHDOG_PID``)."""
        path = environ.get("NOTIFY_SOCKET") or None
        if path is not None and not path.startswith(("/", "@")):
            path = None  # vsock addresses (VMs) are not for a device agent
        watchdog_s = None
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        # WATCHDOG_PID names the process the watchdog is for: a child that inherited the variables is not it.
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            watchdog_s = int(usec) / 1_000_000
        return cls(path, watchdog_s)

    @property
    def enabled(self) -> bool:
        return self.socket_path is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=value`` lines in one datagram; False when not under systemd. Errors are not raised: a
        notification that cannot be sent must not stop the agent (systemd then restarts it, as it should)."""
        if self.socket_path is None:
            return False
        address = "\0" + self.socket_path[1:] if self.socket_path.startswith("@") else self.socket_path
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(address)
                sock.sendall("\n".join(assignments).encode())
        except OSError:
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """The service has started (``READY=1``)."""
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        """A one-line status that ``systemctl status`` shows."""
        return self.notify(f"STATUS={text}")

    def stopping(self) -> bool:
        """Shutdown has begun (``STOPPING=1``)."""
        return self.notify("STOPPING=1")

    def watchdog_if_due(self, now: float | None = None) -> bool:
        """``WATCHDOG=1`` if half the watchdog interval has passed since the last one; True when sent."""
        if self.watchdog_s is None or self.socket_path is None:
            return False
        now = time.monotonic() if now is None else now
        if now - self._last_ping < self.watchdog_s / 2:
            return False
        self._last_ping = now
        return self.notify("WATCHDOG=1")
