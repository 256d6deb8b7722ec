"""The device's active model, owned by one object: :class:`ActiveModel`.

It holds the model store (:mod:`agent._model_store`), picks the model at start-up, runs the inference loop on it,
and is the only thing that changes it: :meth:`ActiveModel.install` (load on this runtime, golden self-test, commit
on disk, swap in memory, then a watchdog), :meth:`ActiveModel.rollback` (to the pointer's previous model) and the
watchdog's verdict. Downloading and checking a release (:mod:`agent._deploy`) happen outside it; they hand it a
verified artifact.

Start-up: the pointer's current model if its file still has the recorded sha256 and loads on this runtime, else
the previous one under the same checks, else the shipped starter model (:func:`resolve_startup_model`).

Watchdog: for ``WatchdogPolicy.window_s`` after a swap, if more than ``error_ratio`` of the new model's inferences
fail, the previous model (kept in memory during the window) is restored.

``agent.runtime`` (numpy and the TFLite runtime) is imported when the model is started, not with this module.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from agent import protocol as wire
from agent._errors import DeployError
from agent._model_store import MODELS_DIR, Entry, ModelStore
from agent._settings import AgentSettings, WatchdogPolicy
from agent.logsetup import get_logger
from agent.manifest import Release

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from agent.runtime import InferenceLoop, TFLiteModel

__all__ = ["ActiveModel", "Installed", "resolve_startup_model"]

log = get_logger("edgefleet.agent.ota")


def resolve_startup_model(data_dir: Path, runtime: str) -> tuple[Path, str, str] | None:
    """The model the agent should start with: (path, model_version, variant), or None for the shipped starter.

    The pointer's current model if its file still has the recorded sha256 and loads on ``runtime``, else the
    previous model under the same checks, else None.
    """
    from agent.runtime import ModelLoadError, TFLiteModel, declared_contract

    store = ModelStore(Path(data_dir) / MODELS_DIR)
    pointer = store.read_pointer()
    if pointer is None:
        return None
    for label, entry in (("current", pointer.current), ("previous", pointer.previous)):
        if entry is None or entry.path is None or entry.sha256 is None or entry.variant is None:
            continue
        path = store.entry_file(entry)
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


def _runs(loop: InferenceLoop, watched: _WatchedModel) -> bool:
    """Whether the loop still runs this watched model (not replaced by another deployment or a rollback)."""
    return cast(object, loop.model) is watched


def _bare(model: Any) -> TFLiteModel:
    return cast("TFLiteModel", model.model if isinstance(model, _WatchedModel) else model)


@dataclass
class _Previous:
    """What ran before the latest activation, kept in memory during the watchdog window."""

    model: TFLiteModel
    entry: Entry


@dataclass(frozen=True)
class Installed:
    """What :meth:`ActiveModel.install` did: the entry now active, the one before it and the self-test figures."""

    entry: Entry
    previous: Entry | None
    self_test: dict[str, Any]
    runtime: str  # "<name> <version>" the model runs on


class ActiveModel:
    """The one owner of the model an agent runs (see the module docstring).

    ``lock`` is held by whoever changes the model: a deployment for its whole length, a rollback, the watchdog's
    verdict. ``on_change`` is called after every change (the agent publishes its state).
    """

    def __init__(self, settings: AgentSettings, on_change: Callable[[], None]) -> None:
        self._settings = settings
        self._on_change = on_change
        self._log = log.bind(device_id=settings.device_id)
        self.store = ModelStore(settings.data_dir / MODELS_DIR)
        self.watchdog: WatchdogPolicy = settings.watchdog
        self.lock = threading.Lock()
        self.loop: InferenceLoop | None = None  # the inference loop, once started
        self.version: str | None = None
        self.variant: str | None = None
        self.runtime_name: str | None = None
        self.runtime_version: str | None = None
        self._previous: _Previous | None = None

    # -- running ---------------------------------------------------------------------------------------------
    def start(self, *, rate_hz: float) -> None:
        """Pick the start-up model (an explicit ``model_path``, the last activated one re-verified, else the
        shipped starter), load it with its declared input contract and start the inference loop."""
        from agent import runtime as _runtime  # deferred: the MQTT side of the agent needs no numpy

        settings = self._settings
        runtime = str(settings.profile.runtime.name)
        model_path = settings.model_path
        version: str | None = None
        variant: str | None = None
        if model_path is None:  # the model the last deployment activated (re-verified), else the starter
            resolved = resolve_startup_model(settings.data_dir, runtime)
            if resolved is not None:
                model_path, version, variant = resolved
        if model_path is None:  # the shipped starter, in a variant this device class may run
            starter = "fp32" if settings.profile.allows("fp32") else "int8"
            model_path = _runtime.starter_model_path(starter)
        # The model's own input contract (its signed manifest, else its metadata, else the explicit legacy x/16):
        # the data source serves raw samples.
        model = _runtime.TFLiteModel.load(model_path, runtime=runtime,
                                          preprocessing=_runtime.declared_contract(model_path))
        self.runtime_name, self.runtime_version = model.runtime_name, model.runtime_version
        self.version = version or _runtime.model_version_of(model_path)
        if variant is None:
            declared = _runtime.read_model_metadata(model_path).get("variant")
            variant = declared if isinstance(declared, str) else None
        self.variant = variant
        source = _runtime.DataSource(settings.data_path)
        self.loop = _runtime.InferenceLoop(model, source, rate_hz=rate_hz, model_version=self.version)
        self.loop.start()

    def stop(self, timeout: float | None = 1.0) -> None:
        if self.loop is not None:
            self.loop.stop(timeout)

    def set_rate(self, rate_hz: float) -> None:
        if self.loop is not None:
            self.loop.set_rate(rate_hz)

    def telemetry(self) -> wire.InferenceStats | None:
        """The inference figures since the last call (labelled with the active version); None before start."""
        return self.loop.stats.snapshot_and_reset(self.version) if self.loop is not None else None

    def device_runtime(self) -> tuple[str, str]:
        """(name, version) of the runtime the model runs on (the profile's until a model is loaded)."""
        runtime = self._settings.profile.runtime
        return self.runtime_name or str(runtime.name), self.runtime_version or runtime.version

    def active_entry(self) -> Entry | None:
        """The installed entry running now; a path-less entry for the starter; None for a --model file."""
        pointer = self.store.read_pointer()
        for entry in (pointer.current, pointer.previous) if pointer else ():
            if entry and entry.path and (entry.model_version, entry.variant) == (self.version, self.variant):
                return entry
        if self._settings.model_path is None and self.version:
            return Entry(self.version, self.variant)
        return None

    # -- changing it (``lock`` held) -------------------------------------------------------------------------
    def install(self, artifact: Path, manifest_json: bytes, release: Release) -> Installed:
        """Make a downloaded, verified artifact the active model; the caller holds ``lock``.

        Load it on this device's runtime with its signed input contract, run the golden self-test through that
        contract (the path live inference takes), record the release, commit the model directory and the
        pointer, swap it into the inference loop and start the watchdog. A load or self-test failure raises
        DeployError and changes nothing.
        """
        from agent.runtime import ModelLoadError, RuntimeUnavailable, SelfTestFailed, TFLiteModel, self_test

        manifest = release.artifact
        try:
            model = TFLiteModel.load(artifact, runtime=str(self._settings.profile.runtime.name),
                                     sha256=manifest.sha256, preprocessing=manifest.input_contract())
        except (ModelLoadError, RuntimeUnavailable) as exc:
            raise DeployError("load", str(exc)) from exc
        try:
            figures = self_test(model, manifest.raw_golden())
        except SelfTestFailed as exc:
            raise DeployError("self-test", str(exc)) from exc
        # On disk first (the release first: a crash after it leaves the old model, which the same release can
        # still replace), then in memory.
        previous = self.active_entry()
        self.store.write_release(release)
        entry = self.store.commit(artifact, manifest_json, manifest, previous)
        model.path = str(self.store.root / (entry.path or ""))
        watched = self._activate(model, manifest.model_version, manifest.variant, previous)
        if watched is not None:
            threading.Thread(target=self._watch, args=(watched, manifest.model_version, self.watchdog),
                             name="ota-watchdog", daemon=True).start()
        return Installed(entry, previous, figures, f"{model.runtime_name} {model.runtime_version}")

    def _activate(self, model: TFLiteModel, version: str, variant: str | None,
                  previous: Entry | None) -> _WatchedModel | None:
        """Swap the running model; returns the watched wrapper, if the inference loop runs."""
        watched = None
        if self.loop is not None:
            watched = _WatchedModel(model)
            old_model, _ = self.loop.swap_model(cast("TFLiteModel", watched), version)
            self._previous = _Previous(_bare(old_model), previous) if previous is not None else None
        self.version, self.variant = version, variant
        self.runtime_name, self.runtime_version = model.runtime_name, model.runtime_version
        self._on_change()
        return watched

    def rollback(self, reason: str = "requested") -> bool:
        """Go back to the pointer's previous model (on disk and in the inference loop); False if there is none."""
        with self.lock:
            return self._rollback_locked(reason)

    def _rollback_locked(self, reason: str) -> bool:
        from agent.runtime import ModelLoadError, TFLiteModel, declared_contract, starter_model_path

        store = self.store
        pointer = store.read_pointer()
        target = pointer.previous if pointer else None
        if pointer is None or target is None:
            self._log.warning("ota.rollback_impossible", reason=reason, why="no previous model recorded")
            return False
        failed = pointer.current
        kept = self._previous
        runtime = str(self._settings.profile.runtime.name)
        if kept is not None and (kept.entry.model_version, kept.entry.variant) == (target.model_version,
                                                                                   target.variant):
            model = kept.model
        else:
            try:
                if target.path is None:
                    starter = starter_model_path()
                    model = TFLiteModel.load(starter, runtime=runtime, preprocessing=declared_contract(starter))
                else:
                    path = store.entry_file(target)
                    if path is None:
                        raise ModelLoadError(target.path, "outside the models directory")
                    model = TFLiteModel.load(path, runtime=runtime, sha256=target.sha256,
                                             preprocessing=declared_contract(path))
            except ModelLoadError as exc:
                self._log.error("ota.rollback_failed", reason=reason, error=str(exc))
                return False
        if target.path is None:
            store.remove_pointer()  # the starter: no pointer
        else:
            store.write_pointer(target, None)
        if self.loop is not None:
            self.loop.swap_model(model, target.model_version)
        self.version, self.variant = target.model_version, target.variant
        self.runtime_name, self.runtime_version = model.runtime_name, model.runtime_version
        self._on_change()
        self._previous = None
        store.discard(failed, unless=target)
        self._log.warning("ota.rolled_back", failed_model=failed.model_version, failed_variant=failed.variant,
                          model_version=target.model_version, variant=target.variant, reason=reason)
        return True

    def _watch(self, watched: _WatchedModel, version: str, policy: WatchdogPolicy) -> None:
        """Roll back if the new model fails more than ``error_ratio`` of its inferences within the window."""
        loop = self.loop
        started = time.monotonic()
        while True:
            time.sleep(policy.poll_s)
            elapsed = time.monotonic() - started
            if loop is None or loop.stopping or not _runs(loop, watched):
                return  # stopped, or replaced by another deployment or a rollback
            ok, errors = watched.counts()
            total = ok + errors
            over = total > 0 and errors > policy.error_ratio * total
            if over and (total >= policy.min_inferences or elapsed >= policy.window_s):
                with self.lock:
                    if _runs(loop, watched):
                        self._rollback_locked(f"{errors} of {total} inferences of {version} failed "
                                              f"within {elapsed:.1f} s of the swap")
                return
            if elapsed >= policy.window_s:
                with self.lock:
                    if _runs(loop, watched):  # healthy: run the bare model, release the previous one
                        loop.swap_model(watched.model, version)
                        self._previous = None
                self._log.info("ota.watchdog_passed", model_version=version, inferences=total, errors=errors)
                return
