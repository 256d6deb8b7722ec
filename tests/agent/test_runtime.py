"""agent.runtime against the real LiteRT interpreter and the shipped starter models and data."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent import protocol
from agent._errors import AgentError
from agent.manifest import InputContract
from agent.runtime import (
    RUNTIMES,
    AgentRuntimeError,
    DataSource,
    DataSourceError,
    InferenceLoop,
    InferenceStats,
    ModelLoadError,
    Preprocessor,
    RuntimeUnavailable,
    TFLiteModel,
    declared_contract,
    load_interpreter_class,
    model_version_of,
    read_model_metadata,
    starter_model_path,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
_MODULES = {"ai-edge-litert": "ai_edge_litert", "tflite-runtime": "tflite_runtime"}
INSTALLED = frozenset(name for name in RUNTIMES if importlib.util.find_spec(_MODULES[name]) is not None)
# The runtime a default load resolves to in this environment.
DEFAULT_IN_USE = next(name for name in RUNTIMES if name in INSTALLED)


@pytest.fixture(name="model")
def fx_model() -> TFLiteModel:
    """The fp32 starter with its declared input contract: it predicts on raw samples, as on a device."""
    path = starter_model_path("fp32")
    return TFLiteModel.load(path, preprocessing=declared_contract(path))


@pytest.fixture(name="int8_model")
def fx_int8_model() -> TFLiteModel:
    path = starter_model_path("int8")
    return TFLiteModel.load(path, preprocessing=declared_contract(path))


@pytest.fixture(name="data")
def fx_data() -> DataSource:
    return DataSource()


@pytest.fixture(name="loops")
def fx_loops() -> Iterator[list[InferenceLoop]]:
    """Loops a test starts; stopped at teardown even when the test fails."""
    loops: list[InferenceLoop] = []
    yield loops
    for loop in loops:
        loop.stop(timeout=5.0)


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# ------------------------------------------------------------------------------------------------- imports


def test_import_pulls_neither_torch_nor_a_runtime() -> None:
    # Execute
    result = _run_python(
        """
        import sys
        import agent.runtime
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in {"torch", "ai_edge_litert", "tflite_runtime"})
        print(heavy)
        """
    )

    # Assert
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_errors_are_agent_errors() -> None:
    # Assert
    for error in (RuntimeUnavailable, ModelLoadError, DataSourceError):
        assert issubclass(error, AgentRuntimeError)
    assert issubclass(AgentRuntimeError, AgentError)
    assert issubclass(AgentRuntimeError, RuntimeError)


# ------------------------------------------------------------------------------------------------- runtime


# What load_interpreter_class(argv[1]) resolves to in the Python that runs this, with the warnings it logs and
# which runtimes that environment has: the runtime tests run it here (LiteRT) and in the device-like environment
# (tflite-runtime 2.14, no LiteRT), so each runtime is both used where it is installed and fallen back from where
# it is not.
_LOAD_PROBE = """
import importlib, importlib.metadata, importlib.util, json, logging, sys
warnings = []
class Capture(logging.Handler):
    def emit(self, record):
        warnings.append(record.getMessage())
logger = logging.getLogger("agent.runtime")
logger.addHandler(Capture(logging.WARNING))
logger.propagate = False
from agent.runtime import load_interpreter_class
modules = {"ai-edge-litert": "ai_edge_litert", "tflite-runtime": "tflite_runtime"}
installed = sorted(name for name, module in modules.items() if importlib.util.find_spec(module) is not None)
loaded = load_interpreter_class(sys.argv[1])
module = importlib.import_module(modules[loaded.name] + ".interpreter")
print(json.dumps({"installed": installed, "name": loaded.name, "version": loaded.version,
                  "distribution_version": importlib.metadata.version(loaded.name),
                  "is_the_module_class": loaded.interpreter_class is module.Interpreter,
                  "numpy": importlib.metadata.version("numpy"), "warnings": warnings}))
"""


def _probe_load(python: str, runtime: str) -> dict[str, Any]:
    result = subprocess.run([python, "-c", _LOAD_PROBE, runtime], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    probe: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return probe


@pytest.fixture(name="environments")
def fx_environments(tflite_python: str) -> dict[str, str]:
    """The Python to run each runtime's case in: where it is installed ("with") and where it is not ("without")."""
    return {"with ai-edge-litert": sys.executable, "without ai-edge-litert": tflite_python,
            "with tflite-runtime": tflite_python, "without tflite-runtime": sys.executable}


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_installed_runtime_is_used(runtime: str, environments: dict[str, str]) -> None:
    # Execute
    probe = _probe_load(environments[f"with {runtime}"], runtime)

    # Assert
    assert runtime in probe["installed"]
    assert probe["name"] == runtime
    assert probe["is_the_module_class"]
    assert probe["version"] == probe["distribution_version"]
    assert probe["warnings"] == []


def test_the_device_like_environment_is_a_raspberry_pi_4s(tflite_python: str) -> None:
    # Execute
    probe = _probe_load(tflite_python, "tflite-runtime")

    # Assert: the runtime and numpy of the raspberry-pi-4 profile's image, and no LiteRT to hide behind
    assert probe["installed"] == ["tflite-runtime"]
    assert probe["version"] == "2.14.0"
    assert int(probe["numpy"].split(".")[0]) < 2


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_missing_runtime_falls_back_with_warning(runtime: str, environments: dict[str, str]) -> None:
    # Execute
    probe = _probe_load(environments[f"without {runtime}"], runtime)

    # Assert
    assert runtime not in probe["installed"]
    assert probe["name"] != runtime
    assert probe["name"] in probe["installed"]
    assert probe["is_the_module_class"]
    warnings = "\n".join(probe["warnings"])
    assert f"{runtime!r} is not installed" in warnings
    assert f"falling back to {probe['name']}" in warnings


def test_unknown_runtime_falls_back_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    # Prepare
    caplog.set_level(logging.WARNING, logger="agent.runtime")

    # Execute
    loaded = load_interpreter_class("tflite-micro")

    # Assert
    assert loaded.name == DEFAULT_IN_USE
    assert "unknown TFLite runtime 'tflite-micro'" in caplog.text


def test_no_runtime_installed_raises_runtime_unavailable() -> None:
    # Prepare: a fresh interpreter in which neither runtime can be imported (None in sys.modules makes
    # `import` raise ImportError, exactly as for a package that is not installed).
    code = """
        import sys
        for name in ("ai_edge_litert", "ai_edge_litert.interpreter", "tflite_runtime", "tflite_runtime.interpreter"):
            sys.modules[name] = None
        from agent.runtime import RuntimeUnavailable, load_interpreter_class
        try:
            load_interpreter_class("ai-edge-litert")
        except RuntimeUnavailable as exc:
            print(exc)
        else:
            print("no error")
        """

    # Execute
    result = _run_python(code)

    # Assert
    assert result.returncode == 0, result.stderr
    assert "no TFLite runtime is installed" in result.stdout
    assert "edgefleet[agent]" in result.stdout
    assert "edgefleet[agent-tflite]" in result.stdout


# --------------------------------------------------------------------------------------------------- model


def test_shipped_model_loads(model: TFLiteModel) -> None:
    # Assert
    assert model.input_shape == (1, 64)
    assert model.input_dtype == np.float32
    assert model.num_classes == 10
    assert model.runtime_name == DEFAULT_IN_USE
    assert model.runtime_version == importlib.metadata.version(DEFAULT_IN_USE)


def test_shipped_model_metadata() -> None:
    # Prepare
    path = starter_model_path("fp32")

    # Execute
    metadata = read_model_metadata(path)

    # Assert
    assert model_version_of(path) == "starter-digits-1"
    assert metadata["variant"] == "fp32"
    assert metadata["size_bytes"] == path.stat().st_size
    assert metadata["input_scale"] == 1 / 16
    assert metadata["test_accuracy"] >= 0.9


def test_model_version_of_without_metadata_is_file_stem(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "custom-7.tflite"
    path.write_bytes(starter_model_path("fp32").read_bytes())

    # Execute / Assert
    assert model_version_of(path) == "custom-7"
    assert read_model_metadata(path) == {}


def test_batch_predict_matches_per_sample(model: TFLiteModel, data: DataSource) -> None:
    # Prepare
    batch = data.x[:50]

    # Execute
    together = model.predict(batch)
    one_by_one = np.concatenate([model.predict(batch[i : i + 1]) for i in range(len(batch))])
    again = model.predict(batch)

    # Assert
    assert together.shape == (50, 10)
    assert together.dtype == np.float32
    np.testing.assert_allclose(together, one_by_one, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(together, again)


def test_shipped_model_accuracy(model: TFLiteModel, data: DataSource) -> None:
    # Prepare
    assert data.y is not None

    # Execute
    predicted = model.predict(data.x).argmax(axis=1)

    # Assert
    assert float(np.mean(predicted == data.y)) >= 0.9


def test_predict_rejects_wrong_feature_shape(model: TFLiteModel) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=r"\(N>0, 64\)"):
        model.predict(np.zeros((2, 63), dtype=np.float32))
    with pytest.raises(ValueError):
        model.predict(np.zeros((0, 64), dtype=np.float32))


def test_int8_model_has_integer_io(int8_model: TFLiteModel) -> None:
    # Assert
    assert int8_model.input_dtype == np.int8
    assert int8_model.output_dtype == np.int8
    scale, _ = int8_model.input_quantization
    assert scale > 0
    assert int8_model.num_classes == 10


def test_int8_model_agrees_with_fp32(model: TFLiteModel, int8_model: TFLiteModel, data: DataSource) -> None:
    # Execute
    fp32_scores = model.predict(data.x)
    int8_scores = int8_model.predict(data.x)

    # Assert: dequantized to float scores on the logit scale, and the same classes almost everywhere
    assert int8_scores.dtype == np.float32
    assert float(np.mean(int8_scores.argmax(axis=1) == fp32_scores.argmax(axis=1))) >= 0.95
    output_scale, _ = int8_model.output_quantization
    assert float(np.median(np.abs(int8_scores - fp32_scores))) < 4 * output_scale


def test_shipped_models_on_tflite_runtime(tflite_python: str) -> None:
    # Prepare: the starter models and data in the device-like environment, as a Raspberry Pi 4 runs them
    code = """
        import json
        import numpy as np
        from agent.runtime import DataSource, TFLiteModel, declared_contract, starter_model_path
        data, out = DataSource(), {}
        for variant in ("fp32", "int8"):
            path = starter_model_path(variant)
            model = TFLiteModel.load(path, runtime="tflite-runtime", preprocessing=declared_contract(path))
            scores = model.predict(data.x)
            out[variant] = {"runtime": [model.runtime_name, model.runtime_version], "dtype": model.input_dtype.name,
                            "classes": scores.argmax(axis=1).tolist()}
        out["labels"] = data.y.tolist()
        print(json.dumps(out))
        """

    # Execute
    result = subprocess.run([tflite_python, "-c", textwrap.dedent(code)], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=60, check=False)

    # Assert: the same accuracy as on LiteRT (test_shipped_model_accuracy), and int8 agreeing with fp32
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    labels = np.asarray(out["labels"])
    fp32, int8 = np.asarray(out["fp32"]["classes"]), np.asarray(out["int8"]["classes"])
    assert out["fp32"]["runtime"] == out["int8"]["runtime"] == ["tflite-runtime", "2.14.0"]
    assert (out["fp32"]["dtype"], out["int8"]["dtype"]) == ("float32", "int8")
    assert float(np.mean(fp32 == labels)) >= 0.9
    assert float(np.mean(int8 == labels)) >= 0.9
    assert float(np.mean(int8 == fp32)) >= 0.95


def test_int8_model_quantizes_float_input_like_the_tensor_params(
    data: DataSource,
) -> None:
    # Prepare: without an input contract the model takes model input (raw / 16); quantize it by hand with the
    # input tensor's (scale, zero_point)
    int8_model = TFLiteModel.load(starter_model_path("int8"))
    model_input = data.x[:100] / 16
    scale, zero_point = int8_model.input_quantization
    quantized = np.clip(np.round(model_input / scale) + zero_point, -128, 127).astype(np.int8)

    # Execute
    from_float = int8_model.predict(model_input)
    from_int8 = int8_model.predict(quantized)

    # Assert
    np.testing.assert_array_equal(from_float, from_int8)


def test_corrupt_file_raises_model_load_error(tmp_path: Path) -> None:
    # Prepare
    garbage = tmp_path / "garbage.tflite"
    garbage.write_bytes(b"this is not a flatbuffer at all" * 10)

    # Execute
    with pytest.raises(ModelLoadError) as caught:
        TFLiteModel.load(garbage)

    # Assert
    assert str(garbage) in str(caught.value)
    assert caught.value.path == str(garbage)
    assert "not a TFLite model" in caught.value.reason


@pytest.mark.skipif(
    DEFAULT_IN_USE == "tflite-runtime", reason="tflite-runtime 2.14 does not verify models: it segfaults"
)
def test_truncated_model_raises_model_load_error(tmp_path: Path) -> None:
    # Prepare: a real model cut short keeps the TFLite file identifier but not the rest (and has no metadata)
    truncated = tmp_path / "truncated.tflite"
    truncated.write_bytes(starter_model_path("fp32").read_bytes()[:600])

    # Execute
    with pytest.raises(ModelLoadError) as caught:
        TFLiteModel.load(truncated)

    # Assert
    assert str(truncated) in str(caught.value)
    assert caught.value.reason


def test_truncated_model_with_metadata_fails_checksum(tmp_path: Path) -> None:
    # Prepare: a partial download next to the model's metadata; caught before any runtime parses it
    source = starter_model_path("fp32")
    truncated = tmp_path / source.name
    truncated.write_bytes(source.read_bytes()[:600])
    (tmp_path / source.with_suffix(".json").name).write_bytes(source.with_suffix(".json").read_bytes())

    # Execute
    with pytest.raises(ModelLoadError, match="does not match its metadata") as caught:
        TFLiteModel.load(truncated)

    # Assert
    assert caught.value.path == str(truncated)


def test_explicit_checksum_is_checked() -> None:
    # Prepare
    path = starter_model_path("fp32")

    # Execute / Assert
    with pytest.raises(ModelLoadError, match="does not match the given checksum"):
        TFLiteModel.load(path, sha256="0" * 64)
    assert TFLiteModel.load(path, sha256=read_model_metadata(path)["sha256"]).num_classes == 10


def test_missing_file_raises_model_load_error(tmp_path: Path) -> None:
    # Prepare
    missing = tmp_path / "missing.tflite"

    # Execute
    with pytest.raises(ModelLoadError, match="no such file") as caught:
        TFLiteModel.load(missing)

    # Assert
    assert caught.value.path == str(missing)


# ------------------------------------------------------------------------------------------ input contract


def test_preprocessor_standardises_each_feature_in_float32() -> None:
    # Prepare: features on wildly different scales, as tabular data has them
    rng = np.random.default_rng(0)
    raw = rng.normal([5.0, 3000.0, 0.01], [1.0, 500.0, 0.002], size=(40, 3))
    mean, std = raw.mean(axis=0), raw.std(axis=0)
    contract = InputContract(scale=(1 / std).tolist(), offset=(-mean / std).tolist(), shape=[3])

    # Execute
    out = Preprocessor(contract, (3,))(raw)

    # Assert
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, (raw - mean) / std, atol=1e-4)
    np.testing.assert_allclose(out.mean(axis=0), 0.0, atol=1e-4)


@pytest.mark.parametrize(("contract", "message"), [
    (InputContract(scale=[1.0], shape=[63]), r"contract is for samples of shape \[63\], the model takes \[64\]"),
    (InputContract(scale=[1.0] * 3, shape=[64]), r"scale has 3 values; needs 1 or one per feature \(64\)"),
    (InputContract(scale=[1.0], offset=[float("nan")]), "offset holds a non-finite value"),
    (InputContract(scale=[1.0], dtype="int8"), "must be a float type"),
    (InputContract(scale=[1.0], dtype="nonsense"), "unknown input dtype"),
])
def test_a_contract_that_does_not_fit_the_model_refuses_to_load(contract: InputContract, message: str) -> None:
    # Execute / Assert
    with pytest.raises(ModelLoadError, match=message):
        TFLiteModel.load(starter_model_path("fp32"), preprocessing=contract)


def test_declared_contract_of_the_starter_installed_and_undeclared_models(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: an installed model beside the signed release it came with, and a bare model file
    import msgspec

    from agent.manifest import Golden, ModelManifest, ModelSource, Release, SignedRelease

    installed = tmp_path / "v2-fp32"
    installed.mkdir()
    (installed / "model.tflite").write_bytes(starter_model_path("fp32").read_bytes())
    declared = InputContract(scale=[0.5] * 64, offset=[-1.0] * 64, shape=[64])
    artifact = ModelManifest(model_version="v2", task="digits", variant="fp32", file_name="model.tflite",
                             sha256="0" * 64, size_bytes=1, runtimes={}, source=ModelSource("round", "1"),
                             preprocessing=declared, golden=Golden([[0.0] * 64], [[0.0] * 10], 1.0))
    release = Release(release=1, model_version="v2", variant="fp32", task="digits", device_classes=[],
                      deployment_id=1, issued_at=0, expires_at=1, artifact=artifact)
    (installed / "manifest.json").write_bytes(msgspec.json.encode(SignedRelease(release, "sig", "key")))
    bare = tmp_path / "mine.tflite"
    bare.write_bytes(starter_model_path("fp32").read_bytes())

    # Execute
    starter = declared_contract(starter_model_path("fp32"))
    from_release = declared_contract(installed / "model.tflite")
    with caplog.at_level(logging.WARNING, logger="agent.runtime"):
        legacy = declared_contract(bare)

    # Assert
    assert (starter.scale, starter.offset, starter.shape, starter.dtype) == ([1 / 16], [0.0], [64], "float32")
    assert from_release == declared
    assert legacy.scale == [1 / 16] and legacy.source.startswith("legacy")
    assert "declares no input contract" in caplog.text


def test_the_inference_loop_feeds_raw_samples_through_the_models_own_contract(
    data: DataSource, loops: list[InferenceLoop]
) -> None:
    # Prepare: the same model file under its declared contract and under a wrong one (inverted pixels; a ReLU
    # MLP without biases in the way barely notices a plain rescaling such as raw pixels unscaled)
    path = starter_model_path("fp32")
    right = TFLiteModel.load(path, preprocessing=declared_contract(path))
    wrong = TFLiteModel.load(path, preprocessing=InputContract(scale=[-1 / 16], offset=[1.0]))
    loop = InferenceLoop(right, data, model_version="right", rate_hz=1000.0)
    loops.append(loop)

    # Execute: the loop swaps models, and with them their preprocessing
    loop.start()
    wait = time.monotonic() + 10
    while loop.stats.count < 300 and time.monotonic() < wait:
        time.sleep(0.05)
    with_right = loop.snapshot()
    loop.swap_model(wrong, "wrong")
    loop.snapshot()  # drop what ran across the swap
    wait = time.monotonic() + 10
    while loop.stats.count < 300 and time.monotonic() < wait:
        time.sleep(0.05)
    with_wrong = loop.snapshot()

    # Assert
    assert with_right.labelled >= 300 and with_right.correct / with_right.labelled >= 0.95
    assert with_wrong.labelled >= 300 and with_wrong.correct / with_wrong.labelled < 0.8


# ---------------------------------------------------------------------------------------------------- data


def test_shipped_data_is_raw_float(data: DataSource) -> None:
    # Assert: raw pixels 0..16; the model's input contract scales them, never the data source
    assert len(data) == 1797
    assert data.x.shape == (1797, 64)
    assert data.x.dtype == np.float32
    assert float(data.x.min()) == 0.0
    assert float(data.x.max()) == 16.0
    assert data.y is not None
    assert sorted(set(data.y.tolist())) == list(range(10))


def test_next_batch_cycles(data: DataSource) -> None:
    # Execute
    head = data.next_batch(1795)
    wrapped = data.next_batch(4)
    after = data.next_batch(1)

    # Assert
    np.testing.assert_array_equal(head, data.x[:1795])
    np.testing.assert_array_equal(wrapped, data.x[[1795, 1796, 0, 1]])
    np.testing.assert_array_equal(after, data.x[2:3])


def test_data_source_from_file_without_labels(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "mine.npz"
    np.savez(path, x=np.full((3, 64), 8, dtype=np.uint8))

    # Execute
    source = DataSource(path)

    # Assert
    assert source.y is None
    assert len(source) == 3
    np.testing.assert_array_equal(source.next_batch(2), np.full((2, 64), 8.0, dtype=np.float32))


def test_bad_data_file_raises_data_source_error(tmp_path: Path) -> None:
    # Prepare
    no_x = tmp_path / "no_x.npz"
    np.savez(no_x, y=np.arange(3))
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip")

    # Execute / Assert
    with pytest.raises(DataSourceError, match="no 'x' array"):
        DataSource(no_x)
    with pytest.raises(DataSourceError, match="garbage.npz"):
        DataSource(garbage)
    with pytest.raises(DataSourceError):
        DataSource(tmp_path / "missing.npz")


# --------------------------------------------------------------------------------------------------- stats


def test_stats_snapshot_and_reset() -> None:
    # Prepare
    stats = InferenceStats()
    stats.record(0.001, np.array([[0.0, 5.0, 0.0]], dtype=np.float32))
    stats.record(0.003, np.array([[0.0, 0.0, 0.0]], dtype=np.float32))
    stats.record(0.002, np.array([[0.0, 9.0, 0.0], [7.0, 0.0, 0.0]], dtype=np.float32))
    stats.record_error()

    # Execute
    first = stats.snapshot_and_reset("v1")
    second = stats.snapshot_and_reset("v1")

    # Assert
    assert isinstance(first, protocol.InferenceStats)
    assert first.model_version == "v1"
    assert first.count == 4
    assert first.errors == 1
    assert first.class_histogram == {"0": 2, "1": 2}
    assert first.latency_p50_ms == pytest.approx(2.0)
    assert first.latency_p95_ms == pytest.approx(2.9)
    expected_confidence = (
        1 / (1 + 2 * np.exp(-5)) + 1 / 3 + 1 / (1 + 2 * np.exp(-9)) + 1 / (1 + 2 * np.exp(-7))
    ) / 4
    assert first.mean_confidence == pytest.approx(expected_confidence, abs=1e-4)
    assert protocol.decode(protocol.encode(first), protocol.InferenceStats) == first
    assert second == protocol.InferenceStats(model_version="v1", count=0)


def test_stats_accepts_probabilities() -> None:
    # Prepare
    stats = InferenceStats()

    # Execute
    stats.record(0.001, np.array([0.1, 0.7, 0.2], dtype=np.float32))
    snapshot = stats.snapshot_and_reset(None)

    # Assert
    assert snapshot.mean_confidence == pytest.approx(0.7)
    assert snapshot.class_histogram == {"1": 1}


def test_stats_thread_safe() -> None:
    # Prepare
    stats = InferenceStats()
    scores = np.eye(10, dtype=np.float32)[3:4] * 10

    def work() -> None:
        for _ in range(500):
            stats.record(0.0001, scores)

    threads = [threading.Thread(target=work) for _ in range(4)]

    # Execute
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    snapshot = stats.snapshot_and_reset("v")

    # Assert
    assert snapshot.count == 2000
    assert snapshot.class_histogram == {"3": 2000}


# ---------------------------------------------------------------------------------------------------- loop


def test_inference_loop_runs_and_reports(
    model: TFLiteModel, data: DataSource, loops: list[InferenceLoop]
) -> None:
    # Prepare
    loop = InferenceLoop(model, data, model_version="starter-digits-1", rate_hz=500.0)
    loops.append(loop)

    # Execute
    loop.start()
    time.sleep(0.5)
    snapshot = loop.stats.snapshot_and_reset(loop.model_version)

    # Assert
    assert snapshot.model_version == "starter-digits-1"
    assert snapshot.count > 0
    assert snapshot.errors == 0
    assert snapshot.latency_p50_ms is not None and snapshot.latency_p95_ms is not None
    assert 0 < snapshot.latency_p50_ms <= snapshot.latency_p95_ms
    assert sum(snapshot.class_histogram.values()) == snapshot.count
    assert snapshot.mean_confidence is not None and 0.1 <= snapshot.mean_confidence <= 1.0
    assert loop.is_alive()


def test_swap_model_while_running(
    model: TFLiteModel, int8_model: TFLiteModel, data: DataSource, loops: list[InferenceLoop]
) -> None:
    # Prepare
    loop = InferenceLoop(model, data, model_version="fp32", rate_hz=500.0)
    loops.append(loop)
    loop.start()
    time.sleep(0.1)

    # Execute
    previous = loop.swap_model(int8_model, "int8")
    loop.snapshot()
    time.sleep(0.2)
    after = loop.snapshot()

    # Assert
    assert previous == (model, "fp32")
    assert loop.model is int8_model
    assert after.model_version == "int8"
    assert after.count > 0
    assert after.errors == 0


def test_loop_counts_errors_and_keeps_running(
    model: TFLiteModel, tmp_path: Path, loops: list[InferenceLoop]
) -> None:
    # Prepare: samples of the wrong width make every predict raise
    path = tmp_path / "wide.npz"
    np.savez(path, x=np.zeros((4, 65), dtype=np.uint8))
    loop = InferenceLoop(model, DataSource(path), rate_hz=500.0)
    loops.append(loop)

    # Execute
    loop.start()
    time.sleep(0.2)
    snapshot = loop.snapshot()

    # Assert
    assert snapshot.errors > 0
    assert snapshot.count == 0
    assert loop.is_alive()


def test_stop_returns_promptly_while_waiting(
    model: TFLiteModel, data: DataSource, loops: list[InferenceLoop]
) -> None:
    # Prepare: one sample every 30 s, so the loop is inside its wait
    loop = InferenceLoop(model, data, rate_hz=1 / 30)
    loops.append(loop)
    loop.start()
    time.sleep(0.05)

    # Execute
    started = time.monotonic()
    loop.stop()
    elapsed = time.monotonic() - started

    # Assert
    assert elapsed < 1.0
    assert not loop.is_alive()


def test_set_rate_pauses_and_resumes(
    model: TFLiteModel, data: DataSource, loops: list[InferenceLoop]
) -> None:
    # Prepare
    loop = InferenceLoop(model, data, rate_hz=0.0)
    loops.append(loop)
    loop.start()
    time.sleep(0.1)
    paused = loop.snapshot()

    # Execute
    loop.set_rate(500.0)
    time.sleep(0.2)
    resumed = loop.snapshot()

    # Assert
    assert paused.count == 0
    assert resumed.count > 0
    with pytest.raises(ValueError):
        loop.set_rate(-1.0)
