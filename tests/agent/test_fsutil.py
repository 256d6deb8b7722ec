"""agent.fsutil: the one atomic-write helper (temp file, fsync, os.replace, directory fsync)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from agent.fsutil import atomic_writer, write_atomic


def test_write_atomic_replaces_the_content_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    # Prepare
    target = tmp_path / "config.json"
    target.write_bytes(b"old")

    # Execute
    write_atomic(target, b"new")

    # Assert
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_a_failed_write_keeps_the_old_content(tmp_path: Path) -> None:
    # Prepare
    target = tmp_path / "status.json"
    target.write_bytes(b"old")

    # Execute: the writer fails half-way through
    with pytest.raises(RuntimeError, match="disk on fire"), atomic_writer(target) as fh:
        fh.write(b"half of the new")
        raise RuntimeError("disk on fire")

    # Assert
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]


def test_mode_sets_the_permission_bits_and_the_default_follows_the_umask(tmp_path: Path) -> None:
    # Prepare
    umask = os.umask(0o022)
    try:
        # Execute
        write_atomic(tmp_path / "secret", b"k", mode=0o600)
        write_atomic(tmp_path / "plain", b"p")
    finally:
        os.umask(umask)

    # Assert
    assert stat.S_IMODE((tmp_path / "secret").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o644
