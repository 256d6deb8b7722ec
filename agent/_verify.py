"""Whether a release may run on this device: signature, binding, ordering and compatibility checks.

Pure functions of the release and :class:`DeviceFacts` (no I/O, no agent): each raises
:class:`agent._errors.DeployError` with the stage that refused and why, with the figures compared.
``cryptography`` is imported by :func:`agent.manifest.verify_signature` only when a signature is checked.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Final

from agent._errors import DeployError
from agent._model_store import ReleaseState
from agent.manifest import (
    ManifestError,
    ModelManifest,
    Release,
    TrustedKeys,
    decode_signed_release,
    verify_release,
)
from firmware_profiles import ModelVariant, Profile, RuntimeName, variant_unsupported

__all__ = [
    "CLOCK_SKEW_S",
    "DeviceFacts",
    "check_manifest",
    "check_release",
    "check_variant",
    "verify_signed_release",
    "version_at_least",
]

# How far this device's clock may be off the control plane's when a release's expiry is checked.
CLOCK_SKEW_S: Final = 300.0
_FILE_NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,199}$")


@dataclass(frozen=True)
class DeviceFacts:
    """What a release is checked against: the device's class, the runtime it runs now and its task."""

    profile: Profile
    runtime: str
    runtime_version: str
    task: str


def version_at_least(have: str, need: str) -> bool:
    """``have >= need`` as versions (``packaging``), on the release part: ``2.14.0rc1`` counts as ``2.14.0``,
    ``2.14`` as ``2.14.0``; an unparsable version is never enough."""
    from packaging.version import InvalidVersion, Version

    try:
        return Version(Version(have.strip()).base_version) >= Version(need.strip())
    except InvalidVersion:
        return False


def check_variant(device: DeviceFacts, variant: ModelVariant) -> None:
    profile = device.profile
    if not profile.allows(variant):
        raise DeployError("compatibility", f"variant {variant} is not allowed on profile {profile.name} "
                                           f"(allowed: {', '.join(map(str, profile.variants))})")
    name, version = device.runtime, device.runtime_version
    try:
        runtime_name = RuntimeName(name)
    except ValueError:
        return  # an unknown runtime has no measured restrictions; the manifest's runtimes decide
    why = variant_unsupported(runtime_name, version, variant)
    if why:
        raise DeployError("compatibility", f"variant {variant} is not supported on {name} {version}: {why}")


def verify_signed_release(manifest_json: bytes, signing_key: bytes | TrustedKeys) -> Release:
    """Decode a signed release and check its ed25519 signature (before anything else is trusted).

    ``signing_key``: the one key the device trusts, or its trust store's keys
    (:meth:`agent.trust.TrustStore.trusted`): the release must be signed by one of them; a release signed by a
    retired key is refused with a reason naming that key.
    """
    try:
        signed = decode_signed_release(manifest_json)
    except ManifestError as exc:
        raise DeployError("manifest", f"manifest rejected: {exc}") from exc
    try:
        return verify_release(signed, signing_key)
    except ManifestError as exc:
        raise DeployError("signature", f"manifest signature rejected: {exc}") from exc


def check_release(device: DeviceFacts, release: Release, deployment_id: int, floor: ReleaseState | None,
                  now: float) -> None:
    """Binding (deployment, device class, task), expiry and ordering of a verified release."""
    profile = device.profile.name
    if release.deployment_id != deployment_id:
        raise DeployError("release", f"the release belongs to deployment {release.deployment_id}, the command "
                                     f"to deployment {deployment_id}")
    if profile not in release.device_classes:
        raise DeployError("release", f"the release is for device classes {', '.join(release.device_classes)}, "
                                     f"this device is {profile}")
    if release.task != device.task:
        raise DeployError("release", f"the release is a {release.task!r} model, this device runs task "
                                     f"{device.task!r}")
    if now > release.expires_at + CLOCK_SKEW_S:
        raise DeployError("release", f"the release expired {now - release.expires_at:.0f} s ago (at "
                                     f"{_utc(release.expires_at)}; clock skew allowed {CLOCK_SKEW_S:g} s)")
    if release.issued_at > now + CLOCK_SKEW_S:
        raise DeployError("release", f"the release was issued {release.issued_at - now:.0f} s in the future "
                                     f"({_utc(release.issued_at)}): check this device's clock")
    if floor is None or release.release > floor.release:
        return
    if release.release == floor.release and release.artifact.sha256 == floor.sha256:
        return  # the same artifact again (e.g. after a watchdog rollback, or a lost pointer)
    active = f"release {floor.release} ({floor.model_version} {floor.variant})"
    if not release.rollback:
        raise DeployError("release", f"release {release.release} ({release.model_version} {release.variant}) "
                                     f"is not newer than this device's {active}; only a deployment signed as a "
                                     f"rollback may go back")
    if floor.release > release.rollback_from:
        raise DeployError("release", f"the rollback to release {release.release} was signed when release "
                                     f"{release.rollback_from} was the newest; this device has {active}")


def _utc(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def check_manifest(device: DeviceFacts, manifest: ModelManifest, model_version: str, variant: str) -> None:
    """The artifact is the one the command names, safely named, built for this runtime and small enough."""
    if manifest.model_version != model_version or manifest.variant != variant:
        raise DeployError("manifest", f"the manifest is for {manifest.model_version} ({manifest.variant}), "
                                      f"the command for {model_version} ({variant})")
    if not _FILE_NAME_RE.fullmatch(manifest.file_name):
        raise DeployError("manifest", f"unsafe artifact file name {manifest.file_name!r} in the manifest")
    if not re.fullmatch(r"[0-9a-f]{64}", manifest.sha256):
        raise DeployError("manifest", f"malformed sha256 {manifest.sha256!r} in the manifest")
    name, version = device.runtime, device.runtime_version
    need = manifest.runtimes.get(name)
    if need is None:
        built_for = ", ".join(sorted(manifest.runtimes)) or "no"
        raise DeployError("compatibility", f"the model is built for {built_for} runtime(s), this device runs "
                                           f"{name} {version}")
    if not version_at_least(version, need):
        raise DeployError("compatibility", f"the model needs {name} >= {need}, this device runs {version}")
    limit = device.profile.max_model_bytes
    if manifest.size_bytes > limit:
        raise DeployError("compatibility", f"artifact is {manifest.size_bytes} bytes, profile "
                                           f"{device.profile.name} allows at most {limit}")
    if manifest.size_bytes <= 0:
        raise DeployError("manifest", f"artifact size {manifest.size_bytes} in the manifest")
