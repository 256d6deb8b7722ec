"""Model manifests: what the control plane signs and what the agent checks before it runs a model.

Two signed documents, both ed25519 over a canonical JSON encoding (sorted keys), with the key the device was
given at enrolment:

- :class:`ModelManifest` (signed at build time): describes one built artifact, a TFLite file of one variant —
  sha256, size, runtimes, its input contract (:class:`InputContract`: the preprocessing from a raw sample to
  model input), golden input/output. It says nothing about when or where it may be installed, so the
  agent never installs one on its own.
- :class:`Release` (signed when a deployment is created, per deployment and variant): embeds the artifact's
  manifest and adds what makes it safe to act on — the registry's monotonic ``release`` number, the ``task``,
  the ``device_classes`` (firmware profile names) it is for, the ``deployment_id`` it belongs to, an
  ``expires_at`` and a ``rollback`` flag (with ``rollback_from``: the highest release deployed when the
  rollback was signed, so a rollback cannot be replayed after a newer release). Its signature covers a domain
  prefix (``edgefleet-release-v1``), so no other signed document can be passed off as a release.

Signing-key rotation adds two more, each with its own domain prefix:

- :class:`KeyTransition` (``edgefleet-key-transition-v1``), signed by the key being replaced: the new public key,
  its id, the old key's id, ``issued_at`` and the rotation ``number`` (strictly increasing: a device refuses a
  statement whose number is not above every one it has accepted, so an old statement cannot be replayed).
- :class:`KeyRetirement` (``edgefleet-key-retirement-v1``), signed by the NEW key once the fleet has learned it:
  the retired key's id, the new key's id and the same rotation number. A device then drops the retired key.

Signatures are checked against one key (raw bytes) or a device's :class:`TrustedKeys` (every key it trusts, by
key id, and the ids it has retired, so that a refusal names the retired key).

The agent checks the release (signature, binding, expiry, ordering), then the artifact's size and sha256, then
runs the golden self-test: the golden input is a RAW sample, and the self-test runs it through the same path as
live inference (raw -> the manifest's input contract -> model), so a model whose preprocessing is wrong on the
device fails its self-test instead of predicting garbage.

Manifests of schema version 1 (before the contract) carry only ``input_scale`` and a golden input that is
already model input: :meth:`ModelManifest.input_contract` and :meth:`ModelManifest.raw_golden` read them as the
contract ``x * input_scale`` and the golden input ``/ input_scale``, which is exactly what they declared. `cryptography` is imported only when a signature is checked, so an idle agent does
not carry it.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import msgspec

__all__ = [
    "KEY_STATEMENT_SCHEMA_VERSION",
    "MANIFEST_SCHEMA_VERSION",
    "RELEASE_SCHEMA_VERSION",
    "Golden",
    "InputContract",
    "KeyRetirement",
    "KeyTransition",
    "ManifestError",
    "ModelManifest",
    "ModelSource",
    "Release",
    "SignedKeyRetirement",
    "SignedKeyTransition",
    "SignedManifest",
    "SignedRelease",
    "TrustedKeys",
    "canonical_bytes",
    "decode_signed",
    "decode_signed_release",
    "file_sha256",
    "key_id",
    "key_retirement_bytes",
    "key_transition_bytes",
    "release_bytes",
    "verify_artifact",
    "verify_key_retirement",
    "verify_key_transition",
    "verify_release",
    "verify_signature",
]

MANIFEST_SCHEMA_VERSION = 2  # 2: the input contract (``preprocessing``) and a raw golden input
RELEASE_SCHEMA_VERSION = 1
# Prefixed to a release's canonical bytes before signing: a signature over anything else never verifies as one.
_RELEASE_DOMAIN = b"edgefleet-release-v1\n"
_TRANSITION_DOMAIN = b"edgefleet-key-transition-v1\n"
_RETIREMENT_DOMAIN = b"edgefleet-key-retirement-v1\n"
KEY_STATEMENT_SCHEMA_VERSION = 1


class ManifestError(ValueError):
    """A manifest, its signature or the artifact it describes does not check out (the message says which)."""


class Golden(msgspec.Struct, forbid_unknown_fields=True):
    """A fixed input and the output the model must give for it (float, after dequantisation)."""

    input: list[list[float]]
    output: list[list[float]]
    tolerance: float  # max absolute difference per output value


class InputContract(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """What a model takes, and how a raw sample (as a device stores it) becomes that: ``x * scale + offset``.

    ``scale`` and ``offset`` hold one value (for every feature) or one per feature (the sample flattened, in C
    order); standardisation ``(x - mean) / std`` is ``scale = 1 / std``, ``offset = -mean / std``. ``shape`` is
    one sample's shape without the batch dimension (None: whatever the model takes, only for models that
    predate the contract); ``dtype`` the float type the preprocessing is computed in and the model is fed with
    (before a full-int8 model's own input quantisation). The agent applies exactly this to every raw sample,
    live and in the golden self-test (:class:`agent.runtime.Preprocessor`).
    """

    scale: list[float]
    offset: list[float] = msgspec.field(default_factory=lambda: [0.0])
    shape: list[int] | None = None
    dtype: str = "float32"
    source: str = "declared"  # how it came to be: "declared", "standardised on the training pool", "legacy ..."


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
    input_scale: float = 1.0  # schema 1's preprocessing (raw * input_scale); superseded by ``preprocessing``
    # The input contract (schema 2). None: a schema-1 manifest, whose contract is ``x * input_scale``.
    preprocessing: InputContract | None = None
    golden: Golden  # schema 2: a raw input; schema 1: model input (see raw_golden)
    created_at: str = ""

    def input_contract(self) -> InputContract:
        """The preprocessing this model needs: the declared contract, or schema 1's ``x * input_scale``."""
        if self.preprocessing is not None:
            return self.preprocessing
        return InputContract(scale=[self.input_scale], source=f"schema-1 manifest: x * input_scale "
                                                              f"({self.input_scale:g})")

    def raw_golden(self) -> Golden:
        """The golden test with a RAW input, for the one path raw -> :meth:`input_contract` -> model.

        A schema-1 manifest's golden input is model input; dividing by its ``input_scale`` gives the raw sample
        back (exactly so for powers of two such as the digits' 1/16).
        """
        if self.preprocessing is not None or self.input_scale in (0.0, 1.0):
            return self.golden
        raw = [[value / self.input_scale for value in row] for row in self.golden.input]
        return Golden(input=raw, output=self.golden.output, tolerance=self.golden.tolerance)


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


class KeyTransition(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """"Trust ``new_public_key`` too": signed by the key being replaced (``old_key_id``)."""

    schema_version: int = KEY_STATEMENT_SCHEMA_VERSION
    number: int  # the rotation's number: strictly increasing; a device refuses one not above all it accepted
    new_public_key: str  # base64 of the raw 32-byte ed25519 public key
    new_key_id: str
    old_key_id: str
    issued_at: int  # unix seconds


class SignedKeyTransition(msgspec.Struct, forbid_unknown_fields=True):
    statement: KeyTransition
    signature: str  # base64 ed25519 signature of key_transition_bytes(statement), by the old key
    key_id: str


class KeyRetirement(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """"Stop trusting ``retired_key_id``": signed by the new key (``new_key_id``) of rotation ``number``."""

    schema_version: int = KEY_STATEMENT_SCHEMA_VERSION
    number: int
    retired_key_id: str
    new_key_id: str
    issued_at: int


class SignedKeyRetirement(msgspec.Struct, forbid_unknown_fields=True):
    statement: KeyRetirement
    signature: str  # base64 ed25519 signature of key_retirement_bytes(statement), by the new key
    key_id: str


class TrustedKeys:
    """The keys a device trusts (key id -> raw public key) and the ids it has retired (key id -> rotation)."""

    def __init__(self, keys: dict[str, bytes], retired: dict[str, int] | None = None) -> None:
        self.keys = dict(keys)
        self.retired = dict(retired or {})

    def public_key(self, claimed_key_id: str, what: str) -> bytes:
        """The trusted key ``claimed_key_id``; ManifestError naming it when it is retired or unknown."""
        raw = self.keys.get(claimed_key_id)
        if raw is not None:
            return raw
        if claimed_key_id in self.retired:
            raise ManifestError(f"{what} signed by retired key {claimed_key_id} (retired by signing-key rotation "
                                f"{self.retired[claimed_key_id]}); this device trusts {', '.join(self.keys)}")
        raise ManifestError(f"{what} signed by key {claimed_key_id}, this device trusts "
                            f"{', '.join(self.keys) or 'no key'}")

    def __repr__(self) -> str:
        return f"TrustedKeys(keys={sorted(self.keys)}, retired={sorted(self.retired)})"


def canonical_bytes(manifest: ModelManifest) -> bytes:
    """The exact bytes that are signed: JSON with sorted keys."""
    return msgspec.json.encode(msgspec.to_builtins(manifest), order="sorted")


def key_id(public_key_raw: bytes) -> str:
    return hashlib.sha256(public_key_raw).hexdigest()[:16]


def verify_signature(signed: SignedManifest, public_key_raw: bytes | TrustedKeys) -> ModelManifest:
    """Check the ed25519 signature (with one key, or the trusted key it names); returns the manifest. Raises
    ManifestError saying why not."""
    _verify(signed.signature, signed.key_id, canonical_bytes(signed.manifest), public_key_raw,
            f"manifest of {signed.manifest.model_version}")
    return signed.manifest


def release_bytes(release: Release) -> bytes:
    """The exact bytes a release signature covers: a domain prefix, then JSON with sorted keys."""
    return _RELEASE_DOMAIN + msgspec.json.encode(msgspec.to_builtins(release), order="sorted")


def key_transition_bytes(statement: KeyTransition) -> bytes:
    """The exact bytes a key-transition signature covers: a domain prefix, then JSON with sorted keys."""
    return _TRANSITION_DOMAIN + msgspec.json.encode(msgspec.to_builtins(statement), order="sorted")


def key_retirement_bytes(statement: KeyRetirement) -> bytes:
    """The exact bytes a key-retirement signature covers: a domain prefix, then JSON with sorted keys."""
    return _RETIREMENT_DOMAIN + msgspec.json.encode(msgspec.to_builtins(statement), order="sorted")


def verify_key_transition(signed: SignedKeyTransition, keys: TrustedKeys) -> tuple[KeyTransition, bytes]:
    """Check a key transition: signed by a trusted key, which is the one it replaces, and the new key matches its
    id. Returns the statement and the new raw public key; ManifestError saying why not."""
    statement = signed.statement
    what = f"key transition {statement.number}"
    _verify(signed.signature, signed.key_id, key_transition_bytes(statement), keys, what)
    if signed.key_id != statement.old_key_id:
        raise ManifestError(f"{what} replaces key {statement.old_key_id} but is signed by {signed.key_id}")
    try:
        new_key = base64.b64decode(statement.new_public_key, validate=True)
    except ValueError as exc:
        raise ManifestError(f"{what}: the new public key is not base64") from exc
    if len(new_key) != 32:
        raise ManifestError(f"{what}: the new public key is {len(new_key)} bytes, an ed25519 key is 32")
    if key_id(new_key) != statement.new_key_id:
        raise ManifestError(f"{what}: the new key's id is {key_id(new_key)}, the statement says "
                            f"{statement.new_key_id}")
    return statement, new_key


def verify_key_retirement(signed: SignedKeyRetirement, keys: TrustedKeys) -> KeyRetirement:
    """Check a key retirement: signed by its new key (trusted), not retiring that key itself."""
    statement = signed.statement
    what = f"key retirement {statement.number}"
    if signed.key_id != statement.new_key_id:
        raise ManifestError(f"{what} must be signed by the new key {statement.new_key_id}, not {signed.key_id}")
    if statement.retired_key_id == statement.new_key_id:
        raise ManifestError(f"{what} retires its own signing key {statement.new_key_id}")
    _verify(signed.signature, signed.key_id, key_retirement_bytes(statement), keys, what)
    return statement


def _verify(signature_b64: str, claimed_key_id: str, message: bytes, keys: bytes | TrustedKeys, what: str) -> None:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if isinstance(keys, TrustedKeys):
        public_key_raw = keys.public_key(claimed_key_id, what)
    else:
        public_key_raw = keys
        if claimed_key_id != key_id(public_key_raw):
            raise ManifestError(f"{what} signed by key {claimed_key_id}, this device trusts {key_id(public_key_raw)}")
    try:
        signature = base64.b64decode(signature_b64, validate=True)
        Ed25519PublicKey.from_public_bytes(public_key_raw).verify(signature, message)
    except (InvalidSignature, ValueError) as exc:
        raise ManifestError(f"bad signature on {what}") from exc


def verify_release(signed: SignedRelease, public_key_raw: bytes | TrustedKeys) -> Release:
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
