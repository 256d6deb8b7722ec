"""Model manifests: what the control plane signs and what the agent checks before it runs a model.

A manifest describes one built artifact (a TFLite file of one variant). The control plane signs the manifest's
canonical JSON encoding with ed25519; the agent verifies the signature with the public key it was given at
enrolment, then the artifact's size and sha256, then runs the golden self-test. `cryptography` is imported only
when a signature is checked, so an idle agent does not carry it.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import msgspec

__all__ = [
    "MANIFEST_SCHEMA_VERSION",
    "Golden",
    "ManifestError",
    "ModelManifest",
    "ModelSource",
    "SignedManifest",
    "canonical_bytes",
    "decode_signed",
    "file_sha256",
    "key_id",
    "verify_artifact",
    "verify_signature",
]

MANIFEST_SCHEMA_VERSION = 1


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


def canonical_bytes(manifest: ModelManifest) -> bytes:
    """The exact bytes that are signed: JSON with sorted keys."""
    return msgspec.json.encode(msgspec.to_builtins(manifest), order="sorted")


def key_id(public_key_raw: bytes) -> str:
    return hashlib.sha256(public_key_raw).hexdigest()[:16]


def verify_signature(signed: SignedManifest, public_key_raw: bytes) -> ModelManifest:
    """Check the ed25519 signature; returns the manifest. Raises ManifestError saying why not."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if signed.key_id != key_id(public_key_raw):
        raise ManifestError(f"manifest signed by key {signed.key_id}, this device trusts {key_id(public_key_raw)}")
    try:
        signature = base64.b64decode(signed.signature, validate=True)
        Ed25519PublicKey.from_public_bytes(public_key_raw).verify(signature, canonical_bytes(signed.manifest))
    except (InvalidSignature, ValueError) as exc:
        raise ManifestError(f"bad signature on manifest of {signed.manifest.model_version}") from exc
    return signed.manifest


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
