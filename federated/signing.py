"""The control plane's ed25519 model-signing key: it signs build manifests and deployments' releases.

:class:`Signer` keeps one key pair in a directory::

    signing-key.pem   the private key, PKCS#8 PEM, mode 0600 (created on first use, never overwritten)
    signing-key.pub   the raw 32-byte public key, base64, one line: what devices are enrolled with

The key is created lazily, the first time it is needed. Creation is atomic and race-free: the PEM is written to
a temporary file (0600 from the start), fsynced, and hard-linked into place, so a second process creating a key
at the same moment loses the race and uses the winner's key; no reader ever sees a partial key file.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import stat
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Final

from agent.manifest import (
    ModelManifest,
    Release,
    SignedManifest,
    SignedRelease,
    canonical_bytes,
    key_id,
    release_bytes,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = ["PRIVATE_KEY_FILE", "PUBLIC_KEY_FILE", "Signer", "SigningKeyError"]

log = logging.getLogger(__name__)

PRIVATE_KEY_FILE: Final = "signing-key.pem"
PUBLIC_KEY_FILE: Final = "signing-key.pub"


class SigningKeyError(RuntimeError):
    """The signing key cannot be read, is not an ed25519 key, or is readable by others."""


class Signer:
    """Signs model manifests with the ed25519 key kept in ``key_dir`` (created there on first use)."""

    def __init__(self, key_dir: str | os.PathLike[str]) -> None:
        self.key_dir = Path(key_dir)
        self._key: Ed25519PrivateKey | None = None

    @property
    def private_key_path(self) -> Path:
        return self.key_dir / PRIVATE_KEY_FILE

    @property
    def public_key_path(self) -> Path:
        return self.key_dir / PUBLIC_KEY_FILE

    # ------------------------------------------------------------------------------------------------ keys

    def _private_key(self) -> Ed25519PrivateKey:
        if self._key is None:
            key = self._load() if self.private_key_path.exists() else self._create()
            self._key = key
            try:
                self._write_public_key(key)
            except OSError as exc:  # signing still works; devices need the public key from elsewhere
                log.warning("cannot write public key %s: %s", self.public_key_path, exc.strerror or exc)
        return self._key

    def _load(self) -> Ed25519PrivateKey:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        path = self.private_key_path
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

    def _create(self) -> Ed25519PrivateKey:
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
                os.link(tmp, self.private_key_path)  # fails if a key appeared meanwhile: never overwrite one
            except FileExistsError:
                log.info("another process created signing key %s first; using it", self.private_key_path)
                return self._load()
        finally:
            Path(tmp).unlink(missing_ok=True)
        _fsync_dir(self.key_dir)
        log.info("created ed25519 signing key %s (key id %s)", self.private_key_path, self._key_id_of(key))
        return key

    @staticmethod
    def _raw_public(key: Ed25519PrivateKey) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def _key_id_of(self, key: Ed25519PrivateKey) -> str:
        return key_id(self._raw_public(key))

    def _write_public_key(self, key: Ed25519PrivateKey) -> None:
        """(Re)write ``signing-key.pub`` atomically unless it already holds this key's public half."""
        line = base64.b64encode(self._raw_public(key)).decode("ascii") + "\n"
        with contextlib.suppress(OSError):
            if self.public_key_path.read_text(encoding="ascii") == line:
                return
        fd, tmp = tempfile.mkstemp(dir=self.key_dir, prefix=f".{PUBLIC_KEY_FILE}.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o644)
            with os.fdopen(fd, "w", encoding="ascii") as fh:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.public_key_path)
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

    def sign(self, manifest: ModelManifest) -> SignedManifest:
        """The manifest with an ed25519 signature over ``canonical_bytes(manifest)`` and this key's id."""
        private_key = self._private_key()
        signature = private_key.sign(canonical_bytes(manifest))
        return SignedManifest(
            manifest=manifest,
            signature=base64.b64encode(signature).decode("ascii"),
            key_id=self._key_id_of(private_key),
        )

    def sign_release(self, release: Release) -> SignedRelease:
        """A deployment's release with an ed25519 signature over ``release_bytes(release)`` (domain-prefixed)."""
        private_key = self._private_key()
        signature = private_key.sign(release_bytes(release))
        return SignedRelease(
            release=release,
            signature=base64.b64encode(signature).decode("ascii"),
            key_id=self._key_id_of(private_key),
        )

    def __repr__(self) -> str:
        return f"Signer({str(self.key_dir)!r})"


def _fsync_dir(directory: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
