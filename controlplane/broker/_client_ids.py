"""The control plane's own MQTT client ids: unguessable, and the same after a restart.

A client id names a broker session. Whoever connects with one resumes that session (persistent) or wipes it
(clean): a guessable id of the control plane (``edgefleet-ingest-<hostname>-0``) let anyone who may connect at all
delete ingest's subscriptions on a broker that does not bind client ids to accounts. The ids therefore carry a
random secret, created once and kept in ``$DATA_DIR/broker-client-id`` (mode 0600), so ingest's persistent
sessions survive restarts.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from pathlib import Path
from typing import Final

from ._errors import BrokerAuthError

__all__ = ["CLIENT_ID_FILE", "client_id_secret"]

CLIENT_ID_FILE: Final = "broker-client-id"
_SECRET_RE: Final = re.compile(r"^[0-9a-f]{24,64}$")


def client_id_secret(data_dir: str | os.PathLike[str]) -> str:
    """The secret part of the control plane's client ids, created on first use (24 hex digits, 96 bits).

    Raises
    ------
    BrokerAuthError
        The file cannot be read or written, or holds something else than such a secret.
    """
    path = Path(data_dir) / CLIENT_ID_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            secret = secrets.token_hex(12)
            with os.fdopen(fd, "w") as file:
                file.write(secret + "\n")
                file.flush()
                os.fsync(file.fileno())
            return secret
        secret = path.read_text().strip()
        with contextlib.suppress(OSError):  # keep it private even if someone loosened it
            if path.stat().st_mode & 0o077:
                path.chmod(0o600)
    except OSError as exc:
        raise BrokerAuthError(f"cannot read or create the control plane's client id file {path}: {exc}") from exc
    if not _SECRET_RE.fullmatch(secret):
        raise BrokerAuthError(
            f"{path} does not hold a client id secret (24-64 lowercase hex digits); remove it to create a new one "
            "(ingest then starts new broker sessions)"
        )
    return secret
