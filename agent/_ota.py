"""Over-the-air model deployment: one guarded job per ``deploy_model`` command.

The job, in order (any failure keeps the current model and acks ``ok=False`` with the reason)::

    checks      signing key configured, variant allowed by the profile and the runtime in use; manifest and
                artifact URLs on the control plane this device was enrolled with (same scheme, host and port;
                redirects elsewhere are refused)
    release     download (small), decode, verify the ed25519 signature BEFORE anything else is downloaded;
                then: bound to this command's deployment, this device's class (profile) and task; not expired
                (CLOCK_SKEW_S allowed); release number above the device's (or equal, for the same artifact),
                unless it is a rollback signed as such and not older than the device's release; the artifact
                matches the command, lists this runtime at >= its minimum version, fits max_model_bytes
    artifact    download into models/.partial/ with HTTP Range resume, retries with backoff, stall timeout
    verify      size and sha256 against the manifest
    load        TFLiteModel.load on the device's runtime
    self-test   predict on the golden input, compare with the golden output within its tolerance
    commit      the device's release (release.json) replaced atomically, then the model dir via a staging dir
                + rename, fsync, then the pointer file replaced atomically
    swap        InferenceLoop.swap_model, agent.model_version / active_variant, publish_state()
    watchdog    ~30 s: if more than half the new model's inferences fail, roll back to the previous model
    cleanup     (finally) staging dirs and stale partial downloads; a partial download is kept for resume only
                when the download itself failed

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
pointer is replaced atomically, and directories are pruned only after the new pointer is durable, never the
ones it names. A kill -9 at any point therefore leaves the old or the new pointer, each naming complete,
verified files; :func:`resolve_startup_model` re-verifies them anyway and falls back to the previous model,
then to the shipped starter.

Only the standard library (urllib), numpy, msgspec and the TFLite runtime are used; ``cryptography`` is
imported by :func:`agent.manifest.verify_signature` when a signature is checked, ``urllib.request`` when
downloading.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, cast
from urllib.parse import urljoin, urlsplit

import msgspec
import numpy as np
import numpy.typing as npt
import structlog

from agent import protocol as wire
from agent._daemon import Agent, write_atomic
from agent.manifest import (
    ManifestError,
    ModelManifest,
    Release,
    decode_signed_release,
    file_sha256,
    verify_artifact,
    verify_release,
)
from firmware_profiles import ModelVariant, RuntimeName, variant_unsupported

if TYPE_CHECKING:
    from agent.runtime import TFLiteModel

__all__ = [
    "CLOCK_SKEW_S",
    "DOWNLOAD",
    "MANIFEST_FILE",
    "MODEL_FILE",
    "POINTER_FILE",
    "RELEASE_FILE",
    "WATCHDOG",
    "DeployError",
    "DownloadPolicy",
    "Entry",
    "Pointer",
    "ReleaseState",
    "WatchdogPolicy",
    "handle_deploy_model",
    "resolve_startup_model",
    "rollback",
    "version_at_least",
]

log = structlog.get_logger("edgefleet.agent.ota")

MODELS_DIR: Final = "models"
POINTER_FILE: Final = "current.json"
RELEASE_FILE: Final = "release.json"
MODEL_FILE: Final = "model.tflite"
MANIFEST_FILE: Final = "manifest.json"
PARTIAL_DIR: Final = ".partial"
_TMP_PREFIX: Final = ".tmp-"
# Model versions become directory names: no separators, no "..", nothing exotic.
_MODEL_VERSION_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,99}$")
_FILE_NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,199}$")
_DISK_MARGIN_BYTES: Final = 1 << 20


@dataclass(frozen=True)
class DownloadPolicy:
    stall_timeout_s: float = 30.0  # no byte received for this long: the attempt fails
    total_timeout_s: float = 3600.0  # the whole artifact download, retries included
    attempts: int = 5  # consecutive failed attempts that made no progress before giving up
    backoff_s: float = 0.5  # first retry delay, doubled per failure
    backoff_max_s: float = 8.0
    manifest_max_bytes: int = 1 << 20
    chunk_bytes: int = 64 * 1024


@dataclass(frozen=True)
class WatchdogPolicy:
    window_s: float = 30.0  # how long a freshly activated model is watched
    error_ratio: float = 0.5  # roll back when more than this share of its inferences fail
    min_inferences: int = 5  # before the window ends, decide only on at least this many inferences
    poll_s: float = 0.2


# Module-level so an operator build (or a test) can tune them.
DOWNLOAD = DownloadPolicy()
WATCHDOG = WatchdogPolicy()
# How far this device's clock may be off the control plane's when a release's expiry is checked.
CLOCK_SKEW_S = 300.0


class DeployError(Exception):
    """A deployment step failed or was refused; ``stage`` says which, the message why (with figures)."""

    def __init__(self, stage: str, reason: str, *, keep_partial: bool = False) -> None:
        super().__init__(reason)
        self.stage = stage
        self.reason = reason
        self.keep_partial = keep_partial


class _Transient(Exception):
    """A network failure worth retrying."""


# ---------------------------------------------------------------------------------------------- the pointer


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


def _read_release(models: Path) -> ReleaseState | None:
    try:
        return msgspec.json.decode((models / RELEASE_FILE).read_bytes(), type=ReleaseState)
    except FileNotFoundError:
        return None
    except (OSError, msgspec.DecodeError) as exc:
        # Never forget a release because its record is damaged: that would reopen downgrades. Refuse instead.
        raise DeployError("release", f"the device's release record {models / RELEASE_FILE} is unreadable "
                                     f"({exc}): refusing deployments until it is repaired") from exc


def _write_release(models: Path, release: Release) -> None:
    state = ReleaseState(release.release, release.model_version, release.variant, release.artifact.sha256,
                         release.deployment_id, release.rollback)
    write_atomic(models / RELEASE_FILE, msgspec.json.format(msgspec.json.encode(state)) + b"\n")


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_pointer(models: Path) -> Pointer | None:
    try:
        return msgspec.json.decode((models / POINTER_FILE).read_bytes(), type=Pointer)
    except FileNotFoundError:
        return None
    except (OSError, msgspec.DecodeError) as exc:
        log.warning("ota.pointer_unreadable", path=str(models / POINTER_FILE), error=str(exc))
        return None


def _write_pointer(models: Path, current: Entry, previous: Entry | None) -> None:
    assert current.path is not None and current.sha256 is not None and current.variant is not None
    pointer = Pointer(current.model_version, current.variant, current.path, current.sha256, previous,
                      time.time())
    write_atomic(models / POINTER_FILE, msgspec.json.format(msgspec.json.encode(pointer)) + b"\n")


def _remove_pointer(models: Path) -> None:
    (models / POINTER_FILE).unlink(missing_ok=True)
    _fsync_path(models)


def _entry_file(models: Path, entry: Entry) -> Path | None:
    """The model file of an entry, if its path stays inside the models directory."""
    if not entry.path:
        return None
    path = (models / entry.path).resolve()
    return path if path.is_relative_to(models.resolve()) else None


def _commit(
    models: Path, artifact: Path, manifest_json: bytes, manifest: ModelManifest, previous: Entry | None
) -> Entry:
    """Install a verified artifact as ``<version>-<variant>/`` and point ``current.json`` at it.

    ``artifact`` must be on the same file system (it is renamed, not copied). ``previous`` becomes the
    pointer's rollback entry and its directory is kept; every other model directory is deleted afterwards.
    """
    name = f"{manifest.model_version}-{manifest.variant}"
    final = models / name
    if _intact(final, manifest.sha256):  # already installed (e.g. the previous model, deployed again): reuse
        artifact.unlink()
    else:
        staging = models / f"{_TMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        os.replace(artifact, staging / MODEL_FILE)
        _fsync_path(staging / MODEL_FILE)
        with open(staging / MANIFEST_FILE, "wb") as fh:
            fh.write(manifest_json)
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_path(staging)
        if final.exists():  # a damaged install of the same version and variant: set it aside
            os.replace(final, models / f"{_TMP_PREFIX}old-{name}-{uuid.uuid4().hex[:8]}")
        os.replace(staging, final)
        _fsync_path(models)
    if previous is not None and previous.dir_name == name:
        previous = None
    entry = Entry(manifest.model_version, manifest.variant, f"{name}/{MODEL_FILE}", manifest.sha256)
    _write_pointer(models, entry, previous)
    _prune(models, keep={name, previous.dir_name if previous else None})
    return entry


def _intact(model_dir: Path, sha256: str) -> bool:
    try:
        return (model_dir / MANIFEST_FILE).is_file() and file_sha256(model_dir / MODEL_FILE) == sha256
    except OSError:
        return False


def _prune(models: Path, keep: set[str | None]) -> None:
    """Delete model and staging directories other than ``keep`` (after the pointer is durable)."""
    for child in models.iterdir():
        if child.name == PARTIAL_DIR or child.name in keep or not child.is_dir() or child.is_symlink():
            continue
        shutil.rmtree(child, ignore_errors=True)


def _cleanup(models: Path, keep_partial: Path | None) -> None:
    """Remove staging directories and partial downloads, except ``keep_partial`` (a download to resume)."""
    for child in models.iterdir() if models.is_dir() else ():
        if child.name.startswith(_TMP_PREFIX) and child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
    partial_dir = models / PARTIAL_DIR
    for child in partial_dir.iterdir() if partial_dir.is_dir() else ():
        if child != keep_partial:
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------- startup


def resolve_startup_model(data_dir: Path, runtime: str) -> tuple[Path, str, str] | None:
    """The model the agent should start with: (path, model_version, variant), or None for the shipped starter.

    The pointer's current model if its file still has the recorded sha256 and loads on ``runtime``, else the
    previous model under the same checks, else None.
    """
    from agent.runtime import ModelLoadError, TFLiteModel, declared_contract

    models = Path(data_dir) / MODELS_DIR
    pointer = _read_pointer(models)
    if pointer is None:
        return None
    for label, entry in (("current", pointer.current), ("previous", pointer.previous)):
        if entry is None or entry.path is None or entry.sha256 is None or entry.variant is None:
            continue
        path = _entry_file(models, entry)
        if path is None:
            log.warning("ota.startup_model_rejected", which=label, path=entry.path,
                        reason="outside the models directory")
            continue
        try:
            TFLiteModel.load(path, runtime=runtime, sha256=entry.sha256, preprocessing=declared_contract(path))
        except ModelLoadError as exc:
            log.warning("ota.startup_model_rejected", which=label, model_version=entry.model_version,
                        reason=exc.reason)
            continue
        if label != "current":
            log.warning("ota.startup_fallback", model_version=entry.model_version, variant=entry.variant)
        return path, entry.model_version, entry.variant
    log.warning("ota.startup_fallback", model_version=None, reason="no installed model verifies: starter")
    return None


# ------------------------------------------------------------------------------------------------ download


def _origin(url: str) -> tuple[str, str, int | None] | None:
    """(scheme, host, port) with the scheme's default port filled in; None if it is not an http(s) URL."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        return None
    return scheme, parts.hostname.lower(), port or (443 if scheme == "https" else 80)


def _resolve_url(value: Any, base: str | None, what: str) -> str:
    """The absolute URL of a download; it must be on the control plane this device was enrolled with."""
    if not isinstance(value, str) or not value:
        raise DeployError("request", f"{what} is required (absolute, or relative to the control plane URL)")
    url: str = value
    if urlsplit(url).scheme and urlsplit(url).scheme not in ("http", "https"):
        raise DeployError("request", f"{what} {url!r}: only http:// and https:// are supported")
    home = _origin(base) if base else None
    if base is None or home is None:
        raise DeployError("request", f"no control plane URL is configured on this device (--controlplane): "
                                     f"refusing to download {what} {url!r} from anywhere")
    url = urljoin(base if base.endswith("/") else base + "/", url)
    if _origin(url) != home:
        raise DeployError("request", f"{what} {url!r} is not on the control plane this device was enrolled "
                                     f"with ({base}): refused")
    return url


def _same_origin_redirects(origin: tuple[str, str, int | None] | None) -> Any:
    import urllib.request

    class SameOriginRedirects(urllib.request.HTTPRedirectHandler):
        """Follow a redirect only within the control plane's origin."""

        def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any,
                             newurl: str) -> Any:
            if _origin(newurl) != origin:
                raise DeployError("download", f"{req.full_url} redirects to {newurl}, off the control plane: "
                                              f"refused")
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    return SameOriginRedirects()


def _request(url: str, bearer: str | None, headers: dict[str, str], timeout: float) -> Any:
    import urllib.request

    request = urllib.request.Request(url, headers=headers)
    request.add_header("User-Agent", "edgefleet-agent")
    if bearer:
        request.add_unredirected_header("Authorization", f"Bearer {bearer}")  # not to redirect targets
    opener = urllib.request.build_opener(_same_origin_redirects(_origin(url)))
    return opener.open(request, timeout=timeout)  # the scheme and origin are checked in _resolve_url


def _classify(exc: BaseException, policy: DownloadPolicy) -> str:
    """A transient network error, as words; raises DeployError for a permanent one."""
    import http.client
    import urllib.error

    if isinstance(exc, urllib.error.HTTPError):
        if exc.code in (408, 425, 429) or exc.code >= 500:
            return f"HTTP {exc.code} {exc.reason}"
        raise DeployError("download", f"HTTP {exc.code} {exc.reason} from {exc.url}") from exc
    if isinstance(exc, TimeoutError):
        return f"stalled: no data for {policy.stall_timeout_s:g} s"
    if isinstance(exc, urllib.error.URLError):
        return f"connection failed: {exc.reason}"
    if isinstance(exc, http.client.IncompleteRead):
        return "connection dropped mid-transfer"
    if isinstance(exc, (OSError, http.client.HTTPException)):
        return f"{type(exc).__name__}: {exc}"
    raise exc


def _backoff(policy: DownloadPolicy, failures: int) -> float:
    return float(min(policy.backoff_max_s, policy.backoff_s * 2 ** max(0, failures - 1)))


def _fetch_small(url: str, bearer: str | None, policy: DownloadPolicy, what: str) -> bytes:
    """GET a small document into memory, with retries."""
    import http.client

    failures = 0
    while True:
        try:
            with _request(url, bearer, {}, policy.stall_timeout_s) as response:
                data: bytes = response.read(policy.manifest_max_bytes + 1)
            if len(data) > policy.manifest_max_bytes:
                raise DeployError("manifest", f"{what} is larger than {policy.manifest_max_bytes} bytes")
            return data
        except (OSError, http.client.HTTPException) as exc:
            error = _classify(exc, policy)
        failures += 1
        if failures >= policy.attempts:
            raise DeployError("download", f"{what} download failed after {failures} attempts: {error}")
        time.sleep(_backoff(policy, failures))


def _content_range_start(value: str | None) -> int | None:
    match = re.match(r"^\s*bytes\s+(\d+)-\d+/(?:\d+|\*)\s*$", value or "")
    return int(match.group(1)) if match else None


def _download(url: str, dest: Path, size: int, bearer: str | None, policy: DownloadPolicy) -> dict[str, Any]:
    """Download ``size`` bytes into ``dest``, resuming from what ``dest`` already holds (HTTP Range).

    Connection errors, 5xx and stalls are retried with exponential backoff; an attempt that made progress
    resets the failure count. Raises DeployError (with ``keep_partial`` so the next deployment can resume).
    """
    import http.client
    import urllib.error

    deadline = time.monotonic() + policy.total_timeout_s
    resumed_from = dest.stat().st_size if dest.exists() else 0
    failures = requests = 0
    error = ""
    while True:
        have = dest.stat().st_size if dest.exists() else 0
        if have > size:
            dest.unlink()
            have = 0
        if have == size:
            return {"bytes": size, "resumed_from": resumed_from, "requests": requests}
        if time.monotonic() >= deadline:
            raise DeployError("download", f"artifact download did not finish within "
                                          f"{policy.total_timeout_s:g} s ({have}/{size} bytes; "
                                          f"{error or 'too slow'})", keep_partial=True)
        headers = {"Range": f"bytes={have}-"} if have else {}
        requests += 1
        start = have
        try:
            with _request(url, bearer, headers, policy.stall_timeout_s) as response:
                content_range = response.headers.get("Content-Range")
                if response.status == 206 and _content_range_start(content_range) == have:
                    mode = "ab"
                elif response.status == 200:
                    mode, have, start = "wb", 0, 0  # no range support (or a fresh start): from the beginning
                else:
                    dest.unlink(missing_ok=True)  # a range we did not ask for: start over
                    raise _Transient(f"unexpected HTTP {response.status} (Content-Range {content_range!r})")
                with open(dest, mode) as fh:
                    try:
                        while chunk := response.read(policy.chunk_bytes):
                            if have + len(chunk) > size:
                                raise DeployError("download", f"the server sent more than the manifest's "
                                                              f"{size} bytes")  # not resumable: deleted
                            fh.write(chunk)
                            have += len(chunk)
                            if time.monotonic() >= deadline:
                                break
                    finally:
                        fh.flush()
                        os.fsync(fh.fileno())
            if have < size and time.monotonic() < deadline:
                raise _Transient(f"connection closed after {have}/{size} bytes")
        except urllib.error.HTTPError as exc:
            if exc.code == 416:  # our range is past the end: whatever we have is wrong
                dest.unlink(missing_ok=True)
                error = "HTTP 416 (range not satisfiable): restarting"
            else:
                try:
                    error = _classify(exc, policy)
                except DeployError as permanent:
                    permanent.keep_partial = True
                    raise
        except _Transient as exc:
            error = str(exc)
        except (OSError, http.client.HTTPException) as exc:
            error = _classify(exc, policy)
        if have >= size:
            continue
        failures = 0 if have > start else failures + 1
        if failures >= policy.attempts:
            raise DeployError("download", f"artifact download failed after {requests} requests "
                                          f"({have}/{size} bytes received, resumable): {error}",
                              keep_partial=True)
        log.info("ota.download_retry", url=url, have=have, size=size, error=error)
        time.sleep(_backoff(policy, max(1, failures)))


# ---------------------------------------------------------------------------------------------- validation


def _version_tuple(version: str) -> tuple[int, ...] | None:
    match = re.match(r"^v?(\d+(?:\.\d+)*)", version.strip())
    return tuple(int(part) for part in match.group(1).split(".")) if match else None


def version_at_least(have: str, need: str) -> bool:
    """``have >= need`` on the numeric release part (``2.14.0rc1`` counts as ``2.14.0``)."""
    a, b = _version_tuple(have), _version_tuple(need)
    if a is None or b is None:
        return False
    width = max(len(a), len(b))
    return a + (0,) * (width - len(a)) >= b + (0,) * (width - len(b))


def _device_runtime(agent: Agent) -> tuple[str, str]:
    runtime = agent.settings.profile.runtime
    return agent.runtime_name or str(runtime.name), agent.runtime_version or runtime.version


def _check_variant(agent: Agent, variant: ModelVariant) -> None:
    profile = agent.settings.profile
    if not profile.allows(variant):
        raise DeployError("compatibility", f"variant {variant} is not allowed on profile {profile.name} "
                                           f"(allowed: {', '.join(map(str, profile.variants))})")
    name, version = _device_runtime(agent)
    try:
        runtime_name = RuntimeName(name)
    except ValueError:
        return  # an unknown runtime has no measured restrictions; the manifest's runtimes decide
    why = variant_unsupported(runtime_name, version, variant)
    if why:
        raise DeployError("compatibility", f"variant {variant} is not supported on {name} {version}: {why}")


def _check_release(agent: Agent, release: Release, deployment_id: int, floor: ReleaseState | None,
                   now: float) -> None:
    """Binding (deployment, device class, task), expiry and ordering of a verified release."""
    profile = agent.settings.profile.name
    if release.deployment_id != deployment_id:
        raise DeployError("release", f"the release belongs to deployment {release.deployment_id}, the command "
                                     f"to deployment {deployment_id}")
    if profile not in release.device_classes:
        raise DeployError("release", f"the release is for device classes {', '.join(release.device_classes)}, "
                                     f"this device is {profile}")
    if release.task != agent.settings.task:
        raise DeployError("release", f"the release is a {release.task!r} model, this device runs task "
                                     f"{agent.settings.task!r}")
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


def _check_manifest(agent: Agent, manifest: ModelManifest, model_version: str, variant: str) -> None:
    if manifest.model_version != model_version or manifest.variant != variant:
        raise DeployError("manifest", f"the manifest is for {manifest.model_version} ({manifest.variant}), "
                                      f"the command for {model_version} ({variant})")
    if not _FILE_NAME_RE.fullmatch(manifest.file_name):
        raise DeployError("manifest", f"unsafe artifact file name {manifest.file_name!r} in the manifest")
    if not re.fullmatch(r"[0-9a-f]{64}", manifest.sha256):
        raise DeployError("manifest", f"malformed sha256 {manifest.sha256!r} in the manifest")
    name, version = _device_runtime(agent)
    need = manifest.runtimes.get(name)
    if need is None:
        built_for = ", ".join(sorted(manifest.runtimes)) or "no"
        raise DeployError("compatibility", f"the model is built for {built_for} runtime(s), this device runs "
                                           f"{name} {version}")
    if not version_at_least(version, need):
        raise DeployError("compatibility", f"the model needs {name} >= {need}, this device runs {version}")
    limit = agent.settings.profile.max_model_bytes
    if manifest.size_bytes > limit:
        raise DeployError("compatibility", f"artifact is {manifest.size_bytes} bytes, profile "
                                           f"{agent.settings.profile.name} allows at most {limit}")
    if manifest.size_bytes <= 0:
        raise DeployError("manifest", f"artifact size {manifest.size_bytes} in the manifest")


# -------------------------------------------------------------------------------------------- agent state


class _WatchedModel:
    """The freshly activated model, counting its inferences and failures for the watchdog."""

    def __init__(self, model: TFLiteModel) -> None:
        self.model = model
        self._lock = threading.Lock()
        self.ok = 0
        self.errors = 0

    def predict(self, x: npt.ArrayLike) -> npt.NDArray[np.float32]:
        try:
            scores = self.model.predict(x)
        except Exception:
            with self._lock:
                self.errors += 1
            raise
        with self._lock:
            self.ok += 1
        return scores

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return self.ok, self.errors

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


@dataclass
class _Previous:
    """What ran before the latest activation, kept in memory during the watchdog window."""

    model: TFLiteModel
    entry: Entry


@dataclass
class _OtaState:
    lock: threading.Lock
    previous: _Previous | None = None


_STATES: weakref.WeakKeyDictionary[Agent, _OtaState] = weakref.WeakKeyDictionary()
_STATES_LOCK = threading.Lock()


def _state_of(agent: Agent) -> _OtaState:
    with _STATES_LOCK:
        state = _STATES.get(agent)
        if state is None:
            state = _STATES[agent] = _OtaState(threading.Lock())
        return state


def _active_entry(agent: Agent, models: Path) -> Entry | None:
    """The installed entry the agent runs now; a path-less entry for the starter; None for a --model file."""
    pointer = _read_pointer(models)
    for entry in (pointer.current, pointer.previous) if pointer else ():
        if entry and entry.path and (entry.model_version, entry.variant) == (agent.model_version,
                                                                              agent.active_variant):
            return entry
    if agent.settings.model_path is None and agent.model_version:
        return Entry(agent.model_version, agent.active_variant)
    return None


def _bare(model: Any) -> TFLiteModel:
    return cast("TFLiteModel", model.model if isinstance(model, _WatchedModel) else model)


def _activate(agent: Agent, model: TFLiteModel, version: str, variant: str | None,
              previous: Entry | None) -> _WatchedModel | None:
    """Swap the running model (OTA lock held); returns the watched wrapper, if the inference loop runs."""
    state = _state_of(agent)
    loop = agent._inference
    watched = None
    if loop is not None:
        watched = _WatchedModel(model)
        old_model, _ = loop.swap_model(cast("TFLiteModel", watched), version)
        state.previous = _Previous(_bare(old_model), previous) if previous is not None else None
    agent.model_version, agent.active_variant = version, variant
    agent.runtime_name, agent.runtime_version = model.runtime_name, model.runtime_version
    agent.publish_state()
    return watched


# ------------------------------------------------------------------------------------------------- rollback


def rollback(agent: Agent, reason: str = "requested") -> bool:
    """Go back to the pointer's previous model (on disk and in the inference loop); False if there is none."""
    state = _state_of(agent)
    with state.lock:
        return _rollback_locked(agent, state, reason)


def _rollback_locked(agent: Agent, state: _OtaState, reason: str) -> bool:
    from agent.runtime import ModelLoadError, TFLiteModel, declared_contract, starter_model_path

    models = agent.settings.data_dir / MODELS_DIR
    pointer = _read_pointer(models)
    target = pointer.previous if pointer else None
    if pointer is None or target is None:
        log.warning("ota.rollback_impossible", device_id=agent.device_id, reason=reason,
                    why="no previous model recorded")
        return False
    failed = pointer.current
    kept = state.previous
    runtime = str(agent.settings.profile.runtime.name)
    wanted = (target.model_version, target.variant)
    if kept is not None and (kept.entry.model_version, kept.entry.variant) == wanted:
        model = kept.model
    else:
        try:
            if target.path is None:
                starter = starter_model_path()
                model = TFLiteModel.load(starter, runtime=runtime, preprocessing=declared_contract(starter))
            else:
                path = _entry_file(models, target)
                if path is None:
                    raise ModelLoadError(target.path, "outside the models directory")
                model = TFLiteModel.load(path, runtime=runtime, sha256=target.sha256,
                                         preprocessing=declared_contract(path))
        except ModelLoadError as exc:
            log.error("ota.rollback_failed", device_id=agent.device_id, reason=reason, error=str(exc))
            return False
    if target.path is None:
        _remove_pointer(models)  # the starter: no pointer
    else:
        _write_pointer(models, target, None)
    if agent._inference is not None:
        agent._inference.swap_model(model, target.model_version)
    agent.model_version, agent.active_variant = target.model_version, target.variant
    agent.runtime_name, agent.runtime_version = model.runtime_name, model.runtime_version
    agent.publish_state()
    state.previous = None
    if failed.dir_name and failed.dir_name != target.dir_name:
        shutil.rmtree(models / failed.dir_name, ignore_errors=True)
    log.warning("ota.rolled_back", device_id=agent.device_id, failed_model=failed.model_version,
                failed_variant=failed.variant, model_version=target.model_version, variant=target.variant,
                reason=reason)
    return True


def _watch(agent: Agent, watched: _WatchedModel, version: str, policy: WatchdogPolicy) -> None:
    """Roll back if the new model fails more than ``error_ratio`` of its inferences within the window."""
    state = _state_of(agent)
    loop = agent._inference
    started = time.monotonic()
    while True:
        time.sleep(policy.poll_s)
        elapsed = time.monotonic() - started
        if loop is None or loop.stopping or loop.model is not watched:
            return  # stopped, or replaced by another deployment or a rollback
        ok, errors = watched.counts()
        total = ok + errors
        over = total > 0 and errors > policy.error_ratio * total
        if over and (total >= policy.min_inferences or elapsed >= policy.window_s):
            with state.lock:
                if loop.model is watched:
                    _rollback_locked(agent, state, f"{errors} of {total} inferences of {version} failed "
                                                   f"within {elapsed:.1f} s of the swap")
            return
        if elapsed >= policy.window_s:
            with state.lock:
                if loop.model is watched:  # healthy: run the bare model, release the previous one
                    loop.swap_model(watched.model, version)
                    state.previous = None
            log.info("ota.watchdog_passed", device_id=agent.device_id, model_version=version,
                     inferences=total, errors=errors)
            return


# --------------------------------------------------------------------------------------------------- the job


def handle_deploy_model(agent: Agent, command: wire.Command) -> tuple[bool, str | None, dict[str, Any]]:
    """The ``deploy_model`` command: ``(ok, reason, result)``; see the module docstring for the steps."""
    args = command.args
    bound = log.bind(device_id=agent.device_id, command_id=command.command_id)
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
    if (agent.model_version, agent.active_variant) == (model_version, str(variant)):
        return True, None, {**result, "already_active": True,
                            "message": f"{model_version} ({variant}) is already active"}
    state = _state_of(agent)
    if not state.lock.acquire(timeout=10.0):
        return False, "another model deployment is in progress", result
    started = time.monotonic()
    try:
        result.update(_deploy(agent, model_version, variant, args, bound))
    except DeployError as exc:
        bound.warning("ota.deploy_failed", model_version=model_version, variant=str(variant), stage=exc.stage,
                      reason=exc.reason)
        return False, exc.reason, {**result, "stage": exc.stage, "active_model": agent.model_version}
    finally:
        state.lock.release()
    result["duration_s"] = round(time.monotonic() - started, 3)
    bound.info("ota.deployed", **result)
    return True, None, result


def _deploy(agent: Agent, model_version: str, variant: ModelVariant, args: dict[str, Any],
            bound: Any) -> dict[str, Any]:
    from agent.runtime import ModelLoadError, RuntimeUnavailable, SelfTestFailed, TFLiteModel, self_test

    settings = agent.settings
    policy = DOWNLOAD
    if settings.signing_key is None:
        raise DeployError("request", "no model signing key is configured on this device (--signing-key): "
                                     "refusing to deploy a model whose signature cannot be checked")
    _check_variant(agent, variant)
    deployment_id = args.get("deployment_id")
    if not isinstance(deployment_id, int) or isinstance(deployment_id, bool):
        raise DeployError("request", f"deployment_id must be an integer, got {deployment_id!r}")
    manifest_url = _resolve_url(args.get("manifest_url"), settings.controlplane_url, "manifest_url")
    artifact_url = _resolve_url(args.get("artifact_url"), settings.controlplane_url, "artifact_url")
    bearer = args.get("bearer") if isinstance(args.get("bearer"), str) else None
    models = settings.data_dir / MODELS_DIR
    partial_dir = models / PARTIAL_DIR
    partial_dir.mkdir(parents=True, exist_ok=True)
    floor = _read_release(models)
    keep_partial: Path | None = None
    try:
        # 1. The release, signature checked before anything else is fetched.
        manifest_json = _fetch_small(manifest_url, bearer, policy, "manifest")
        try:
            signed = decode_signed_release(manifest_json)
        except ManifestError as exc:
            raise DeployError("manifest", f"manifest rejected: {exc}") from exc
        try:
            release = verify_release(signed, settings.signing_key)
        except ManifestError as exc:
            raise DeployError("signature", f"manifest signature rejected: {exc}") from exc
        manifest = release.artifact
        _check_manifest(agent, manifest, model_version, str(variant))
        _check_release(agent, release, deployment_id, floor, time.time())
        partial = partial_dir / f"{manifest.sha256[:16]}-{manifest.file_name}"
        have = partial.stat().st_size if partial.exists() else 0
        free = shutil.disk_usage(models).free
        if free < manifest.size_bytes - have + _DISK_MARGIN_BYTES:
            raise DeployError("disk", f"{free} bytes free in {models}, the artifact needs "
                                      f"{manifest.size_bytes}")
        # 2. The artifact, resumable.
        bound.info("ota.downloading", url=artifact_url, size=manifest.size_bytes, resume_from=have)
        try:
            download = _download(artifact_url, partial, manifest.size_bytes, bearer, policy)
        except DeployError as exc:
            keep_partial = partial if exc.keep_partial else None
            raise
        # 3. Size and sha256.
        try:
            verify_artifact(manifest, partial)
        except ManifestError as exc:
            raise DeployError("verify", f"artifact rejected: {exc}") from exc
        # 4. Load on this device's runtime with the model's signed input contract, 5. golden self-test: a raw
        # golden sample through that contract, the very path live inference takes.
        try:
            model = TFLiteModel.load(partial, runtime=str(settings.profile.runtime.name),
                                     sha256=manifest.sha256, preprocessing=manifest.input_contract())
        except (ModelLoadError, RuntimeUnavailable) as exc:
            raise DeployError("load", str(exc)) from exc
        try:
            figures = self_test(model, manifest.raw_golden())
        except SelfTestFailed as exc:
            raise DeployError("self-test", str(exc)) from exc
        # 6. Commit on disk (the release first: a crash after it leaves the old model, which the same release
        # can still replace), then swap in memory.
        previous = _active_entry(agent, models)
        _write_release(models, release)
        entry = _commit(models, partial, manifest_json, manifest, previous)
        model.path = str(models / (entry.path or ""))
        watched = _activate(agent, model, manifest.model_version, manifest.variant, previous)
        if watched is not None:
            threading.Thread(target=_watch, args=(agent, watched, manifest.model_version, WATCHDOG),
                             name="ota-watchdog", daemon=True).start()
        return {"path": entry.path, "release": release.release, "deployment_id": release.deployment_id,
                "rollback": release.rollback, "sha256": manifest.sha256, "size_bytes": manifest.size_bytes,
                "previous": previous.model_version if previous else None, "self_test": figures,
                "download": download, "runtime": f"{model.runtime_name} {model.runtime_version}"}
    finally:
        _cleanup(models, keep_partial)
