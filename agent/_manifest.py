"""Model manifests: what the control plane signs and what the agent checks before it runs a model.

Two signed documents, both ed25519 over a canonical JSON encoding (sorted keys), with the key the device was
given at enrolment:

- :class:`ModelManifest` (signed at build time): describes one built artifact, a TFLite file of one variant —
  sha256, size, runtimes, golden input/output. It says nothing about when or where it may be installed, so the
  agent never installs one on its own.
- :class:`Release` (signed when a deployment is created, per deployment and variant): embeds the artifact's
  manifest and adds what makes it safe to act on — the registry's monotonic ``release`` number, the ``task``,
  the ``device_classes`` (firmware profile names) it is for, the ``deployment_id`` it belongs to, an
  ``expires_at`` and a ``rollback`` flag (with ``rollback_from``: the highest release deployed when the
  rollback was signed, so a rollback cannot be replayed after a newer release). Its signature covers a domain
  prefix (``edgefleet-release-v1``), so no other signed document can be passed off as a release.

The agent checks the release (signature, binding, expiry, ordering), then the artifact's size and sha256, then
runs the golden self-test. `cryptography` is imported only when a signature is checked, so an idle agent does
not carry it.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import msgspec

__all__ = [
    "MANIFEST_SCHEMA_VERSION",
    "RELEASE_SCHEMA_VERSION",
    "Golden",
    "ManifestError",
    "ModelManifest",
    "ModelSource",
    "Release",
    "SignedManifest",
    "SignedRelease",
    "canonical_bytes",
    "decode_signed",
    "decode_signed_release",
    "file_sha256",
    "key_id",
    "release_bytes",
    "verify_artifact",
    "verify_release",
    "verify_signature",
]

MANIFEST_SCHEMA_VERSION = 1
RELEASE_SCHEMA_VERSION = 1
# Prefixed to a release's canonical bytes before signing: a signature over anything else never verifies as one.
_RELEASE_DOMAIN = b"edgefleet-release-v1\n"


class ManifestError(ValueError):
    """A manifest, its signature or the artifact it describes does not check out (the message says which)."""


class Golden(msgspec.Struct, forbid_unknown_fields=True):
    """A fixed input and the output the model must give for it (float, after dequantisation)."""

    input: list[list[float]]
    output: list[list[float]]
    tolerance: float  # max absolute difference per output value


class ModelSource(msgspec.Struct, forbid_unknown_fields=True):
    kind: str  # "round" | "burst" | "starter"
    id: str


class ModelManifest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    schema_version: int = MANIFEST_SCHEMA_VERSION
    model_version: str
    task: str
    variant: str  # fp32 | fp16 | dynamic-int8 | full-int8
    file_name: str
    sha256: str
    size_bytes: int
    # Runtimes (name -> minimum version) that run this variant correctly; a device on another runtime must refuse.
    runtimes: dict[str, str]
    source: ModelSource
    metrics: dict[str, float] = msgspec.field(default_factory=dict)
    input_scale: float = 1.0  # the task's preprocessing of raw inputs
    golden: Golden
    created_at: str = ""


class SignedManifest(msgspec.Struct, forbid_unknown_fields=True):
    manifest: ModelManifest
    signature: str  # base64 ed25519 signature of canonical_bytes(manifest)
    key_id: str  # sha256 of the raw public key, hex, first 16 characters


class Release(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """What a device verifies before it installs a model: an artifact, bound to a deployment, signed as such."""

    schema_version: int = RELEASE_SCHEMA_VERSION
    release: int  # the model version's number in the registry: strictly increasing across versions
    model_version: str
    variant: str
    task: str
    device_classes: list[str]  # firmware profile names this release is for
    deployment_id: int
    rollback: bool = False  # an operator's explicit rollback: may go below the device's release
    rollback_from: int = 0  # for a rollback: the highest release deployed when it was signed
    issued_at: int  # unix seconds
    expires_at: int  # unix seconds; devices allow a documented clock skew
    artifact: ModelManifest


class SignedRelease(msgspec.Struct, forbid_unknown_fields=True):
    release: Release
    signature: str  # base64 ed25519 signature of release_bytes(release)
    key_id: str


def canonical_bytes(manifest: ModelManifest) -> bytes:
    """The exact bytes that are signed: JSON with sorted keys."""
    return msgspec.json.encode(msgspec.to_builtins(manifest), order="sorted")


def key_id(public_key_raw: bytes) -> str:
    return hashlib.sha256(public_key_raw).hexdigest()[:16]


def verify_signature(signed: SignedManifest, public_key_raw: bytes) -> ModelManifest:
    """Check the ed25519 signature; returns the manifest. Raises ManifestError saying why not."""
    _verify(signed.signature, signed.key_id, canonical_bytes(signed.manifest), public_key_raw,
            f"manifest of {signed.manifest.model_version}")
    return signed.manifest


def release_bytes(release: Release) -> bytes:
    """The exact bytes a release signature covers: a domain prefix, then JSON with sorted keys."""
    return _RELEASE_DOMAIN + msgspec.json.encode(msgspec.to_builtins(release), order="sorted")


def _verify(signature_b64: str, claimed_key_id: str, message: bytes, public_key_raw: bytes, what: str) -> None:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if claimed_key_id != key_id(public_key_raw):
        raise ManifestError(f"{what} signed by key {claimed_key_id}, this device trusts {key_id(public_key_raw)}")
    try:
        signature = base64.b64decode(signature_b64, validate=True)
        Ed25519PublicKey.from_public_bytes(public_key_raw).verify(signature, message)
    except (InvalidSignature, ValueError) as exc:
        raise ManifestError(f"bad signature on {what}") from exc


def verify_release(signed: SignedRelease, public_key_raw: bytes) -> Release:
    """Check a release's ed25519 signature and that it describes its own artifact; returns the release."""
    release = signed.release
    _verify(signed.signature, signed.key_id, release_bytes(release), public_key_raw,
            f"release of {release.model_version}")
    artifact = release.artifact
    if (artifact.model_version, artifact.variant, artifact.task) != (release.model_version, release.variant,
                                                                     release.task):
        raise ManifestError(f"the release is for {release.model_version} ({release.variant}, task "
                            f"{release.task}), its artifact for {artifact.model_version} ({artifact.variant}, "
                            f"task {artifact.task})")
    return release


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_artifact(manifest: ModelManifest, path: Path) -> None:
    """Size and sha256 of a downloaded artifact against its manifest."""
    size = path.stat().st_size
    if size != manifest.size_bytes:
        raise ManifestError(f"{path.name}: {size} bytes, manifest says {manifest.size_bytes}")
    actual = file_sha256(path)
    if actual != manifest.sha256:
        raise ManifestError(f"{path.name}: sha256 {actual[:12]}…, manifest says {manifest.sha256[:12]}…")


def decode_signed(data: bytes | str) -> SignedManifest:
    try:
        return msgspec.json.decode(data, type=SignedManifest)
    except msgspec.DecodeError as exc:
        raise ManifestError(f"malformed signed manifest: {exc}") from exc


def decode_signed_release(data: bytes | str) -> SignedRelease:
    try:
        return msgspec.json.decode(data, type=SignedRelease)
    except msgspec.DecodeError as exc:
        try:
            decode_signed(data)
        except ManifestError:
            raise ManifestError(f"malformed signed release: {exc}") from exc
        raise ManifestError("a build manifest, not a release: it has no release number, deployment, device "
                            "classes or expiry, so it cannot be installed") from exc
