"""The control plane's ed25519 model-signing key: it signs build manifests and deployments' releases.

:class:`Signer` keeps one key pair in a directory::

    signing-key.pem   the private key, PKCS#8 PEM, mode 0600 (created on first use, never overwritten)
    signing-key.pub   the raw 32-byte public key, base64, one line: what devices are enrolled with

The key is created lazily, the first time it is needed. Creation is atomic and race-free: the PEM is written to
a temporary file (0600 from the start), fsynced, and hard-linked into place, so a second process creating a key
at the same moment loses the race and uses the winner's key; no reader ever sees a partial key file.

Rotation (``edgefleet keys rotate``) adds keys beside the first one, never replacing a file::

    signing-key.<n>.pem / signing-key.<n>.pub   the key of rotation n (n >= 1)
    rotation.json                               the rotations and which one signs now (``active``), 0600

:meth:`Signer.begin_rotation` creates key n and a :class:`agent.manifest.KeyTransition` signed by the key in use;
signing goes on with the old key (devices that have not learned the new one must still accept new releases) until
:meth:`Signer.complete_rotation` switches to key n and signs a :class:`agent.manifest.KeyRetirement` with it.
The state lives beside the keys rather than in the control plane's database because every process that signs
(the control plane, a build pipeline worker) reads the key directory and nothing else: the key that signs and the
record of which key that is must never disagree. A signer reads ``rotation.json`` at each signature, so a
rotation completed by another process takes effect in this one too.
"""

from __future__ import annotations

import base64
import contextlib
import enum
import json
import logging
import os
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import msgspec

from agent.fsutil import write_atomic
from agent.manifest import (
    KeyRetirement,
    KeyTransition,
    ModelManifest,
    Release,
    SignedKeyRetirement,
    SignedKeyTransition,
    SignedManifest,
    SignedRelease,
    canonical_bytes,
    key_id,
    key_retirement_bytes,
    key_transition_bytes,
    release_bytes,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = ["PRIVATE_KEY_FILE", "PUBLIC_KEY_FILE", "ROTATION_FILE", "KeyRotation", "RotationStatus", "Signer",
           "SigningKeyError", "rotation_to_builtins"]

log = logging.getLogger(__name__)

PRIVATE_KEY_FILE: Final = "signing-key.pem"
PUBLIC_KEY_FILE: Final = "signing-key.pub"
ROTATION_FILE: Final = "rotation.json"
_LOCK_FILE: Final = ".rotation.lock"


class SigningKeyError(RuntimeError):
    """The signing key cannot be read, is not an ed25519 key, or is readable by others."""


class RotationStatus(enum.StrEnum):
    IN_PROGRESS = "in_progress"  # devices are learning the new key; the old one still signs
    COMPLETE = "complete"  # the new key signs; the old one is retired


class KeyRotation(msgspec.Struct, kw_only=True):
    """One signing-key rotation as ``rotation.json`` records it."""

    number: int
    old_key_id: str
    new_key_id: str
    new_public_key: str  # base64
    issued_at: int
    status: RotationStatus = RotationStatus.IN_PROGRESS
    completed_at: float | None = None  # unix seconds, not rounded: devices enrolled after it need no statement
    transition: SignedKeyTransition
    retirement: SignedKeyRetirement | None = None


class _RotationState(msgspec.Struct, kw_only=True):
    version: int = 1
    active: int = 0  # the rotation number whose key signs now (0: the first key)
    rotations: list[KeyRotation] = msgspec.field(default_factory=list)


class Signer:
    """Signs model manifests with the ed25519 key kept in ``key_dir`` (created there on first use); after a
    completed rotation, with the rotation's key (see the module docstring)."""

    def __init__(self, key_dir: str | os.PathLike[str]) -> None:
        self.key_dir = Path(key_dir)
        self._keys: dict[int, Ed25519PrivateKey] = {}

    def _key_file(self, number: int, suffix: str) -> Path:
        return self.key_dir / (f"signing-key.{suffix}" if number == 0 else f"signing-key.{number}.{suffix}")

    @property
    def private_key_path(self) -> Path:
        """The private key that signs now."""
        return self._key_file(self._state().active, "pem")

    @property
    def public_key_path(self) -> Path:
        return self._key_file(self._state().active, "pub")

    # ------------------------------------------------------------------------------------------------ keys

    def _private_key(self, number: int | None = None, *, create: bool = False) -> Ed25519PrivateKey:
        """Key ``number`` (default: the one that signs now). The first key is created on first use, a rotation's
        only by :meth:`begin_rotation`: a rotation key that went missing is an error, never silently a new key
        that no device trusts."""
        if number is None:
            number = self._state().active
        key = self._keys.get(number)
        if key is None:
            path = self._key_file(number, "pem")
            if path.exists():
                key = self._load(path)
            elif number == 0 or create:
                key = self._create(path)
            else:
                raise SigningKeyError(f"the key of signing-key rotation {number} is missing: {path}")
            self._keys[number] = key
            try:
                self._write_public_key(key, self._key_file(number, "pub"))
            except OSError as exc:  # signing still works; devices need the public key from elsewhere
                log.warning("cannot write public key %s: %s", self._key_file(number, "pub"), exc.strerror or exc)
        return key

    def _load(self, path: Path) -> Ed25519PrivateKey:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        try:
            mode = path.stat().st_mode
            data = path.read_bytes()
        except OSError as exc:
            raise SigningKeyError(f"cannot read signing key {path}: {exc.strerror or exc}") from exc
        if os.name == "posix" and stat.S_IMODE(mode) & 0o077:
            raise SigningKeyError(
                f"signing key {path} is accessible by other users (mode {stat.S_IMODE(mode):04o}): chmod 600 it"
            )
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise SigningKeyError(
                f"signing key {path} is not a readable unencrypted PEM private key"
            ) from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise SigningKeyError(f"signing key {path} is a {type(key).__name__}, not an ed25519 key")
        return key

    def _create(self, path: Path) -> Ed25519PrivateKey:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        self.key_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        fd, tmp = tempfile.mkstemp(dir=self.key_dir, prefix=f".{PRIVATE_KEY_FILE}.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o600)  # mkstemp creates 0600 already; be explicit
            with os.fdopen(fd, "wb") as fh:
                fh.write(pem)
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, path)  # fails if a key appeared meanwhile: never overwrite one
            except FileExistsError:
                log.info("another process created signing key %s first; using it", path)
                return self._load(path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        _fsync_dir(self.key_dir)
        log.info("created ed25519 signing key %s (key id %s)", path, self._key_id_of(key))
        return key

    @staticmethod
    def _raw_public(key: Ed25519PrivateKey) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def _key_id_of(self, key: Ed25519PrivateKey) -> str:
        return key_id(self._raw_public(key))

    def _write_public_key(self, key: Ed25519PrivateKey, public_path: Path) -> None:
        """(Re)write the key's ``.pub`` atomically unless it already holds this key's public half."""
        line = base64.b64encode(self._raw_public(key)).decode("ascii") + "\n"
        with contextlib.suppress(OSError):
            if public_path.read_text(encoding="ascii") == line:
                return
        fd, tmp = tempfile.mkstemp(dir=self.key_dir, prefix=f".{public_path.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o644)
            with os.fdopen(fd, "w", encoding="ascii") as fh:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, public_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @property
    def public_key_raw(self) -> bytes:
        """The 32-byte ed25519 public key (what ``agent.manifest.verify_signature`` takes)."""
        return self._raw_public(self._private_key())

    @property
    def public_key_b64(self) -> str:
        """The public key as devices are given it (the content of ``signing-key.pub``)."""
        return base64.b64encode(self.public_key_raw).decode("ascii")

    @property
    def key_id(self) -> str:
        return key_id(self.public_key_raw)

    # ---------------------------------------------------------------------------------------------- signing

    def sign_message(self, message: bytes) -> tuple[str, str]:
        """(base64 ed25519 signature, key id) of ``message`` with the key that signs now. ``message`` carries its
        own domain prefix (``release_bytes``, ``agent.trust.ca_bundle_bytes``, ...)."""
        private_key = self._private_key()
        return base64.b64encode(private_key.sign(message)).decode("ascii"), self._key_id_of(private_key)

    def sign(self, manifest: ModelManifest) -> SignedManifest:
        """The manifest with an ed25519 signature over ``canonical_bytes(manifest)`` and this key's id."""
        signature, signer_id = self.sign_message(canonical_bytes(manifest))
        return SignedManifest(manifest=manifest, signature=signature, key_id=signer_id)

    def sign_release(self, release: Release) -> SignedRelease:
        """A deployment's release with an ed25519 signature over ``release_bytes(release)`` (domain-prefixed)."""
        signature, signer_id = self.sign_message(release_bytes(release))
        return SignedRelease(release=release, signature=signature, key_id=signer_id)

    # --------------------------------------------------------------------------------------------- rotation

    @property
    def state_path(self) -> Path:
        return self.key_dir / ROTATION_FILE

    def _state(self) -> _RotationState:
        try:
            data = self.state_path.read_bytes()
        except FileNotFoundError:
            return _RotationState()
        except OSError as exc:
            raise SigningKeyError(f"cannot read {self.state_path}: {exc.strerror or exc}") from exc
        try:
            return msgspec.json.decode(data, type=_RotationState)
        except msgspec.DecodeError as exc:
            raise SigningKeyError(f"{self.state_path} is malformed: {exc}") from exc

    def _save_state(self, state: _RotationState) -> None:
        write_atomic(self.state_path, json.dumps(msgspec.to_builtins(state), indent=1).encode(), mode=0o600)

    @contextlib.contextmanager
    def _rotation_lock(self) -> Iterator[None]:
        """One rotation change at a time across processes (begin and complete read, then write, the state)."""
        import fcntl

        self.key_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.key_dir / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def rotations(self) -> list[KeyRotation]:
        """Every rotation so far, oldest first."""
        return list(self._state().rotations)

    def current_rotation(self) -> KeyRotation | None:
        """The latest rotation (in progress or complete), None before the first."""
        rotations = self._state().rotations
        return rotations[-1] if rotations else None

    def public_keys(self) -> dict[str, str]:
        """Key id -> base64 public key of every key this signer holds (the first one and each rotation's)."""
        state = self._state()
        numbers = [0, *(r.number for r in state.rotations)]
        return {key_id(raw): base64.b64encode(raw).decode("ascii")
                for raw in (self._raw_public(self._private_key(n)) for n in numbers)}

    def begin_rotation(self, now: float | None = None) -> KeyRotation:
        """Create the next key and the statement, signed by the key in use, that tells devices to trust it.

        Signing goes on with the current key. Raises SigningKeyError while another rotation is in progress.
        """
        with self._rotation_lock():
            state = self._state()
            last = state.rotations[-1] if state.rotations else None
            if last is not None and last.status is RotationStatus.IN_PROGRESS:
                raise SigningKeyError(f"signing-key rotation {last.number} is in progress (new key "
                                      f"{last.new_key_id}): complete it first")
            number = (last.number if last else 0) + 1
            old = self._private_key(state.active)
            new_raw = self._raw_public(self._private_key(number, create=True))
            statement = KeyTransition(number=number, new_public_key=base64.b64encode(new_raw).decode("ascii"),
                                      new_key_id=key_id(new_raw), old_key_id=self._key_id_of(old),
                                      issued_at=int(now if now is not None else time.time()))
            signed = SignedKeyTransition(
                statement=statement,
                signature=base64.b64encode(old.sign(key_transition_bytes(statement))).decode("ascii"),
                key_id=self._key_id_of(old))
            rotation = KeyRotation(number=number, old_key_id=statement.old_key_id, new_key_id=statement.new_key_id,
                                   new_public_key=statement.new_public_key, issued_at=statement.issued_at,
                                   transition=signed)
            state.rotations.append(rotation)
            self._save_state(state)
        log.info("signing-key rotation %d begun: new key %s (signing goes on with %s)", number,
                 rotation.new_key_id, rotation.old_key_id)
        return rotation

    def complete_rotation(self, now: float | None = None) -> KeyRotation:
        """Switch signing to the rotation's new key and sign the statement that retires the old one.

        Raises SigningKeyError when no rotation is in progress.
        """
        with self._rotation_lock():
            state = self._state()
            last = state.rotations[-1] if state.rotations else None
            if last is None or last.status is not RotationStatus.IN_PROGRESS:
                raise SigningKeyError("no signing-key rotation is in progress (start one with `keys rotate`)")
            new = self._private_key(last.number)
            completed = now if now is not None else time.time()
            issued = int(completed)
            statement = KeyRetirement(number=last.number, retired_key_id=last.old_key_id,
                                      new_key_id=last.new_key_id, issued_at=issued)
            last.retirement = SignedKeyRetirement(
                statement=statement,
                signature=base64.b64encode(new.sign(key_retirement_bytes(statement))).decode("ascii"),
                key_id=self._key_id_of(new))
            last.status, last.completed_at = RotationStatus.COMPLETE, completed
            state.active = last.number
            self._save_state(state)
        log.info("signing-key rotation %d complete: %s signs, %s is retired", last.number, last.new_key_id,
                 last.old_key_id)
        return last

    def __repr__(self) -> str:
        return f"Signer({str(self.key_dir)!r})"


def rotation_to_builtins(rotation: KeyRotation) -> dict[str, Any]:
    """A rotation as JSON-ready builtins."""
    data: dict[str, Any] = msgspec.to_builtins(rotation)
    return data


def _fsync_dir(directory: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
