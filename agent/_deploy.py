"""The ``deploy_model`` command: fetch, check and download a signed release, then hand it to the active model.

The job, in order (any failure keeps the current model and acks ``ok=False`` with the reason and the stage)::

    checks      signing key configured, variant allowed by the profile and the runtime in use; manifest and
                artifact URLs on the control plane this device was enrolled with (same scheme, host and port;
                redirects elsewhere are refused)                                              (agent._download)
    release     download (small), decode, verify the ed25519 signature BEFORE anything else is downloaded;
                then: bound to this command's deployment, this device's class (profile) and task; not expired
                (CLOCK_SKEW_S allowed); release number above the device's (or equal, for the same artifact),
                unless it is a rollback signed as such and not older than the device's release; the artifact
                matches the command, lists this runtime at >= its minimum version, fits max_model_bytes
                                                                                                (agent._verify)
    artifact    streamed into models/.partial/ with HTTP Range resume, retries with backoff, stall timeout
    verify      size and sha256 against the manifest
    install     load on the device's runtime, golden self-test, commit on disk, swap, watchdog
                                                                        (agent._active_model.ActiveModel.install)
    cleanup     (finally) staging dirs and stale partial downloads; a partial download is kept for resume only
                when the download itself failed

One deployment at a time per agent: the job holds the active model's lock from start to end.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path
from typing import Any, Final

from agent import protocol as wire
from agent._errors import DeployError
from agent.commands import CommandContext, CommandResult
from agent.logsetup import get_logger
from firmware_profiles import ModelVariant

__all__ = ["handle"]

log = get_logger("edgefleet.agent.ota")

# Model versions become directory names: no separators, no "..", nothing exotic.
_MODEL_VERSION_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,99}$")
_DISK_MARGIN_BYTES: Final = 1 << 20
_LOCK_WAIT_S: Final = 10.0


def handle(ctx: CommandContext, command: wire.Command) -> CommandResult:
    """The ``deploy_model`` command: ``(ok, reason, result)``; see the module docstring for the steps."""
    args = command.args
    bound = log.bind(device_id=ctx.device_id, command_id=command.command_id)
    model_version, variant_arg = args.get("model_version"), args.get("variant")
    if not isinstance(model_version, str) or not _MODEL_VERSION_RE.fullmatch(model_version):
        return False, (f"model_version must be 1-100 letters, digits, '.', '_', '+' or '-', "
                       f"got {model_version!r}"), {}
    try:
        variant = ModelVariant(str(variant_arg))
    except ValueError:
        return False, (f"unknown variant {variant_arg!r} (one of: "
                       f"{', '.join(v.value for v in ModelVariant)})"), {}
    result: dict[str, Any] = {"model_version": model_version, "variant": str(variant)}
    models = ctx.models
    if (models.version, models.variant) == (model_version, str(variant)):
        return True, None, {**result, "already_active": True,
                            "message": f"{model_version} ({variant}) is already active"}
    if not models.lock.acquire(timeout=_LOCK_WAIT_S):
        return False, "another model deployment is in progress", result
    started = time.monotonic()
    try:
        result.update(_deploy(ctx, model_version, variant, args, bound))
    except DeployError as exc:
        bound.warning("ota.deploy_failed", model_version=model_version, variant=str(variant), stage=exc.stage,
                      reason=exc.reason)
        return False, exc.reason, {**result, "stage": exc.stage, "active_model": models.version}
    finally:
        models.lock.release()
    result["duration_s"] = round(time.monotonic() - started, 3)
    bound.info("ota.deployed", **result)
    return True, None, result


def _deploy(ctx: CommandContext, model_version: str, variant: ModelVariant, args: dict[str, Any],
            bound: Any) -> dict[str, Any]:
    # deferred: an agent that never deploys never imports these
    from agent._download import download, fetch_small, resolve_url
    from agent._verify import DeviceFacts, check_manifest, check_release, check_variant, verify_signed_release
    from agent.manifest import ManifestError, verify_artifact
    from agent.trust import trust_store_for

    settings = ctx.settings
    models = ctx.models
    policy = settings.download
    if settings.signing_key is None:
        raise DeployError("request", "no model signing key is configured on this device (--signing-key): "
                                     "refusing to deploy a model whose signature cannot be checked")
    runtime, runtime_version = models.device_runtime()
    device = DeviceFacts(settings.profile, runtime, runtime_version, settings.task)
    check_variant(device, variant)
    deployment_id = args.get("deployment_id")
    if not isinstance(deployment_id, int) or isinstance(deployment_id, bool):
        raise DeployError("request", f"deployment_id must be an integer, got {deployment_id!r}")
    manifest_url = resolve_url(args.get("manifest_url"), settings.controlplane_url, "manifest_url")
    artifact_url = resolve_url(args.get("artifact_url"), settings.controlplane_url, "artifact_url")
    bearer = args.get("bearer") if isinstance(args.get("bearer"), str) else None
    store = models.store
    store.partial_dir.mkdir(parents=True, exist_ok=True)
    floor = store.read_release()
    keep_partial: Path | None = None
    try:
        # 1. The release, signature checked before anything else is fetched.
        manifest_json = fetch_small(manifest_url, bearer, policy, "manifest")
        release = verify_signed_release(manifest_json,
                                        trust_store_for(settings.data_dir, settings.signing_key).trusted())
        manifest = release.artifact
        check_manifest(device, manifest, model_version, str(variant))
        check_release(device, release, deployment_id, floor, time.time())
        partial = store.partial_dir / f"{manifest.sha256[:16]}-{manifest.file_name}"
        have = partial.stat().st_size if partial.exists() else 0
        free = shutil.disk_usage(store.root).free
        if free < manifest.size_bytes - have + _DISK_MARGIN_BYTES:
            raise DeployError("disk", f"{free} bytes free in {store.root}, the artifact needs "
                                      f"{manifest.size_bytes}")
        # 2. The artifact, resumable, streamed to disk.
        bound.info("ota.downloading", url=artifact_url, size=manifest.size_bytes, resume_from=have)
        try:
            fetched = download(artifact_url, partial, manifest.size_bytes, bearer, policy)
        except DeployError as exc:
            keep_partial = partial if exc.keep_partial else None
            raise
        # 3. Size and sha256.
        try:
            verify_artifact(manifest, partial)
        except ManifestError as exc:
            raise DeployError("verify", f"artifact rejected: {exc}") from exc
        # 4. Load, self-test, commit, swap, watchdog: the active model's job.
        installed = models.install(partial, manifest_json, release)
        previous = installed.previous
        return {"path": installed.entry.path, "release": release.release, "deployment_id": release.deployment_id,
                "rollback": release.rollback, "sha256": manifest.sha256, "size_bytes": manifest.size_bytes,
                "previous": previous.model_version if previous else None, "self_test": installed.self_test,
                "download": fetched, "runtime": installed.runtime}
    finally:
        store.cleanup(keep_partial)
