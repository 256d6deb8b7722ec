"""amqtt 0.11 plugin of the embedded broker: authentication and topic ACLs from the credentials file.

Loaded through the broker config::

    "plugins": {"controlplane.broker._amqtt_plugin.EdgeFleetAuthPlugin": {"credentials_file": "/path/creds.json"}}

The file is re-read when it changes (inode, mtime or size), so enrolments and removals take effect without a
restart: on every CONNECT, and at most every ``reload_interval`` seconds for topic checks (PUBLISH, SUBSCRIBE,
RECEIVE) and by the broker's credentials watcher (``controlplane.broker._embedded``).

Identity: a device account may connect only with its device id (== its username) as client id. Every accepted
session is stamped with the credential (password hash) it authenticated with; a session whose stamp is no longer
the user's current credential (the password was rotated, the user removed or removed and enrolled again) is
*stale*: it is denied every topic action, and the broker closes its connection and drops it, queued messages and
subscriptions included.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from typing import Any

from amqtt.contexts import Action, BaseContext
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from ._credentials import CredentialsFile, UserEntry, acl_allows
from ._errors import BrokerAuthError
from ._passwords import verify_password

__all__ = ["CREDENTIAL_ATTR", "EdgeFleetAuthPlugin"]

# The attribute of an amqtt Session that holds the credential (password hash) it authenticated with.
CREDENTIAL_ATTR = "edgefleet_credential"


class EdgeFleetAuthPlugin(BaseAuthPlugin, BaseTopicPlugin):  # type: ignore[misc]
    """Both an auth plugin and a topic plugin: amqtt's plugin manager registers it as each."""

    @dataclass
    class Config:
        credentials_file: str = ""
        """Path of the JSON credentials file (see ``controlplane.broker._credentials``)."""
        reload_interval: float = 1.0
        """Topic checks look at the file at most this often (seconds); CONNECTs always do."""

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        path = getattr(self.config, "credentials_file", "")
        if not path:
            raise ValueError("EdgeFleetAuthPlugin needs 'credentials_file'")
        self._file = CredentialsFile(path)
        self._reload_interval = float(getattr(self.config, "reload_interval", 1.0))
        self._users: dict[str, UserEntry] = {}
        self._signature: tuple[int, int, int] | None = None
        self._checked_at = 0.0
        self.generation = 0
        """Bumped whenever the set of users or any credential changes: the broker then looks for stale sessions."""
        self._reload()

    @property
    def reload_interval(self) -> float:
        return self._reload_interval

    # -- credentials ------------------------------------------------------------------------------------------

    def _reload(self) -> None:
        """Re-read the file if it changed since the last read."""
        self._checked_at = time.monotonic()
        try:
            st = os.stat(self._file.path)
        except FileNotFoundError:
            if self._signature is not None or self._users:
                self.context.logger.warning(
                    f"credentials file {self._file.path} disappeared; no user may connect"
                )
            if self._users:
                self.generation += 1
            self._users, self._signature = {}, None
            return
        except OSError as exc:
            self.context.logger.error(f"cannot stat credentials file {self._file.path}: {exc}")
            return
        signature = (st.st_ino, st.st_mtime_ns, st.st_size)
        if signature == self._signature:
            return
        try:
            users = self._file.load()
        except BrokerAuthError as exc:
            # Writers replace the file atomically, so this is a real problem; keep the last good state.
            self.context.logger.error(f"{exc}; keeping the previous {len(self._users)} user(s)")
            return
        if users != self._users:
            self.generation += 1
        self._users, self._signature = users, signature
        self.context.logger.info(f"{len(users)} broker user(s) loaded from {self._file.path}")

    def refresh(self) -> None:
        """Re-read the file now if it changed (the broker's watcher calls this every ``reload_interval``)."""
        self._reload()

    def is_current(self, session: Session) -> bool:
        """Whether ``session`` authenticated with its user's current credential (the file as last read)."""
        entry = self._users.get(session.username or "")
        return entry is not None and getattr(session, CREDENTIAL_ATTR, None) == entry.hash

    def _user(self, username: str | None, *, fresh: bool) -> UserEntry | None:
        if fresh or time.monotonic() - self._checked_at >= self._reload_interval:
            self._reload()
        if not username:
            return None
        return self._users.get(username)

    # -- amqtt hooks ------------------------------------------------------------------------------------------

    async def authenticate(self, *, session: Session) -> bool | None:
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
        # PBKDF2 takes tens of milliseconds and releases the GIL: keep the event loop serving other clients.
        if entry.role == "device" and session.client_id != username:
            # Client ids name sessions: another id would resume, or wipe, that client's session and its commands.
            self.context.logger.info(
                f"refused {username!r}: client id {session.client_id!r} is not its device id"
            )
            return False
        if not await asyncio.to_thread(verify_password, password, entry.hash):
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
            self.context.logger.info(f"denied {action} of {topic!r} to {session.username!r}")
        return allowed
