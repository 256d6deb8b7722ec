"""On-device inference: the TFLite interpreter, the model's input contract, the data source, the inference loop.

The data source serves RAW samples, as the device stores them. What a model needs from a raw sample is the
model's own input contract (:class:`agent.manifest.InputContract`, signed in its manifest): a
:class:`TFLiteModel` loaded with it applies it in :meth:`TFLiteModel.predict`, so live inference and the golden
self-test take one path (raw -> contract -> quantisation -> model) and a model swap swaps its preprocessing too.
:func:`declared_contract` finds a model file's contract; a model that declares none gets the digits' ``x / 16``
(:data:`LEGACY_INPUT_SCALE`), explicitly and with a warning.

Device side only: the standard library, numpy and one TFLite runtime (``ai-edge-litert``, or ``tflite-runtime``
on older device images). Importing this module never imports torch, and imports a runtime only when a model is
loaded.

Errors (under :class:`agent._errors.AgentError`)::

    AgentRuntimeError (also a RuntimeError)
    ├── RuntimeUnavailable   no TFLite runtime is installed
    ├── ModelLoadError       a model file is missing, corrupt or of an unsupported shape / type
    └── DataSourceError      the data set file is missing or malformed
"""

from __future__ import annotations

import collections
import hashlib
import importlib
import importlib.metadata
import importlib.resources
import json
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Final, NamedTuple

import msgspec
import numpy as np
import numpy.typing as npt

from agent import protocol
from agent._errors import AgentError
from agent.manifest import Golden, InputContract

__all__ = [
    "DEFAULT_DATA_RESOURCE",
    "DEFAULT_RUNTIME",
    "LEGACY_INPUT_SCALE",
    "RUNTIMES",
    "AgentRuntimeError",
    "DataSource",
    "DataSourceError",
    "InferenceLoop",
    "InferenceStats",
    "LoadedRuntime",
    "ModelLoadError",
    "Preprocessor",
    "RuntimeUnavailable",
    "SelfTestFailed",
    "TFLiteModel",
    "declared_contract",
    "load_interpreter_class",
    "model_version_of",
    "read_model_metadata",
    "self_test",
    "starter_model_path",
]

log = logging.getLogger(__name__)

DEFAULT_RUNTIME: Final = "ai-edge-litert"
# Preference order when the configured runtime is missing or unknown.
RUNTIMES: Final = ("ai-edge-litert", "tflite-runtime")
_RUNTIME_MODULES: Final = {
    "ai-edge-litert": "ai_edge_litert.interpreter",
    "tflite-runtime": "tflite_runtime.interpreter",
}
_RUNTIME_EXTRAS: Final = {"ai-edge-litert": "edgefleet[agent]", "tflite-runtime": "edgefleet[agent-tflite]"}

# The shipped data set stores raw load_digits pixels (0..16); the digits models take pixels / 16. Only a model
# that declares no input contract at all (no manifest, no metadata) is fed with this, as every model was before
# models carried their contract.
LEGACY_INPUT_SCALE: Final = 1.0 / 16.0
_MANIFEST_FILE: Final = "manifest.json"  # beside an installed model: the signed release it came with
DEFAULT_DATA_RESOURCE: Final = ("agent.data", "digits.npz")
_MODELS_PACKAGE: Final = "agent.models"
_TFLITE_IDENTIFIER: Final = b"TFL3"  # flatbuffer file identifier, bytes 4..8

FloatArray = npt.NDArray[np.float32]


class AgentRuntimeError(AgentError, RuntimeError):
    """Base class of the inference runtime's errors."""


class RuntimeUnavailable(AgentRuntimeError):
    """No TFLite runtime can be imported on this device."""


class ModelLoadError(AgentRuntimeError):
    """A model file cannot be loaded; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"cannot load TFLite model {self.path}: {reason}")


class DataSourceError(AgentRuntimeError):
    """A data set file cannot be loaded."""


# --------------------------------------------------------------------------------------------------- runtime


class LoadedRuntime(NamedTuple):
    """The interpreter class of the runtime actually in use, with its distribution name and version."""

    interpreter_class: type[Any]
    name: str
    version: str


def _import_runtime(name: str) -> LoadedRuntime | None:
    try:
        module = importlib.import_module(_RUNTIME_MODULES[name])
    except ImportError:
        return None
    try:
        version = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        version = str(getattr(module, "__version__", "unknown"))
    return LoadedRuntime(module.Interpreter, name, version)


def load_interpreter_class(runtime: str = DEFAULT_RUNTIME) -> LoadedRuntime:
    """The ``Interpreter`` class of ``runtime`` (``ai-edge-litert`` or ``tflite-runtime``).

    If that runtime is not installed, or the name is unknown, the other one is used and a warning logged; the
    returned :class:`LoadedRuntime` names the runtime actually used (report it, e.g. in ``State.runtime``).

    Raises
    ------
    RuntimeUnavailable
        Neither runtime is installed.
    """
    if runtime in _RUNTIME_MODULES:
        candidates = [runtime, *(name for name in RUNTIMES if name != runtime)]
    else:
        log.warning(
            "unknown TFLite runtime %r (expected one of %s); trying the others", runtime, ", ".join(RUNTIMES)
        )
        candidates = list(RUNTIMES)
    for name in candidates:
        loaded = _import_runtime(name)
        if loaded is None:
            continue
        if name != runtime and runtime in _RUNTIME_MODULES:
            log.warning(
                "TFLite runtime %r is not installed; falling back to %s %s", runtime, name, loaded.version
            )
        return loaded
    extras = " or ".join(f"pip install '{extra}'" for extra in _RUNTIME_EXTRAS.values())
    raise RuntimeUnavailable(
        f"no TFLite runtime is installed (wanted {runtime!r}; tried {', '.join(candidates)}): {extras}"
    )


# ----------------------------------------------------------------------------------------------------- model


def starter_model_path(variant: str = "fp32") -> Path:
    """Path of a starter model shipped in ``agent/models`` (``fp32`` or ``int8``)."""
    ref = importlib.resources.files(_MODELS_PACKAGE) / f"starter-digits-{variant}.tflite"
    # Installed as a regular package (also editable), resources are plain files.
    return Path(str(ref))


def read_model_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata next to a model (``model.json`` beside ``model.tflite``); empty if absent or unreadable."""
    meta_path = Path(path).with_suffix(".json")
    try:
        metadata = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable model metadata %s: %s", meta_path, exc)
        return {}
    return metadata if isinstance(metadata, dict) else {}


def model_version_of(path: str | os.PathLike[str]) -> str:
    """The ``model_version`` from a model's metadata, else the model file's name without its suffix."""
    version = read_model_metadata(path).get("model_version")
    return version if isinstance(version, str) and version else Path(path).stem


def _check_tflite_file(path: Path) -> None:
    try:
        with path.open("rb") as fh:
            head = fh.read(8)
    except FileNotFoundError:
        raise ModelLoadError(path, "no such file") from None
    except OSError as exc:
        raise ModelLoadError(path, f"cannot read: {exc.strerror or exc}") from exc
    if len(head) < 8:
        raise ModelLoadError(path, f"not a TFLite model: only {len(head)} bytes")
    if head[4:8] != _TFLITE_IDENTIFIER:
        raise ModelLoadError(
            path, f"not a TFLite model: file identifier {head[4:8]!r}, expected {_TFLITE_IDENTIFIER!r}"
        )


def _check_sha256(path: Path, expected: str, source: str) -> None:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as exc:
        raise ModelLoadError(path, f"cannot read: {exc.strerror or exc}") from exc
    if digest.hexdigest() != expected.strip().lower():
        raise ModelLoadError(
            path, f"sha256 {digest.hexdigest()} does not match {source} ({expected}): truncated or replaced?"
        )


class Preprocessor:
    """An :class:`InputContract` made ready to apply: ``x * scale + offset`` per feature, in the contract's dtype.

    ``feature_shape`` is the model's sample shape; the contract's ``shape`` (when declared) must equal it and its
    ``scale``/``offset`` must hold 1 or ``prod(feature_shape)`` finite values. The same function serves the
    build (training, evaluation, calibration, golden) and the device, so both compute bit-identical inputs.

    Raises
    ------
    ValueError
        The contract does not fit ``feature_shape`` or holds a non-finite value (the message says which).
    """

    def __init__(self, contract: InputContract, feature_shape: tuple[int, ...] | None = None) -> None:
        shape = tuple(contract.shape) if contract.shape is not None else feature_shape
        if contract.shape is not None and feature_shape is not None and tuple(feature_shape) != shape:
            raise ValueError(f"the input contract is for samples of shape {list(contract.shape)}, the model "
                             f"takes {list(feature_shape)}")
        try:
            dtype = np.dtype(contract.dtype)
        except TypeError:
            raise ValueError(f"unknown input dtype {contract.dtype!r} in the input contract") from None
        if dtype.kind != "f":
            raise ValueError(f"input contract dtype must be a float type, got {contract.dtype!r}")
        size = math.prod(shape) if shape is not None else None
        arrays = []
        for name, values in (("scale", contract.scale), ("offset", contract.offset)):
            array = np.asarray(values, dtype=np.float64)
            if array.ndim != 1 or array.size == 0 or (array.size != 1 and array.size != size):
                raise ValueError(f"input contract {name} has {array.size} values; needs 1 or one per feature "
                                 f"({size if size is not None else 'unknown'})")
            if not np.all(np.isfinite(array)):
                raise ValueError(f"input contract {name} holds a non-finite value")
            if array.size != 1 and shape is not None:
                array = array.reshape(shape)
            arrays.append(array.astype(dtype))
        self.contract = contract
        self.shape = shape
        self.dtype: np.dtype[Any] = dtype
        self._scale, self._offset = arrays

    def __call__(self, x: npt.ArrayLike) -> FloatArray:
        """Raw samples ``(N, *shape)`` -> model input ``(N, *shape)`` in the contract's dtype."""
        raw = np.asarray(x)
        if self.shape is not None and (raw.ndim != len(self.shape) + 1 or raw.shape[1:] != self.shape):
            raise ValueError(f"expected raw samples of shape (N>0, {', '.join(map(str, self.shape))}), got "
                             f"{raw.shape}")
        if raw.dtype.kind not in "iuf":
            raise ValueError(f"raw samples of non-numeric type {raw.dtype}")
        out: FloatArray = raw.astype(self.dtype) * self._scale + self._offset
        return out.astype(self.dtype, copy=False)

    def __repr__(self) -> str:
        return f"Preprocessor({self.contract.source}, shape={self.shape})"


def declared_contract(path: str | os.PathLike[str]) -> InputContract:
    """The input contract of a model file, as the agent finds it on disk.

    In this order: the signed release installed beside it (``manifest.json``, verified when it was installed),
    the ``preprocessing`` of its metadata (``model.json``), the ``input_scale`` of its metadata (the starter
    models), and else — a model that declares nothing, e.g. an operator's ``--model`` file — the digits' legacy
    ``x / 16``, logged as such.
    """
    from agent import manifest as _manifest

    model_path = Path(path)
    installed = model_path.parent / _MANIFEST_FILE
    if installed.is_file():
        data = installed.read_bytes()
        try:
            return _manifest.decode_signed_release(data).release.artifact.input_contract()
        except _manifest.ManifestError:
            try:
                return _manifest.decode_signed(data).manifest.input_contract()
            except _manifest.ManifestError as exc:
                raise ModelLoadError(model_path, f"unreadable {installed.name} beside it: {exc}") from exc
    metadata = read_model_metadata(model_path)
    if "preprocessing" in metadata:
        try:
            return msgspec.convert(metadata["preprocessing"], InputContract)
        except msgspec.ValidationError as exc:
            raise ModelLoadError(model_path, f"bad 'preprocessing' in its metadata: {exc}") from exc
    scale = metadata.get("input_scale")
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        return InputContract(scale=[float(scale)], source=f"metadata input_scale ({float(scale):g})")
    log.warning("model %s declares no input contract: feeding it raw samples * %g (the legacy digits default)",
                model_path, LEGACY_INPUT_SCALE)
    return InputContract(scale=[LEGACY_INPUT_SCALE], source="legacy default: none declared, x / 16")


def _quantization(detail: dict[str, Any]) -> tuple[float, int]:
    scale, zero_point = detail.get("quantization", (0.0, 0))
    return float(scale), int(zero_point)


class TFLiteModel:
    """One loaded TFLite classifier with a single input ``(batch, *features)`` and output ``(batch, classes)``.

    With an input contract (``preprocessing``) :meth:`predict` takes RAW samples and applies the contract first;
    without one it takes model input as it is (build tools that prepare it themselves).
    :meth:`predict` returns float32 scores. For integer (int8/uint8) input tensors it
    quantizes with the tensor's (scale, zero_point) and it dequantizes integer outputs the same way, so callers
    never see the model's I/O types. Models are converted at batch 1; the input tensor is resized when the batch
    size changes (the last size is kept, so a steady batch size costs no reallocation). Calls are serialized by a
    lock: a TFLite interpreter is not thread-safe.
    """

    def __init__(self, interpreter: Any, *, path: str, runtime_name: str, runtime_version: str,
                 preprocessing: InputContract | None = None) -> None:
        self.path = path
        self.runtime_name = runtime_name
        self.runtime_version = runtime_version
        self._interpreter = interpreter
        self._lock = threading.Lock()
        inputs, outputs = interpreter.get_input_details(), interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ModelLoadError(path, f"expected 1 input and 1 output, got {len(inputs)} and {len(outputs)}")
        inp, out = inputs[0], outputs[0]
        self._input_index: int = int(inp["index"])
        self._output_index: int = int(out["index"])
        self._input_shape = tuple(int(d) for d in inp["shape"])
        self._output_shape = tuple(int(d) for d in out["shape"])
        if len(self._input_shape) < 2:
            raise ModelLoadError(path, f"input shape {list(self._input_shape)} has no batch dimension")
        if len(self._output_shape) != 2:
            raise ModelLoadError(path, f"output shape {list(self._output_shape)} is not (batch, classes)")
        self._input_dtype: np.dtype[Any] = np.dtype(inp["dtype"])
        self._output_dtype: np.dtype[Any] = np.dtype(out["dtype"])
        self._input_quant = _quantization(inp)
        self._output_quant = _quantization(out)
        for role, dtype, (scale, _) in (
            ("input", self._input_dtype, self._input_quant),
            ("output", self._output_dtype, self._output_quant),
        ):
            if dtype.kind in "iu" and scale == 0.0:
                raise ModelLoadError(path, f"{role} tensor is {dtype.name} without quantization parameters")
            if dtype.kind not in "iuf":
                raise ModelLoadError(path, f"unsupported {role} type {dtype.name}")
        self._batch = self._input_shape[0]
        self._preprocess: Preprocessor | None = None
        if preprocessing is not None:
            try:
                self._preprocess = Preprocessor(preprocessing, self._input_shape[1:])
            except ValueError as exc:
                raise ModelLoadError(path, str(exc)) from exc

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        runtime: str = DEFAULT_RUNTIME,
        num_threads: int = 1,
        *,
        sha256: str | None = None,
        preprocessing: InputContract | None = None,
    ) -> TFLiteModel:
        """Load and allocate a model; with ``preprocessing`` (its input contract) it predicts on raw samples.

        The file is checked against ``sha256`` if given, else against the ``sha256`` of its metadata file
        (:func:`read_model_metadata`) if it has one, before any runtime sees it: tflite-runtime 2.14 does not
        verify the flatbuffer and crashes the process on a truncated model.

        Raises
        ------
        ModelLoadError
            The file is missing, not a TFLite model, corrupt, does not match its checksum, is not a
            single-input/single-output classifier, or ``preprocessing`` does not fit its input.
        RuntimeUnavailable
            No TFLite runtime is installed.
        """
        model_path = Path(path)
        _check_tflite_file(model_path)
        expected = sha256 if sha256 is not None else read_model_metadata(model_path).get("sha256")
        if isinstance(expected, str) and expected:
            _check_sha256(
                model_path, expected, "the given checksum" if sha256 is not None else "its metadata"
            )
        interpreter_class, name, version = load_interpreter_class(runtime)
        try:
            interpreter = interpreter_class(model_path=str(model_path), num_threads=num_threads)
            interpreter.allocate_tensors()
        except (ValueError, RuntimeError, OSError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(model_path, reason) from exc
        return cls(interpreter, path=str(model_path), runtime_name=name, runtime_version=version,
                   preprocessing=preprocessing)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The input tensor's shape as converted, batch dimension first (the starter models: ``(1, 64)``)."""
        return self._input_shape

    @property
    def preprocessing(self) -> InputContract | None:
        """The input contract :meth:`predict` applies to raw samples; None: it takes model input as is."""
        return self._preprocess.contract if self._preprocess is not None else None

    @property
    def input_dtype(self) -> np.dtype[Any]:
        """The input tensor's type (float32, or int8/uint8 for full-integer models)."""
        return self._input_dtype

    @property
    def output_dtype(self) -> np.dtype[Any]:
        return self._output_dtype

    @property
    def num_classes(self) -> int:
        return self._output_shape[-1]

    @property
    def input_quantization(self) -> tuple[float, int]:
        """(scale, zero_point) of the input tensor; (0.0, 0) for float inputs."""
        return self._input_quant

    @property
    def output_quantization(self) -> tuple[float, int]:
        return self._output_quant

    def _quantize_input(self, x: npt.NDArray[Any]) -> npt.NDArray[Any]:
        if self._input_dtype.kind == "f":
            return np.ascontiguousarray(x, dtype=self._input_dtype)
        if x.dtype == self._input_dtype:  # already quantized by the caller
            return np.ascontiguousarray(x)
        scale, zero_point = self._input_quant
        info = np.iinfo(self._input_dtype)
        q = np.round(np.asarray(x, dtype=np.float32) / np.float32(scale)) + zero_point
        quantized: npt.NDArray[Any] = np.clip(q, info.min, info.max).astype(self._input_dtype)
        return quantized

    def _dequantize_output(self, y: npt.NDArray[Any]) -> FloatArray:
        if self._output_dtype.kind == "f":
            return np.asarray(y, dtype=np.float32)
        scale, zero_point = self._output_quant
        return ((y.astype(np.float32) - np.float32(zero_point)) * np.float32(scale)).astype(np.float32)

    def predict(self, x: npt.ArrayLike) -> FloatArray:
        """Float32 scores ``(N, num_classes)`` for a batch ``x`` of shape ``(N, *input_shape[1:])``.

        ``x`` is raw samples when the model has an input contract (:attr:`preprocessing`), else model input.

        Raises
        ------
        ValueError
            ``x`` does not have the model's feature shape, or the batch is empty.
        """
        batch = np.asarray(x) if self._preprocess is None else self._preprocess(x)
        features = self._input_shape[1:]
        if batch.ndim != len(self._input_shape) or batch.shape[1:] != features or batch.shape[0] == 0:
            raise ValueError(
                f"expected a batch of shape (N>0, {', '.join(map(str, features))}), got {batch.shape}"
            )
        feed = self._quantize_input(batch)
        with self._lock:
            if batch.shape[0] != self._batch:
                self._interpreter.resize_tensor_input(self._input_index, [batch.shape[0], *features])
                self._interpreter.allocate_tensors()
                self._batch = batch.shape[0]
            self._interpreter.set_tensor(self._input_index, feed)
            self._interpreter.invoke()
            scores = self._interpreter.get_tensor(self._output_index)
        return self._dequantize_output(scores)

    def __repr__(self) -> str:
        return (
            f"TFLiteModel({self.path!r}, runtime={self.runtime_name} {self.runtime_version}, "
            f"input={list(self._input_shape)} {self._input_dtype.name}, classes={self.num_classes}, "
            f"preprocessing={self._preprocess!r})"
        )


# ------------------------------------------------------------------------------------------------------ data


class DataSource:
    """Samples for the inference loop, served cyclically from an ``.npz`` file.

    The file holds ``x`` (raw features, one row per sample; any trailing shape) and optionally ``y`` (labels).
    Samples are served RAW (as float32): the model's input contract turns them into model input
    (:meth:`TFLiteModel.predict`), never the data source. By default the data set shipped with the agent
    (scikit-learn's 1797 handwritten 8x8 digits, pixels 0..16) is used.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None):
        if path is None:
            package, name = DEFAULT_DATA_RESOURCE
            ref = importlib.resources.files(package) / name
            self.path = f"{package}/{name}"
            with importlib.resources.as_file(ref) as file:
                x, y = self._read(file)
        else:
            self.path = os.fspath(path)
            x, y = self._read(Path(path))
        self._x: FloatArray = x.astype(np.float32)
        self._x.setflags(write=False)
        self._y = y
        if y is not None:
            y.setflags(write=False)
        self._cursor = 0
        self._lock = threading.Lock()

    @staticmethod
    def _read(path: Path) -> tuple[npt.NDArray[Any], npt.NDArray[np.int64] | None]:
        try:
            with np.load(path, allow_pickle=False) as npz:
                if "x" not in npz.files:
                    raise DataSourceError(f"{path}: no 'x' array (found {', '.join(npz.files) or 'nothing'})")
                x = np.asarray(npz["x"])
                y = np.asarray(npz["y"]).astype(np.int64) if "y" in npz.files else None
        except DataSourceError:
            raise
        except (OSError, ValueError, EOFError) as exc:
            raise DataSourceError(f"cannot load data set {path}: {exc}") from exc
        if x.ndim < 2 or x.shape[0] == 0:
            raise DataSourceError(f"{path}: 'x' must hold at least one sample row, got shape {x.shape}")
        if x.dtype.kind not in "iuf":
            raise DataSourceError(f"{path}: 'x' has non-numeric type {x.dtype}")
        if y is not None and y.shape != (x.shape[0],):
            raise DataSourceError(f"{path}: 'y' has shape {y.shape}, expected ({x.shape[0]},)")
        return x, y

    def __len__(self) -> int:
        return int(self._x.shape[0])

    @property
    def x(self) -> FloatArray:
        """All samples, raw, float32 (read-only)."""
        return self._x

    @property
    def y(self) -> npt.NDArray[np.int64] | None:
        """All labels (read-only), or None."""
        return self._y

    def next_batch(self, n: int = 1) -> FloatArray:
        """The next ``n`` samples, wrapping around at the end of the data set."""
        return self.next_labelled(n)[0]

    def next_labelled(self, n: int = 1) -> tuple[FloatArray, npt.NDArray[np.int64] | None]:
        """The next ``n`` samples and their labels (None when the data has none)."""
        if n < 1:
            raise ValueError(f"batch size must be positive, got {n}")
        with self._lock:
            start = self._cursor
            self._cursor = (start + n) % len(self)
        stop = start + n
        index: slice | npt.NDArray[np.int64] = slice(start, stop) if stop <= len(self) else np.arange(start, stop) % len(self)
        return self._x[index], (self._y[index] if self._y is not None else None)


# ----------------------------------------------------------------------------------------------------- stats


def _top1_confidence(scores: FloatArray) -> FloatArray:
    """Top-1 probability per row. Scores are logits unless they already are probability distributions."""
    if scores.min() >= 0.0 and np.allclose(scores.sum(axis=1), 1.0, atol=1e-3):
        return np.asarray(scores.max(axis=1), dtype=np.float32)
    shifted = scores - scores.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return np.asarray(1.0 / exp.sum(axis=1), dtype=np.float32)  # exp(max - max) == 1 over the sum


class InferenceStats:
    """Thread-safe accumulator of inference results between two telemetry messages.

    Each :meth:`record` is one ``predict`` call: its latency is one latency sample, and every row of its scores
    is one inference (counted, its top-1 class and confidence accumulated). At most ``max_latencies`` latencies
    (the most recent) are kept for the percentiles, so a long gap between snapshots cannot exhaust memory.
    """

    def __init__(self, max_latencies: int = 10_000) -> None:
        self._lock = threading.Lock()
        self._latencies: collections.deque[float] = collections.deque(maxlen=max_latencies)
        self._count = 0
        self._confidence_sum = 0.0
        self._histogram: collections.Counter[int] = collections.Counter()
        self._errors = 0
        self._labelled = 0
        self._correct = 0

    def record(self, latency_s: float, scores: npt.ArrayLike, labels: npt.ArrayLike | None = None) -> None:
        rows = np.asarray(scores, dtype=np.float32)
        if rows.ndim == 1:
            rows = rows[None, :]
        if rows.ndim != 2 or rows.shape[0] == 0 or rows.shape[1] == 0:
            raise ValueError(f"scores must be (N, classes), got shape {rows.shape}")
        predicted = rows.argmax(axis=1)
        correct = int((predicted == np.asarray(labels)).sum()) if labels is not None else 0
        confidence = float(_top1_confidence(rows).sum())
        classes, counts = np.unique(predicted, return_counts=True)
        with self._lock:
            self._latencies.append(float(latency_s))
            self._count += rows.shape[0]
            self._confidence_sum += confidence
            self._histogram.update(dict(zip(classes.tolist(), counts.tolist(), strict=True)))
            if labels is not None:
                self._labelled += rows.shape[0]
                self._correct += correct

    def record_error(self, n: int = 1) -> None:
        with self._lock:
            self._errors += n

    @property
    def count(self) -> int:
        with self._lock:
            return self._count

    def snapshot_and_reset(self, model_version: str | None) -> protocol.InferenceStats:
        """The statistics since the previous snapshot, as the telemetry payload; the accumulator starts over."""
        with self._lock:
            latencies = np.fromiter(self._latencies, dtype=np.float64, count=len(self._latencies))
            count, confidence_sum = self._count, self._confidence_sum
            histogram, errors = self._histogram, self._errors
            labelled, correct = self._labelled, self._correct
            self._latencies.clear()
            self._count, self._confidence_sum, self._errors = 0, 0.0, 0
            self._labelled, self._correct = 0, 0
            self._histogram = collections.Counter()
        p50 = p95 = None
        if latencies.size:
            p50_s, p95_s = np.percentile(latencies, [50.0, 95.0])
            p50, p95 = round(float(p50_s) * 1000.0, 4), round(float(p95_s) * 1000.0, 4)
        mean_confidence = round(confidence_sum / count, 4) if count else None
        if mean_confidence is not None and not math.isfinite(mean_confidence):
            mean_confidence = None
        return protocol.InferenceStats(
            model_version=model_version,
            count=count,
            latency_p50_ms=p50,
            latency_p95_ms=p95,
            mean_confidence=mean_confidence,
            class_histogram={str(k): v for k, v in sorted(histogram.items())},
            errors=errors,
            labelled=labelled,
            correct=correct,
        )


# ------------------------------------------------------------------------------------------------------ loop


class InferenceLoop(threading.Thread):
    """Background thread running ``model.predict`` on one sample at a time, ``rate_hz`` samples per second.

    ``rate_hz`` 0 pauses the loop until :meth:`set_rate` gives it a positive rate. Exceptions from the model
    count as errors in :attr:`stats` (logged at most once a minute) and never end the loop. :meth:`swap_model`
    replaces the model between two inferences; :meth:`stop` ends the loop promptly.
    """

    _ERROR_LOG_INTERVAL_S: Final = 60.0

    def __init__(
        self,
        model: TFLiteModel,
        data: DataSource,
        stats: InferenceStats | None = None,
        *,
        model_version: str | None = None,
        rate_hz: float = 5.0,
        name: str = "edgefleet-inference",
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.data = data
        self.stats = stats if stats is not None else InferenceStats()
        self._rate_hz = self._check_rate(rate_hz)
        self._model = model
        self._model_version = model_version
        self._model_lock = threading.Lock()
        self._stopping = threading.Event()
        self._wake = threading.Event()  # set by stop() and set_rate(): re-read the schedule
        self._last_error_log = -math.inf

    @staticmethod
    def _check_rate(rate_hz: float) -> float:
        rate = float(rate_hz)
        if not (math.isfinite(rate) and rate >= 0.0):
            raise ValueError(f"rate_hz must be a finite number of samples per second >= 0, got {rate_hz!r}")
        return rate

    @property
    def rate_hz(self) -> float:
        return self._rate_hz

    def set_rate(self, rate_hz: float) -> None:
        """Change the rate (0 pauses); takes effect at once, not after the current wait."""
        self._rate_hz = self._check_rate(rate_hz)
        self._wake.set()

    @property
    def model(self) -> TFLiteModel:
        with self._model_lock:
            return self._model

    @property
    def model_version(self) -> str | None:
        with self._model_lock:
            return self._model_version

    def swap_model(self, model: TFLiteModel, version: str | None) -> tuple[TFLiteModel, str | None]:
        """Replace the model; returns the previous (model, version).

        Once this returns, the previous model is no longer in use (an inference in flight finishes first), so it
        may be released.
        """
        with self._model_lock:
            previous = self._model, self._model_version
            self._model, self._model_version = model, version
        return previous

    def snapshot(self) -> protocol.InferenceStats:
        """``stats.snapshot_and_reset`` labelled with the current model version."""
        return self.stats.snapshot_and_reset(self.model_version)

    def stop(self, timeout: float | None = 1.0) -> None:
        """Ask the loop to end and wait up to ``timeout`` seconds for it."""
        self._stopping.set()
        self._wake.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def _infer_one(self) -> None:
        sample, labels = self.data.next_labelled(1)
        with self._model_lock:  # held through the inference: swap_model waits for it
            try:
                started = time.perf_counter()
                scores = self._model.predict(sample)
                self.stats.record(time.perf_counter() - started, scores, labels)
            except Exception:
                self.stats.record_error()
                now = time.monotonic()
                if now - self._last_error_log >= self._ERROR_LOG_INTERVAL_S:
                    self._last_error_log = now
                    log.warning("inference failed (model %s)", self._model_version, exc_info=True)

    def _wait(self, timeout: float | None) -> None:
        if self._wake.wait(timeout):
            self._wake.clear()  # the loop re-reads the rate and the stop flag next

    def run(self) -> None:
        deadline = time.monotonic()
        while not self._stopping.is_set():
            rate = self._rate_hz
            if rate <= 0.0:
                self._wait(None)
                deadline = time.monotonic()
                continue
            self._infer_one()
            deadline += 1.0 / rate
            now = time.monotonic()
            if deadline <= now:
                deadline = now  # running behind: don't burst to catch up
                continue
            self._wait(deadline - now)
            if self._rate_hz != rate:
                deadline = time.monotonic()


class SelfTestFailed(AgentError):
    """The model does not reproduce its signed golden output through its input contract (the message says how far off)."""


def self_test(model: TFLiteModel, golden: Golden) -> dict[str, Any]:
    """Run the raw golden input through ``model`` (its input contract, then the model); returns the figures,
    raises SelfTestFailed (with the figures that show why) if off."""
    expected = np.asarray(golden.output, dtype=np.float32)
    try:
        actual = model.predict(np.asarray(golden.input, dtype=np.float32))
    except Exception as exc:  # any failure of the candidate model is a failed self-test
        raise SelfTestFailed(f"self-test failed: predict raised {type(exc).__name__}: {exc}") \
            from exc
    if actual.shape != expected.shape:
        raise SelfTestFailed(f"self-test failed: output shape {list(actual.shape)}, golden output "
                                       f"{list(expected.shape)}")
    if not np.all(np.isfinite(actual)):
        raise SelfTestFailed("self-test failed: the model returns non-finite values on the golden "
                                       "input")
    diff: npt.NDArray[np.float32] = np.abs(actual - expected)
    worst = float(diff.max()) if diff.size else 0.0
    agree = int((actual.argmax(axis=1) == expected.argmax(axis=1)).sum()) if diff.size else 0
    samples = int(expected.shape[0])
    figures = {"max_abs_diff": round(worst, 6), "tolerance": golden.tolerance, "samples": samples,
               "top1_agreement": f"{agree}/{samples}"}
    if not worst <= golden.tolerance:
        row, col = (int(i) for i in np.unravel_index(int(diff.argmax()), diff.shape))
        raise SelfTestFailed(
            f"self-test failed: max |output - golden| = {worst:.4g} > tolerance {golden.tolerance:g} "
            f"(sample {row}, class {col}: {float(actual[row, col]):.4g} vs golden "
            f"{float(expected[row, col]):.4g}); "
            f"top-1 agrees on {agree}/{samples} golden samples")
    return figures
