"""amqtt 0.11 plugin of the embedded broker: authentication and topic ACLs from the credentials file.

Loaded through the broker config::

    "plugins": {"controlplane.broker._amqtt_plugin.EdgeFleetAuthPlugin": {"credentials_file": "/path/creds.json"}}

The users are read once into memory; after that only the credentials database's change log is read (one indexed
query), so enrolments and removals take effect without a restart: on every CONNECT, and at most every
``reload_interval`` seconds for topic checks (PUBLISH, SUBSCRIBE, RECEIVE) and by the broker's credentials watcher
(``controlplane.broker._embedded``). Verifying a generated secret is one HMAC-SHA256 (microseconds, on the event
loop); a PBKDF2 hash of an earlier version runs in a thread once per process and credential.

Identity: a device account may connect only with its device id (== its username) as client id. On a TLS listener a
device may prove its id with a client certificate of the fleet CA instead of its password (as mosquitto's
``use_identity_as_username``): the handshake verified the certificate against the CA bundle and the broker puts its
CN on the session (``CERT_CN_ATTR``, ``controlplane.broker._embedded``). The certificate only proves the id; the
credentials database decides whether that id is an enrolled device now, so a removed device is refused, and a
username other than the CN is refused. Every accepted
session is stamped with the credential (password hash) it authenticated with; a session whose stamp is no longer
the user's current credential (the password was rotated, the user removed or removed and enrolled again) is
*stale*: it is denied every topic action, and the broker closes its connection and drops it, queued messages and
subscriptions included.

Denials: a PUBLISH or SUBSCRIBE the ACL refuses (a device on another device's topic: a bug, or a hostile device) is
a warning on the ``controlplane.broker.acl`` logger naming the client, its username, the action and the topic, at
most one line per client every ``DENIAL_LOG_INTERVAL`` seconds (the next line says how many were left out), so a
device cannot flood the log. Every denial is counted (:class:`DenialLog`); the broker logs a one-line summary of
the counts when they changed, at most every ``DENIAL_SUMMARY_INTERVAL`` seconds, and on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from amqtt.contexts import Action, BaseContext
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from ._credentials import CredentialsFile, UserEntry, acl_allows
from ._errors import BrokerAuthError
from ._passwords import is_slow_hash, verify_password

__all__ = ["CERT_CN_ATTR", "CREDENTIAL_ATTR", "DENIAL_LOG_INTERVAL", "DENIAL_SUMMARY_INTERVAL", "DenialLog",
           "EdgeFleetAuthPlugin"]

# The attribute of an amqtt Session that holds the credential (password hash) it authenticated with.
CREDENTIAL_ATTR = "edgefleet_credential"
# The attribute the broker (controlplane.broker._embedded) puts a verified client certificate's CN in. Defined here,
# not imported from _embedded, which imports this module: that was an import cycle (tests/test_packaging.py).
CERT_CN_ATTR = "edgefleet_cert_cn"

# At most one denial line per client this often (seconds); the broker's summary of the counts at most this often.
DENIAL_LOG_INTERVAL = 10.0
DENIAL_SUMMARY_INTERVAL = 60.0
_DENIAL_LOGGER = logging.getLogger("controlplane.broker.acl")
_SUMMARY_TOP = 5  # users named in a summary line


class DenialLog:
    """ACL denials: counted, and logged at warning at most once per client every ``interval`` seconds.

    Memory is bounded by the clients that were denied (only authenticated sessions reach the ACL, so by the
    accounts), and entries whose window has passed are dropped once there are many.
    """

    def __init__(self, logger: logging.Logger = _DENIAL_LOGGER, interval: float = DENIAL_LOG_INTERVAL) -> None:
        self._logger = logger
        self._interval = interval
        # client id -> (monotonic time of its last line, denials left out since)
        self._windows: dict[str, tuple[float, int]] = {}
        self.by_action: Counter[str] = Counter()
        """Denials since the broker started, by action (``publish``, ``subscribe``)."""
        self.by_user: Counter[str] = Counter()
        """Denials since the broker started, by username."""
        self._summarised = 0

    @property
    def total(self) -> int:
        return sum(self.by_action.values())

    def record(self, client_id: str, username: str, action: str, topic: str) -> None:
        """Count one denial and log it unless this client had a line within the interval."""
        self.by_action[action] += 1
        self.by_user[username] += 1
        now = time.monotonic()
        last, left_out = self._windows.get(client_id, (None, 0))
        if last is not None and now - last < self._interval:
            self._windows[client_id] = (last, left_out + 1)
            return
        if len(self._windows) >= 1024:
            self._windows = {c: w for c, w in self._windows.items() if now - w[0] < self._interval}
        self._windows[client_id] = (now, 0)
        more = f" ({left_out} more denial(s) of this client left out since its last line)" if left_out else ""
        self._logger.warning(
            f"ACL denied {action} of {topic!r} to client {client_id!r} (user {username!r}){more}"
        )

    def summary(self, *, force: bool = False) -> str | None:
        """A one-line summary of the counts if they changed since the last one (or ``force`` and any)."""
        total = self.total
        if total == 0 or (total == self._summarised and not force):
            return None
        since, self._summarised = total - self._summarised, total
        actions = ", ".join(f"{action} {n}" for action, n in sorted(self.by_action.items()))
        users = ", ".join(f"{user!r} {n}" for user, n in self.by_user.most_common(_SUMMARY_TOP))
        others = len(self.by_user) - _SUMMARY_TOP
        more = f" and {others} more" if others > 0 else ""
        return f"ACL denials: {total} since start ({actions}), {since} since the last summary; by user: {users}{more}"

    def log_summary(self, *, force: bool = False) -> None:
        """Log :meth:`summary` at warning, if there is one."""
        line = self.summary(force=force)
        if line is not None:
            self._logger.warning(line)


class EdgeFleetAuthPlugin(BaseAuthPlugin, BaseTopicPlugin):  # type: ignore[misc]
    """Both an auth plugin and a topic plugin: amqtt's plugin manager registers it as each."""

    @dataclass
    class Config:
        credentials_file: str = ""
        """Path the credentials are named by (see ``controlplane.broker._credentials.database_path``)."""
        reload_interval: float = 1.0
        """Topic checks look at the change log at most this often (seconds); CONNECTs always do."""

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        path = getattr(self.config, "credentials_file", "")
        if not path:
            raise ValueError("EdgeFleetAuthPlugin needs 'credentials_file'")
        self._file = CredentialsFile(path)
        self._reload_interval = float(getattr(self.config, "reload_interval", 1.0))
        self._users: dict[str, UserEntry] = {}
        self._seq = 0
        self._inode: int | None = None
        self._checked_at = 0.0
        # Legacy (PBKDF2) hashes verified once in this process: hash -> HMAC of the password under a per-process
        # key, so a device with a credential of an earlier version does not cost 41 ms on every reconnect.
        self._verified_key = os.urandom(32)
        self._verified: dict[str, bytes] = {}
        self.denials = DenialLog()
        """Denied publishes and subscriptions: logged (rate-limited) and counted."""
        self.generation = 0
        """Bumped whenever the set of users or any credential changes: the broker then looks for stale sessions."""
        self._reload(full=True)
        with contextlib.suppress(OSError):
            self._inode = os.stat(self._file.database).st_ino

    @property
    def reload_interval(self) -> float:
        return self._reload_interval

    # -- credentials ------------------------------------------------------------------------------------------

    def _reload(self, *, full: bool = False) -> None:
        """Apply the changes logged since the last look (one indexed query), or re-read every user."""
        self._checked_at = time.monotonic()
        try:
            changed = None if full else self._file.changes_since(self._seq)
            if changed is None:
                self._seq, users = self._file.snapshot()
                if users != self._users:
                    self.generation += 1
                    self.context.logger.info(f"{len(users)} broker user(s) loaded from {self._file.database}")
                self._users = users
                current = {entry.hash for entry in users.values()}
                self._verified = {h: v for h, v in self._verified.items() if h in current}
                return
        except BrokerAuthError as exc:
            self.context.logger.error(f"{exc}; keeping the previous {len(self._users)} user(s)")
            return
        self._seq, updates = changed
        for username, entry in updates.items():
            old = self._users.get(username)
            if old == entry:
                continue
            self.generation += 1
            if old is not None:
                self._verified.pop(old.hash, None)
            if entry is None:
                self._users.pop(username, None)
            else:
                self._users[username] = entry

    def refresh(self) -> None:
        """Look for changes now (the broker's watcher calls this every ``reload_interval``)."""
        try:
            inode: int | None = os.stat(self._file.database).st_ino
        except OSError:
            inode = None
        if inode != self._inode:
            # The database was replaced or removed (a restore, an operator): start over from what is there now.
            if self._inode is not None:
                self.context.logger.warning(f"credentials database {self._file.database} was replaced")
                self._file.close()
            self._inode = inode
            if inode is None:
                if self._users:
                    self.generation += 1
                self._users, self._seq = {}, 0
                return
            self._reload(full=True)
            return
        self._reload()

    def is_current(self, session: Session) -> bool:
        """Whether ``session`` authenticated with its user's current credential (as last read)."""
        entry = self._users.get(session.username or "")
        return entry is not None and getattr(session, CREDENTIAL_ATTR, None) == entry.hash

    def _user(self, username: str | None, *, fresh: bool) -> UserEntry | None:
        if fresh or time.monotonic() - self._checked_at >= self._reload_interval:
            self._reload()
        if not username:
            return None
        return self._users.get(username)

    async def _verify(self, password: str, hashed: str) -> bool:
        if not is_slow_hash(hashed):
            return verify_password(password, hashed)  # one HMAC: cheaper inline than a hop to a thread
        mark = hmac.digest(self._verified_key, password.encode("utf-8", errors="replace"), "sha256")
        known = self._verified.get(hashed)
        if known is not None:
            return hmac.compare_digest(known, mark)
        # PBKDF2 takes tens of milliseconds and releases the GIL: keep the event loop serving other clients.
        if not await asyncio.to_thread(verify_password, password, hashed):
            return False
        self._verified[hashed] = mark
        return True

    # -- amqtt hooks ------------------------------------------------------------------------------------------

    async def authenticate(self, *, session: Session) -> bool | None:
        cert_cn = getattr(session, CERT_CN_ATTR, None)
        if cert_cn is not None:
            return self._authenticate_certificate(session, cert_cn)
        username = session.username
        entry = self._user(username, fresh=True)
        if entry is None:
            self.context.logger.info(
                f"refused {session.client_id!r}: unknown or missing username {username!r}"
            )
            return False
        password: Any = session.password
        if isinstance(password, bytes | bytearray):
            password = bytes(password).decode("utf-8", errors="replace")
        if not isinstance(password, str) or not password:
            self.context.logger.info(f"refused {username!r}: no password")
            return False
        if entry.role == "device" and session.client_id != username:
            # Client ids name sessions: another id would resume, or wipe, that client's session and its commands.
            self.context.logger.info(
                f"refused {username!r}: client id {session.client_id!r} is not its device id"
            )
            return False
        if not await self._verify(password, entry.hash):
            self.context.logger.info(f"refused {username!r}: wrong password")
            return False
        # amqtt publishes the Last Will without a topic check: refuse a will the user may not publish.
        if session.will_flag and not acl_allows(
            entry.role, username or "", Action.PUBLISH, session.will_topic or ""
        ):
            self.context.logger.info(
                f"refused {username!r}: Last Will topic {session.will_topic!r} not allowed"
            )
            return False
        # Stamped with what was verified: if the credential changed meanwhile, the watcher ends this session.
        setattr(session, CREDENTIAL_ATTR, entry.hash)
        return True

    def _authenticate_certificate(self, session: Session, device_id: str) -> bool:
        """A client certificate of the fleet CA (verified by the handshake) names ``device_id``: that device, no
        password, if it is enrolled now."""
        if session.username and session.username != device_id:
            self.context.logger.info(
                f"refused certificate {device_id!r}: username {session.username!r} is not its device id"
            )
            return False
        entry = self._user(device_id, fresh=True)
        if entry is None or entry.role != "device":
            self.context.logger.info(f"refused certificate {device_id!r}: not an enrolled device")
            return False
        if session.client_id != device_id:
            self.context.logger.info(
                f"refused certificate {device_id!r}: client id {session.client_id!r} is not its device id"
            )
            return False
        if session.will_flag and not acl_allows(entry.role, device_id, Action.PUBLISH, session.will_topic or ""):
            self.context.logger.info(
                f"refused certificate {device_id!r}: Last Will topic {session.will_topic!r} not allowed"
            )
            return False
        session.username = device_id  # the topic checks go by username
        # Stamped like a password session: rotating or removing the device's credential ends this session too.
        setattr(session, CERT_CN_ATTR, device_id)
        setattr(session, CREDENTIAL_ATTR, entry.hash)
        return True

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool | None:
        if session is None or topic is None or action is None:
            return False
        entry = self._user(session.username, fresh=False)
        if entry is None or getattr(session, CREDENTIAL_ATTR, None) != entry.hash:
            return False  # unknown user, or a session of a rotated/removed credential
        allowed = acl_allows(entry.role, session.username or "", str(action), topic)
        if not allowed:
            if action == Action.RECEIVE:
                # Not the client's doing: a wildcard subscription matched a topic it may not read; dropped quietly.
                self.context.logger.debug(f"denied {action} of {topic!r} to {session.username!r}")
            else:
                self.denials.record(session.client_id or "", session.username or "", str(action), topic)
        return allowed
