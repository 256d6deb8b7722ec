"""build_variants: trained weights -> TFLite variants, each evaluated with the TFLite runtime, gated, signed."""

from __future__ import annotations

import dataclasses
import datetime
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

import msgspec
import numpy as np
import numpy.typing as npt

from agent.manifest import Golden, InputContract, ModelManifest, ModelSource, SignedManifest, file_sha256
from federated.build import _convert
from firmware_profiles import ModelVariant, RuntimeName, variant_unsupported

if TYPE_CHECKING:
    import torch

    from agent.runtime import TFLiteModel
    from federated.tasks import Task

__all__ = [
    "ALL_VARIANTS",
    "DEFAULT_MAX_ACCURACY_DROP",
    "DEFAULT_RUNTIME_MINIMUMS",
    "BuildError",
    "BuildResult",
    "ManifestSigner",
    "VariantArtifact",
    "build_variants",
    "golden_tolerance",
]

log = logging.getLogger(__name__)

ALL_VARIANTS: Final = (
    ModelVariant.FP32,
    ModelVariant.FP16,
    ModelVariant.DYNAMIC_INT8,
    ModelVariant.FULL_INT8,
)
DEFAULT_MAX_ACCURACY_DROP: Final = 0.01  # a variant more than 1 accuracy point below fp32 is not published
# Minimum runtime versions a variant is built for; variant_unsupported() removes the pairs that are known bad.
DEFAULT_RUNTIME_MINIMUMS: Final[Mapping[str, str]] = {
    RuntimeName.LITERT.value: "2.3.0",
    RuntimeName.TFLITE_RUNTIME.value: "2.14.0",
}
EVALUATION_RUNTIME: Final = RuntimeName.LITERT.value
DEFAULT_GOLDEN_COUNT: Final = 3
DEFAULT_CALIBRATION_SAMPLES: Final = 640
# Golden tolerances. The same file gives bit-identical outputs on ai-edge-litert 2.3 and tflite-runtime 2.14 on
# x86-64 (measured); other CPUs (ARM NEON, fp16-capable XNNPACK) sum in other orders or round differently, so
# the floors leave room: relative to the largest |logit| for float variants, in output quanta for full-int8.
_RELATIVE_TOLERANCE: Final = {
    ModelVariant.FP32: 1e-5,
    ModelVariant.FP16: 5e-3,  # a runtime may compute in float16
    ModelVariant.DYNAMIC_INT8: 2e-2,  # activations quantised on the fly, per runtime
    ModelVariant.FULL_INT8: 0.0,
}
_ABSOLUTE_TOLERANCE: Final = {
    ModelVariant.FP32: 1e-4,
    ModelVariant.FP16: 1e-3,
    ModelVariant.DYNAMIC_INT8: 1e-2,
    ModelVariant.FULL_INT8: 0.0,
}
_FULL_INT8_QUANTA: Final = 3  # requantisation rounding may differ by a quantum per layer between kernels
_OBSERVED_MARGIN: Final = 4.0  # tolerance >= this many times the batch-vs-single spread seen here
_MODEL_VERSION_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")


class BuildError(RuntimeError):
    """The build cannot start or the float32 reference cannot be produced (bad weights, conversion failure)."""


class ManifestSigner(Protocol):
    """What signs a manifest (:class:`federated.signing.Signer`)."""

    def sign(self, manifest: ModelManifest) -> SignedManifest: ...


@dataclass(frozen=True, kw_only=True)
class VariantArtifact:
    """One variant's outcome. Published: ``path`` and ``manifest_path`` exist; rejected: ``reason`` says why."""

    variant: ModelVariant
    published: bool
    reason: str | None = None  # why it was rejected; None when published
    path: Path | None = None
    manifest_path: Path | None = None
    size_bytes: int = 0
    accuracy: float | None = None  # held-out, through the TFLite runtime; None if it could not be evaluated
    loss: float | None = None
    accuracy_drop: float | None = None  # fp32 accuracy - this variant's
    runtimes: dict[str, str] = field(default_factory=dict)
    signed: SignedManifest | None = None
    convert_s: float = 0.0
    evaluate_s: float = 0.0
    evaluated_with: str = ""  # "ai-edge-litert 2.3.0"
    batch_resizable: bool | None = None  # runs at batch sizes other than 1 (resize_tensor_input)

    def to_dict(self) -> dict[str, Any]:
        return {
            "variant": self.variant.value,
            "published": self.published,
            "reason": self.reason,
            "path": str(self.path) if self.path else None,
            "manifest_path": str(self.manifest_path) if self.manifest_path else None,
            "size_bytes": self.size_bytes,
            "accuracy": self.accuracy,
            "loss": self.loss,
            "accuracy_drop": self.accuracy_drop,
            "runtimes": dict(self.runtimes),
            "convert_s": round(self.convert_s, 4),
            "evaluate_s": round(self.evaluate_s, 4),
            "evaluated_with": self.evaluated_with,
            "batch_resizable": self.batch_resizable,
        }


@dataclass(frozen=True)
class BuildResult:
    task: str
    model_version: str
    out_dir: Path
    reference_accuracy: float  # fp32, through the TFLite runtime
    max_accuracy_drop: float
    artifacts: tuple[VariantArtifact, ...]
    timings: dict[str, float] = field(default_factory=dict)  # seconds: load, convert_fp32, <variant>, total

    @property
    def published(self) -> tuple[VariantArtifact, ...]:
        return tuple(a for a in self.artifacts if a.published)

    @property
    def rejected(self) -> tuple[VariantArtifact, ...]:
        return tuple(a for a in self.artifacts if not a.published)

    def artifact(self, variant: ModelVariant | str) -> VariantArtifact:
        wanted = ModelVariant(variant)
        for artifact in self.artifacts:
            if artifact.variant is wanted:
                return artifact
        raise KeyError(
            f"variant {wanted} was not built (built: {', '.join(a.variant for a in self.artifacts)})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "model_version": self.model_version,
            "out_dir": str(self.out_dir),
            "reference_accuracy": self.reference_accuracy,
            "max_accuracy_drop": self.max_accuracy_drop,
            "artifacts": [a.to_dict() for a in self.artifacts],
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
        }


# ---------------------------------------------------------------------------------------------------- helpers


def _variants(variants: Iterable[ModelVariant | str]) -> list[ModelVariant]:
    chosen: list[ModelVariant] = []
    for v in variants:
        try:
            variant = ModelVariant(v)
        except ValueError:
            known = ", ".join(m.value for m in ModelVariant)
            raise BuildError(f"unknown variant {v!r} (known: {known})") from None
        if variant not in chosen:
            chosen.append(variant)
    if not chosen:
        raise BuildError("no variants requested")
    return chosen


def _load_weights(task: Task, state_dict: Mapping[str, Any]) -> torch.nn.Module:
    import torch

    model = task.model()
    tensors = {
        k: v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v)) for k, v in state_dict.items()
    }
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise BuildError(f"the weights do not fit task {task.name}'s model: {exc}") from exc
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise BuildError(f"the weights hold non-finite values ({name})")
    return model.eval()


def _runtimes_for(variant: ModelVariant, minimums: Mapping[str, str]) -> dict[str, str]:
    allowed: dict[str, str] = {}
    for name, version in minimums.items():
        if variant_unsupported(RuntimeName(name), version, variant) is None:
            allowed[name] = version
    return allowed


def _cross_entropy(scores: npt.NDArray[np.float32], y: npt.NDArray[np.int64]) -> float:
    logits = scores.astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_softmax[np.arange(len(y)), y].mean())


def _golden_indices(y: npt.NDArray[np.int64], count: int) -> npt.NDArray[np.int64]:
    """The first held-out sample of each of the first ``count`` classes (in held-out order)."""
    _, first = np.unique(y, return_index=True)
    return np.sort(first)[:count].astype(np.int64)


def _round_up(value: float, digits: int = 2) -> float:
    """``value`` rounded *up* to ``digits`` significant digits (readable, never tighter)."""
    if value <= 0.0:
        return value
    step = 10.0 ** (math.floor(math.log10(value)) - digits + 1)
    return float(f"{math.ceil(value / step - 1e-9) * step:.{digits}g}")


def golden_tolerance(
    variant: ModelVariant,
    output: npt.NDArray[np.float32],
    *,
    output_scale: float = 0.0,
    observed: float = 0.0,
) -> float:
    """The per-value tolerance of a golden output.

    Float variants: ``max(absolute floor, relative * max(1, max|output|))``; full-int8: ``3 * output_scale``
    (three quanta); and never less than 4x the spread ``observed`` between batch and single-sample runs here.
    """
    largest = max(1.0, float(np.abs(output).max())) if output.size else 1.0
    tolerance = max(_ABSOLUTE_TOLERANCE[variant], _RELATIVE_TOLERANCE[variant] * largest)
    if variant is ModelVariant.FULL_INT8:
        if output_scale <= 0.0:
            raise ValueError("full-int8 golden tolerance needs the output tensor's scale")
        tolerance = max(tolerance, _FULL_INT8_QUANTA * output_scale)
    return _round_up(max(tolerance, _OBSERVED_MARGIN * observed))


def _golden(
    variant: ModelVariant, model: TFLiteModel, x: npt.NDArray[Any], indices: npt.NDArray[np.int64]
) -> Golden:
    inputs = np.ascontiguousarray(x[indices]).astype(np.float32)  # raw samples: the model applies its contract
    batch = model.predict(inputs)
    singles = np.concatenate([model.predict(inputs[i : i + 1]) for i in range(len(inputs))])
    observed = float(np.abs(batch - singles).max())
    tolerance = golden_tolerance(variant, batch, output_scale=model.output_quantization[0], observed=observed)
    return Golden(
        input=inputs.astype(np.float64).tolist(),
        output=batch.astype(np.float64).tolist(),
        tolerance=tolerance,
    )


@dataclass(frozen=True)
class _Evaluation:
    accuracy: float
    loss: float
    golden: Golden
    evaluated_with: str
    batch_resizable: bool


def _evaluate(
    variant: ModelVariant,
    path: Path,
    sha256: str,
    x: npt.NDArray[Any],
    y: npt.NDArray[np.int64],
    golden_idx: npt.NDArray[np.int64],
    contract: InputContract,
) -> _Evaluation:
    """Held-out accuracy and loss through the TFLite runtime, and the golden test, replayed on a fresh load.

    ``x`` is RAW held-out samples: the model is loaded with the input contract its manifest will carry and
    predicts as a device does (raw -> contract -> model), so the gate measures the path the devices run.
    """
    from agent.runtime import TFLiteModel

    model = TFLiteModel.load(path, runtime=EVALUATION_RUNTIME, sha256=sha256, preprocessing=contract)
    try:
        scores = model.predict(x)
        batch_resizable = True
    except RuntimeError:
        # litert-torch bakes the conversion batch (1) into the RESHAPE ops it emits for some models
        # (convolutions on reshaped input, flatten, mean): such a model runs at batch 1 only. Evaluate sample by
        # sample on a fresh interpreter (the failed resize left this one unusable), with a one-sample golden
        # test, since a device predicts the golden input as one batch.
        batch_resizable = False
        model = TFLiteModel.load(path, runtime=EVALUATION_RUNTIME, sha256=sha256, preprocessing=contract)
        scores = np.concatenate([model.predict(x[i : i + 1]) for i in range(len(x))])
        golden_idx = golden_idx[:1]
    golden = _golden(variant, model, x, golden_idx)
    # As a device does on load: a fresh interpreter must reproduce the golden output within tolerance.
    replay = TFLiteModel.load(path, runtime=EVALUATION_RUNTIME, sha256=sha256, preprocessing=contract)
    got = replay.predict(np.asarray(golden.input, dtype=np.float32))
    worst = float(np.abs(got - np.asarray(golden.output, dtype=np.float32)).max())
    if not worst <= golden.tolerance:
        raise RuntimeError(
            f"golden output not reproduced on reload: {worst:.3g} > tolerance {golden.tolerance:.3g}"
        )
    return _Evaluation(
        accuracy=float(np.mean(scores.argmax(axis=1) == y)),
        loss=_cross_entropy(scores, y),
        golden=golden,
        evaluated_with=f"{model.runtime_name} {model.runtime_version}",
        batch_resizable=batch_resizable,
    )


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _remove_stale(destination: Path, model_version: str, variant: ModelVariant) -> None:
    """A rejected variant of a rebuilt version must not leave an earlier build's files (manifest first)."""
    for suffix in ("manifest.json", "tflite"):
        (destination / f"{model_version}-{variant.value}.{suffix}").unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------------ build


def build_variants(
    task: Task,
    state_dict: Mapping[str, Any],
    *,
    variants: Iterable[ModelVariant | str] = ALL_VARIANTS,
    out_dir: str | os.PathLike[str],
    model_version: str,
    source: ModelSource,
    signer: ManifestSigner,
    max_accuracy_drop: float = DEFAULT_MAX_ACCURACY_DROP,
    runtime_minimums: Mapping[str, str] = DEFAULT_RUNTIME_MINIMUMS,
    golden_count: int = DEFAULT_GOLDEN_COUNT,
    calibration_samples: int = DEFAULT_CALIBRATION_SAMPLES,
) -> BuildResult:
    """Convert ``state_dict`` (loaded into ``task.model()``) to TFLite variants, evaluate, gate, sign, publish.

    * Conversion at batch 1 with litert-torch (fp32), then ai-edge-quantizer (fp16, dynamic-int8, full-int8
      calibrated on ``calibration_samples`` of ``task.calibration_data`` in batches of 64): see
      :mod:`federated.build._convert`.
    * Every variant is evaluated on ``task.heldout()`` through the TFLite runtime the devices use
      (``agent.runtime.TFLiteModel``, ai-edge-litert), never through torch. fp32 is the reference (always
      built); a variant whose accuracy is more than ``max_accuracy_drop`` below it is rejected.
    * A variant is also rejected when no runtime in ``runtime_minimums`` may run it
      (:func:`firmware_profiles.variant_unsupported`), or when it cannot be produced or loaded.
    * Each published variant is written as ``<model_version>-<variant>.tflite`` plus a signed manifest
      ``<model_version>-<variant>.manifest.json`` (:class:`agent.manifest.SignedManifest`) in ``out_dir``; the
      artifact is in place before its manifest. Rejected variants leave no file behind.

    The input contract: the task's (:func:`federated.tasks.input_contract_of`: ``x * scale + offset`` per
    feature) is signed into every manifest as ``preprocessing``; evaluation, the gate and the golden test all
    run raw held-out samples through it, as a device does. The golden self-test of a manifest: ``golden.input``
    is ``golden_count`` RAW held-out samples, ``golden.output`` the runtime's float output (dequantised for
    full-int8) when they are predicted as one batch through the contract; a device's
    ``TFLiteModel.predict(golden.input)`` (loaded with the contract) must match every value within
    ``golden.tolerance`` (see :func:`golden_tolerance`). litert-torch bakes batch 1 into the RESHAPE ops of some
    models (e.g. convolutions on a flat input): those cannot be resized, are evaluated sample by sample, and get
    a one-sample golden test (``VariantArtifact.batch_resizable`` is False).

    Raises
    ------
    BuildError
        Bad arguments, weights that do not fit the model or are not finite, or no fp32 conversion.
    """
    started = time.perf_counter()
    if not _MODEL_VERSION_RE.match(model_version):
        raise BuildError(
            f"model_version {model_version!r} must be 1-128 of [A-Za-z0-9._+-], not starting with . - +"
        )
    if not 1 <= golden_count <= 16:
        raise BuildError(f"golden_count must be 1..16, got {golden_count}")
    chosen = _variants(variants)
    for name in runtime_minimums:
        try:
            RuntimeName(name)
        except ValueError:
            raise BuildError(f"unknown runtime {name!r} in runtime_minimums") from None
    destination = Path(out_dir)
    destination.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    model = _load_weights(task, state_dict)
    from federated.tasks import input_contract_of

    try:
        contract = input_contract_of(task)
    except (TypeError, ValueError) as exc:
        raise BuildError(f"task {task.name}'s input contract: {exc}") from exc
    heldout = task.heldout()
    x = heldout.x  # raw: evaluated through the contract, as on a device
    y = heldout.y
    golden_idx = _golden_indices(y, golden_count)
    timings["load"] = time.perf_counter() - t

    t = time.perf_counter()
    try:
        fp32_bytes = _convert.convert_fp32(model, task.sample_input())
    except Exception as exc:
        raise BuildError(f"litert-torch could not convert task {task.name}'s model: {exc}") from exc
    timings["convert_fp32"] = time.perf_counter() - t

    producers: dict[ModelVariant, Callable[[], bytes]] = {
        ModelVariant.FP32: lambda: fp32_bytes,
        ModelVariant.FP16: lambda: _convert.quantize_fp16(fp32_bytes),
        ModelVariant.DYNAMIC_INT8: lambda: _convert.quantize_dynamic_int8(fp32_bytes),
        ModelVariant.FULL_INT8: lambda: _convert.quantize_full_int8(
            fp32_bytes, task.calibration_data(calibration_samples), batch_size=_convert.CALIBRATION_BATCH
        ),
    }

    staging = Path(tempfile.mkdtemp(dir=destination, prefix=f".build-{model_version}-"))
    artifacts: list[VariantArtifact] = []
    reference_accuracy = math.nan
    try:
        # fp32 first: it is the reference of the gate, built even when not requested.
        for variant in [ModelVariant.FP32, *(v for v in chosen if v is not ModelVariant.FP32)]:
            file_name = f"{model_version}-{variant.value}.tflite"
            runtimes = _runtimes_for(variant, runtime_minimums)
            t = time.perf_counter()
            try:
                data = producers[variant]()
            except Exception as exc:  # a quantiser failure rejects that variant, not the build
                log.warning("%s: %s conversion failed", model_version, variant.value, exc_info=True)
                convert_s = time.perf_counter() - t
                timings[variant.value] = convert_s
                _remove_stale(destination, model_version, variant)
                artifacts.append(
                    VariantArtifact(
                        variant=variant,
                        published=False,
                        reason=f"conversion failed: {type(exc).__name__}: {exc}",
                        runtimes=runtimes,
                        convert_s=convert_s,
                    )
                )
                continue
            convert_s = time.perf_counter() - t
            if variant is ModelVariant.FP32:
                convert_s += timings["convert_fp32"]
            staged = staging / file_name
            _write_atomically(staged, data)
            sha256 = file_sha256(staged)

            t = time.perf_counter()
            try:
                evaluation = _evaluate(variant, staged, sha256, x, y, golden_idx, contract)
            except Exception as exc:
                if variant is ModelVariant.FP32:
                    raise BuildError(f"the fp32 model does not run in {EVALUATION_RUNTIME}: {exc}") from exc
                log.warning("%s: %s does not run", model_version, variant.value, exc_info=True)
                evaluate_s = time.perf_counter() - t
                timings[variant.value] = convert_s + evaluate_s
                if variant in chosen:
                    _remove_stale(destination, model_version, variant)
                    artifacts.append(
                        VariantArtifact(
                            variant=variant,
                            published=False,
                            reason=f"does not run in {EVALUATION_RUNTIME}: {type(exc).__name__}: {exc}",
                            size_bytes=len(data),
                            runtimes=runtimes,
                            convert_s=convert_s,
                            evaluate_s=evaluate_s,
                        )
                    )
                continue
            if variant is ModelVariant.FP32:
                reference_accuracy = evaluation.accuracy
            drop = reference_accuracy - evaluation.accuracy
            reason: str | None = None
            if variant is not ModelVariant.FP32 and drop > max_accuracy_drop:
                reason = (
                    f"held-out accuracy {evaluation.accuracy:.4f} is {drop:.4f} below fp32's "
                    f"{reference_accuracy:.4f} (gate: at most {max_accuracy_drop:.4f} below)"
                )
            elif not runtimes:
                reason = f"no runtime in {dict(runtime_minimums)} may run {variant.value}"
            evaluate_s = time.perf_counter() - t
            timings[variant.value] = convert_s + evaluate_s
            if variant not in chosen:  # fp32 as the reference only
                continue

            outcome = VariantArtifact(
                variant=variant,
                published=False,
                reason=reason,
                size_bytes=len(data),
                accuracy=evaluation.accuracy,
                loss=evaluation.loss,
                accuracy_drop=drop,
                runtimes=runtimes,
                convert_s=convert_s,
                evaluate_s=evaluate_s,
                evaluated_with=evaluation.evaluated_with,
                batch_resizable=evaluation.batch_resizable,
            )
            if reason is not None:
                _remove_stale(destination, model_version, variant)
                artifacts.append(outcome)
                continue
            manifest = ModelManifest(
                model_version=model_version,
                task=task.name,
                variant=variant.value,
                file_name=file_name,
                sha256=sha256,
                size_bytes=len(data),
                runtimes=runtimes,
                source=source,
                metrics={"accuracy": round(evaluation.accuracy, 6), "loss": round(evaluation.loss, 6)},
                input_scale=float(getattr(task, "input_scale", 1.0)),
                preprocessing=contract,
                golden=evaluation.golden,
                created_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            )
            signed = signer.sign(manifest)
            path = destination / file_name
            manifest_path = destination / f"{model_version}-{variant.value}.manifest.json"
            os.replace(staged, path)  # the artifact first: a manifest never points at a missing file
            _write_atomically(manifest_path, msgspec.json.encode(signed) + b"\n")
            artifacts.append(
                dataclasses.replace(
                    outcome, published=True, path=path, manifest_path=manifest_path, signed=signed
                )
            )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    timings["total"] = time.perf_counter() - started
    by_variant = {a.variant: a for a in artifacts}
    return BuildResult(
        task=task.name,
        model_version=model_version,
        out_dir=destination,
        reference_accuracy=reference_accuracy,
        max_accuracy_drop=max_accuracy_drop,
        artifacts=tuple(by_variant[v] for v in chosen),
        timings=timings,
    )
