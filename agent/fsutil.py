"""Crash-safe file writes: the one place in the tree where a file is replaced atomically.

A write goes to a uniquely named temporary file in the target's directory, is flushed and fsynced, renamed over
the target (``os.replace``, atomic on POSIX) and the directory is fsynced so that the rename itself survives a
power cut. A crash at any point leaves either the old content or the new one, never a mix, and no half-written
file under the target's name. Only the standard library: the federated tasks and the device agent both use it.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_writer", "fsync_path", "write_atomic"]


def fsync_path(path: Path) -> None:
    """fsync a file or a directory by path (a directory: so that the entries created or renamed in it persist)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: Path, *, mode: int | None = None) -> Iterator[BinaryIO]:
    """A binary file to write the new content of ``path`` into; it replaces ``path`` when the block ends.

    If the block raises, ``path`` is untouched and the temporary file removed. ``mode`` sets the file's
    permission bits exactly; by default they are what ``open`` would give a new file (0o666 less the umask).
    The parent directory must exist.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            if mode is not None:
                os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def write_atomic(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """Replace ``path`` with ``data`` so that a crash at any point leaves either the old or the new content."""
    with atomic_writer(path, mode=mode) as fh:
        fh.write(data)
