"""Control-plane state on disk is private to its user: the data directory 0700, database and key files 0600.

Created that way whatever the umask; a directory or file found with group/other access is tightened (it is ours:
tokens, credentials and models live there) and the change is logged.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import structlog

__all__ = ["private_dir", "private_file"]

log = structlog.get_logger("edgefleet.controlplane")


def private_dir(path: Path) -> Path:
    """Create `path` (and parents) as 0700, or tighten it to 0700 if it exists with group/other access."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    _tighten(path, 0o700)
    return path


def private_file(path: Path) -> Path:
    """Create `path` empty as 0600 if missing, or tighten it to 0600 if it exists with group/other access."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        _tighten(path, 0o600)
    return path


def _tighten(path: Path, mode: int) -> None:
    current = stat.S_IMODE(path.stat().st_mode)
    if current & 0o077:
        os.chmod(path, mode)
        log.warning("data.permissions_tightened", path=str(path), was=f"{current:04o}", now=f"{mode:04o}")
