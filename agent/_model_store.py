"""The installed models on disk: model directories, the pointer to the active one and the release record.

On-disk layout under ``<data_dir>/models``::

    current.json              {"model_version", "variant", "path", "sha256", "previous": {...} | null}
                              ("path" relative to this directory; a previous entry with "path": null is the
                              shipped starter model)
    release.json              {"release", "model_version", "variant", "sha256", "deployment_id", "rollback"}:
                              the highest release this device activated (lowered only by a signed rollback);
                              kept across restarts and watchdog rollbacks so neither reopens a downgrade
    <version>-<variant>/      model.tflite, manifest.json (the signed release as received)
    .partial/<sha>-<file>     a download in progress
    .tmp-*                    staging / discarded directories; never referenced by the pointer

Crash safety: a model directory is complete (fsynced, renamed into place) before the pointer names it, the
pointer is replaced atomically (:func:`agent.fsutil.write_atomic`), and directories are pruned only after the new
pointer is durable, never the ones it names. A kill -9 at any point therefore leaves the old or the new pointer,
each naming complete, verified files.

This module knows files only; which model runs is :class:`agent._active_model.ActiveModel`'s business.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Final

import msgspec

from agent._errors import DeployError
from agent.fsutil import fsync_path, write_atomic
from agent.logsetup import get_logger
from agent.manifest import ModelManifest, Release, file_sha256

__all__ = [
    "MANIFEST_FILE",
    "MODELS_DIR",
    "MODEL_FILE",
    "PARTIAL_DIR",
    "POINTER_FILE",
    "RELEASE_FILE",
    "Entry",
    "ModelStore",
    "Pointer",
    "ReleaseState",
]

log = get_logger("edgefleet.agent.ota")

MODELS_DIR: Final = "models"
POINTER_FILE: Final = "current.json"
RELEASE_FILE: Final = "release.json"
MODEL_FILE: Final = "model.tflite"
MANIFEST_FILE: Final = "manifest.json"
PARTIAL_DIR: Final = ".partial"
_TMP_PREFIX: Final = ".tmp-"


class Entry(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """One installed model. ``path`` is relative to the models directory; None (only as a previous entry)
    means the shipped starter model."""

    model_version: str
    variant: str | None = None
    path: str | None = None
    sha256: str | None = None

    @property
    def dir_name(self) -> str | None:
        return Path(self.path).parts[0] if self.path else None


class Pointer(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    model_version: str
    variant: str
    path: str
    sha256: str
    previous: Entry | None = None
    activated_at: float = 0.0

    @property
    def current(self) -> Entry:
        return Entry(self.model_version, self.variant, self.path, self.sha256)


class ReleaseState(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """The highest release this device activated: what a new release is compared with."""

    release: int
    model_version: str
    variant: str
    sha256: str
    deployment_id: int
    rollback: bool = False


class ModelStore:
    """The ``models`` directory of one agent (see the module docstring for the layout)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def partial_dir(self) -> Path:
        return self.root / PARTIAL_DIR

    # -- the release record ----------------------------------------------------------------------------------
    def read_release(self) -> ReleaseState | None:
        try:
            return msgspec.json.decode((self.root / RELEASE_FILE).read_bytes(), type=ReleaseState)
        except FileNotFoundError:
            return None
        except (OSError, msgspec.DecodeError) as exc:
            # Never forget a release because its record is damaged: that would reopen downgrades. Refuse instead.
            raise DeployError("release", f"the device's release record {self.root / RELEASE_FILE} is "
                                         f"unreadable ({exc}): refusing deployments until it is repaired") from exc

    def write_release(self, release: Release) -> None:
        state = ReleaseState(release.release, release.model_version, release.variant, release.artifact.sha256,
                             release.deployment_id, release.rollback)
        write_atomic(self.root / RELEASE_FILE, msgspec.json.format(msgspec.json.encode(state)) + b"\n")

    # -- the pointer -----------------------------------------------------------------------------------------
    def read_pointer(self) -> Pointer | None:
        try:
            return msgspec.json.decode((self.root / POINTER_FILE).read_bytes(), type=Pointer)
        except FileNotFoundError:
            return None
        except (OSError, msgspec.DecodeError) as exc:
            log.warning("ota.pointer_unreadable", path=str(self.root / POINTER_FILE), error=str(exc))
            return None

    def write_pointer(self, current: Entry, previous: Entry | None) -> None:
        assert current.path is not None and current.sha256 is not None and current.variant is not None
        pointer = Pointer(current.model_version, current.variant, current.path, current.sha256, previous,
                          time.time())
        write_atomic(self.root / POINTER_FILE, msgspec.json.format(msgspec.json.encode(pointer)) + b"\n")

    def remove_pointer(self) -> None:
        (self.root / POINTER_FILE).unlink(missing_ok=True)
        fsync_path(self.root)

    def entry_file(self, entry: Entry) -> Path | None:
        """The model file of an entry, if its path stays inside the models directory."""
        if not entry.path:
            return None
        path = (self.root / entry.path).resolve()
        return path if path.is_relative_to(self.root.resolve()) else None

    # -- installing ------------------------------------------------------------------------------------------
    def commit(self, artifact: Path, manifest_json: bytes, manifest: ModelManifest, previous: Entry | None) -> Entry:
        """Install a verified artifact as ``<version>-<variant>/`` and point ``current.json`` at it.

        ``artifact`` must be on the same file system (it is renamed, not copied). ``previous`` becomes the
        pointer's rollback entry and its directory is kept; every other model directory is deleted afterwards.
        """
        models = self.root
        name = f"{manifest.model_version}-{manifest.variant}"
        final = models / name
        if _intact(final, manifest.sha256):  # already installed (e.g. the previous model, deployed again): reuse
            artifact.unlink()
        else:
            staging = models / f"{_TMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
            staging.mkdir()
            os.replace(artifact, staging / MODEL_FILE)
            fsync_path(staging / MODEL_FILE)
            write_atomic(staging / MANIFEST_FILE, manifest_json)  # fsyncs the staging directory too
            if final.exists():  # a damaged install of the same version and variant: set it aside
                os.replace(final, models / f"{_TMP_PREFIX}old-{name}-{uuid.uuid4().hex[:8]}")
            os.replace(staging, final)
            fsync_path(models)
        if previous is not None and previous.dir_name == name:
            previous = None
        entry = Entry(manifest.model_version, manifest.variant, f"{name}/{MODEL_FILE}", manifest.sha256)
        self.write_pointer(entry, previous)
        self._prune(keep={name, previous.dir_name if previous else None})
        return entry

    def discard(self, entry: Entry, *, unless: Entry | None = None) -> None:
        """Delete an entry's model directory (not the starter's, nor ``unless``'s)."""
        if entry.dir_name and entry.dir_name != (unless.dir_name if unless else None):
            shutil.rmtree(self.root / entry.dir_name, ignore_errors=True)

    def _prune(self, keep: set[str | None]) -> None:
        """Delete model and staging directories other than ``keep`` (after the pointer is durable)."""
        for child in self.root.iterdir():
            if child.name == PARTIAL_DIR or child.name in keep or not child.is_dir() or child.is_symlink():
                continue
            shutil.rmtree(child, ignore_errors=True)

    def cleanup(self, keep_partial: Path | None) -> None:
        """Remove staging directories and partial downloads, except ``keep_partial`` (a download to resume)."""
        models = self.root
        for child in models.iterdir() if models.is_dir() else ():
            if child.name.startswith(_TMP_PREFIX) and child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
        partial_dir = self.partial_dir
        for child in partial_dir.iterdir() if partial_dir.is_dir() else ():
            if child != keep_partial:
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)


def _intact(model_dir: Path, sha256: str) -> bool:
    try:
        return (model_dir / MANIFEST_FILE).is_file() and file_sha256(model_dir / MODEL_FILE) == sha256
    except OSError:
        return False
