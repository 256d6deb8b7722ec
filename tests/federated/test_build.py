"""federated.build.build_variants: real conversion (litert-torch, ai-edge-quantizer), real LiteRT evaluation.

One session-scoped build of a trained digits model serves most tests; the gate tests build their own.
The golden self-tests are also replayed on tflite-runtime 2.14, in the device-like environment ``make test`` builds
(the ``tflite_python`` fixture).
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import shutil
import subprocess
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from agent.manifest import (
    Golden,
    InputContract,
    ManifestError,
    ModelManifest,
    ModelSource,
    SignedManifest,
    decode_signed,
    verify_artifact,
    verify_signature,
)
from agent.runtime import TFLiteModel
from federated.build import ALL_VARIANTS, BuildError, BuildResult, build_variants
from federated.signing import Signer
from federated.tasks.digits import DigitsTask
from firmware_profiles import ModelVariant, RuntimeName, variant_unsupported

REPO_ROOT = Path(__file__).resolve().parents[2]
_NEEDED = ("torch", "sklearn", "litert_torch", "ai_edge_quantizer", "ai_edge_litert", "cryptography")
_MISSING = [m for m in _NEEDED if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(
    bool(_MISSING), reason=f"needs the build extra ({', '.join(_MISSING)} missing)"
)

VERSION = "digits-7"
SOURCE = ModelSource(kind="round", id="round-7")


@dataclass(frozen=True)
class Built:
    task: DigitsTask
    state_dict: dict[str, Any]
    signer: Signer
    result: BuildResult
    out_dir: Path


@pytest.fixture(name="task", scope="session")
def fx_task() -> DigitsTask:
    return DigitsTask()


@pytest.fixture(name="trained", scope="session")
def fx_trained(task: DigitsTask) -> dict[str, Any]:
    model = task.model()
    task.train(model, task.train_pool(), epochs=20, lr=1e-2, batch_size=64)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(name="built", scope="session")
def fx_built(task: DigitsTask, trained: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Built:
    root = tmp_path_factory.mktemp("build")
    signer = Signer(root / "keys")
    result = build_variants(
        task,
        trained,
        variants=ALL_VARIANTS,
        out_dir=root / "models",
        model_version=VERSION,
        source=SOURCE,
        signer=signer,
    )
    return Built(task, trained, signer, result, root / "models")


def _load_signed(path: Path | None) -> SignedManifest:
    assert path is not None
    return decode_signed(path.read_bytes())


# ------------------------------------------------------------------------------------------------ the build


@pytest.mark.slow
def test_all_four_variants_are_published(built: Built) -> None:
    # Assert
    result = built.result
    assert [a.variant for a in result.artifacts] == list(ALL_VARIANTS)
    assert result.rejected == ()
    expected = {
        f"{VERSION}-{v.value}.{suffix}" for v in ALL_VARIANTS for suffix in ("tflite", "manifest.json")
    }
    assert {p.name for p in built.out_dir.iterdir()} == expected  # no staging directory left behind
    for artifact in result.published:
        assert artifact.path == built.out_dir / f"{VERSION}-{artifact.variant.value}.tflite"
        assert artifact.size_bytes == artifact.path.stat().st_size
        assert artifact.reason is None
        assert artifact.evaluated_with.startswith("ai-edge-litert ")
        assert artifact.batch_resizable is True
    assert result.timings["total"] >= result.timings["convert_fp32"] > 0
    assert json.loads(json.dumps(result.to_dict()))["artifacts"][0]["variant"] == "fp32"


@pytest.mark.slow
def test_each_variant_runs_in_litert_within_the_gate(built: Built) -> None:
    # Prepare
    heldout = built.task.heldout()
    x = heldout.x  # raw: the model applies its manifest's input contract, as on a device

    for artifact in built.result.published:
        assert artifact.path is not None
        contract = _load_signed(artifact.manifest_path).manifest.input_contract()

        # Execute
        model = TFLiteModel.load(artifact.path, runtime="ai-edge-litert", preprocessing=contract)
        accuracy = float(np.mean(model.predict(x).argmax(axis=1) == heldout.y))

        # Assert
        assert model.runtime_name == "ai-edge-litert"
        assert model.input_shape == (1, 64)
        assert accuracy == pytest.approx(artifact.accuracy, abs=1e-9)
        assert artifact.accuracy_drop is not None and artifact.accuracy_drop <= 0.01
        quantised_io = artifact.variant is ModelVariant.FULL_INT8
        assert model.input_dtype == (np.int8 if quantised_io else np.float32)
        assert model.output_dtype == (np.int8 if quantised_io else np.float32)
    assert built.result.reference_accuracy > 0.93


@pytest.mark.slow
def test_quantised_variants_are_smaller(built: Built) -> None:
    # Prepare
    size = {a.variant: a.size_bytes for a in built.result.artifacts}

    # Assert
    assert size[ModelVariant.FP16] < 0.7 * size[ModelVariant.FP32]
    assert size[ModelVariant.DYNAMIC_INT8] < size[ModelVariant.FP16]
    assert size[ModelVariant.FULL_INT8] < size[ModelVariant.FP16]


@pytest.mark.slow
def test_manifests_verify_and_describe_their_artifacts(built: Built) -> None:
    for artifact in built.result.published:
        # Execute
        manifest = verify_signature(_load_signed(artifact.manifest_path), built.signer.public_key_raw)
        assert artifact.path is not None
        verify_artifact(manifest, artifact.path)

        # Assert
        assert artifact.signed is not None and artifact.signed.manifest == manifest
        assert manifest.model_version == VERSION
        assert manifest.task == "digits"
        assert manifest.variant == artifact.variant.value
        assert manifest.file_name == artifact.path.name
        assert manifest.size_bytes == artifact.size_bytes
        assert manifest.source == SOURCE
        assert manifest.input_scale == 1 / 16
        assert manifest.schema_version == 2
        assert manifest.preprocessing == InputContract(scale=[1 / 16], offset=[0.0], shape=[64], dtype="float32",
                                                       source="declared: x * input_scale")
        assert set(manifest.metrics) == {"accuracy", "loss"}
        assert manifest.metrics["accuracy"] == pytest.approx(artifact.accuracy, abs=1e-6)
        assert datetime.datetime.fromisoformat(manifest.created_at).tzinfo is not None


@pytest.mark.slow
def test_runtimes_exclude_what_variant_unsupported_rules_out(built: Built) -> None:
    for artifact in built.result.published:
        # Execute
        runtimes = _load_signed(artifact.manifest_path).manifest.runtimes

        # Assert
        if artifact.variant is ModelVariant.DYNAMIC_INT8:
            assert runtimes == {"ai-edge-litert": "2.3.0"}
            assert variant_unsupported(RuntimeName.TFLITE_RUNTIME, "2.14.0", artifact.variant)
        else:
            assert runtimes == {"ai-edge-litert": "2.3.0", "tflite-runtime": "2.14.0"}


@pytest.mark.slow
def test_golden_self_test_passes_through_predict(built: Built) -> None:
    tolerance: dict[ModelVariant, float] = {}
    for artifact in built.result.published:
        # Prepare
        manifest = _load_signed(artifact.manifest_path).manifest
        assert artifact.path is not None
        model = TFLiteModel.load(artifact.path, sha256=manifest.sha256, preprocessing=manifest.input_contract())
        inputs = np.asarray(manifest.raw_golden().input, dtype=np.float32)
        expected = np.asarray(manifest.golden.output, dtype=np.float32)

        # Execute: as one batch, and one sample at a time
        batch = model.predict(inputs)
        single = np.concatenate([model.predict(inputs[i : i + 1]) for i in range(len(inputs))])

        # Assert
        assert 2 <= len(inputs) <= 4
        assert inputs.shape[1:] == (64,) and expected.shape == (len(inputs), 10)
        assert np.abs(batch - expected).max() <= manifest.golden.tolerance
        assert np.abs(single - expected).max() <= manifest.golden.tolerance
        # The golden inputs are RAW held-out samples (pixels 0..16), not made-up or preprocessed values.
        assert np.array_equal(inputs, np.round(inputs)) and inputs.max() <= 16 and inputs.max() > 1
        tolerance[artifact.variant] = manifest.golden.tolerance
    assert tolerance[ModelVariant.FP32] <= 1e-3
    assert all(
        tolerance[v] > tolerance[ModelVariant.FP32] for v in ALL_VARIANTS if v is not ModelVariant.FP32
    )


@pytest.mark.slow
def test_golden_catches_a_model_that_gives_other_answers(built: Built) -> None:
    # Prepare: the fp32 golden test replayed on another (still valid) model of the same task
    fp32 = _load_signed(built.result.artifact("fp32").manifest_path).manifest
    other_path = built.result.artifact("full-int8").path
    assert other_path is not None
    other = TFLiteModel.load(other_path, preprocessing=fp32.input_contract())

    # Execute
    got = other.predict(np.asarray(fp32.golden.input, dtype=np.float32))

    # Assert
    assert np.abs(got - np.asarray(fp32.golden.output, dtype=np.float32)).max() > fp32.golden.tolerance


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["fp32", "full-int8"])
def test_self_test_runs_the_raw_golden_through_the_contract_and_fails_on_a_wrong_one(
    built: Built, variant: str
) -> None:
    # Prepare: the agent's self-test, on the model under its manifest's contract and under others
    from agent.runtime import SelfTestFailed, self_test

    manifest = _load_signed(built.result.artifact(variant).manifest_path).manifest
    path = built.result.artifact(variant).path
    assert path is not None
    wrong = [
        InputContract(scale=[1.0]),  # what a device fed before: raw pixels, unscaled
        InputContract(scale=[1 / 16], offset=[-0.5]),  # centred: a plausible, wrong standardisation
    ]

    # Execute / Assert
    assert self_test(TFLiteModel.load(path, preprocessing=manifest.input_contract()), manifest.raw_golden())
    for contract in wrong:
        with pytest.raises(SelfTestFailed, match="self-test failed"):
            self_test(TFLiteModel.load(path, preprocessing=contract), manifest.raw_golden())


@pytest.mark.slow
def test_a_schema_1_manifest_keeps_its_declared_input_scale(built: Built) -> None:
    # Prepare: the manifest as builds wrote it before the contract: no preprocessing, golden as model input
    from agent.runtime import self_test

    manifest = _load_signed(built.result.artifact("fp32").manifest_path).manifest
    golden = manifest.golden
    old = msgspec.structs.replace(manifest, schema_version=1, preprocessing=None, golden=Golden(
        input=(np.asarray(golden.input) / 16).tolist(), output=golden.output, tolerance=golden.tolerance))
    old = msgspec.json.decode(msgspec.json.encode(old), type=ModelManifest)  # decodes: defaults
    path = built.result.artifact("fp32").path
    assert path is not None

    # Execute
    contract = old.input_contract()
    figures = self_test(TFLiteModel.load(path, preprocessing=contract), old.raw_golden())

    # Assert
    assert contract.scale == [1 / 16] and contract.offset == [0.0]
    assert np.array_equal(np.asarray(old.raw_golden().input), np.asarray(golden.input))
    assert figures["max_abs_diff"] <= golden.tolerance


@pytest.mark.slow
def test_tampered_artifact_fails_verify_artifact(built: Built, tmp_path: Path) -> None:
    # Prepare
    artifact = built.result.artifact("full-int8")
    assert artifact.path is not None
    manifest = _load_signed(artifact.manifest_path).manifest
    flipped = tmp_path / "flipped.tflite"
    data = bytearray(artifact.path.read_bytes())
    data[len(data) // 2] ^= 0x01
    flipped.write_bytes(bytes(data))
    truncated = tmp_path / "truncated.tflite"
    truncated.write_bytes(bytes(data[:-1]))

    # Execute / Assert
    with pytest.raises(ManifestError, match="sha256"):
        verify_artifact(manifest, flipped)
    with pytest.raises(ManifestError, match="bytes, manifest says"):
        verify_artifact(manifest, truncated)


@pytest.mark.slow
def test_manifest_signed_by_another_key_fails(built: Built, tmp_path: Path) -> None:
    # Prepare
    manifest = _load_signed(built.result.artifact("fp32").manifest_path).manifest
    forged = Signer(tmp_path / "intruder").sign(manifest)

    # Execute / Assert
    with pytest.raises(ManifestError):
        verify_signature(forged, built.signer.public_key_raw)
    with pytest.raises(ManifestError, match="bad signature"):
        verify_signature(
            SignedManifest(manifest=manifest, signature=forged.signature, key_id=built.signer.key_id),
            built.signer.public_key_raw,
        )


@pytest.mark.slow
def test_golden_self_tests_on_tflite_runtime(built: Built, tflite_python: str) -> None:
    # Prepare: every artifact (also those tflite-runtime is not allowed to run) replayed in that interpreter
    script = textwrap.dedent(
        """
        import json, sys
        from pathlib import Path
        import numpy as np
        from agent.manifest import decode_signed
        from agent.runtime import TFLiteModel
        out = {}
        for name in sys.argv[1:]:
            manifest = decode_signed(Path(name).read_bytes()).manifest
            model = TFLiteModel.load(Path(name).parent / manifest.file_name, runtime="tflite-runtime",
                                     preprocessing=manifest.input_contract())
            got = model.predict(np.asarray(manifest.golden.input, dtype=np.float32))
            worst = float(np.abs(got - np.asarray(manifest.golden.output, dtype=np.float32)).max())
            out[manifest.variant] = [model.runtime_name, model.runtime_version, worst, manifest.golden.tolerance]
        print(json.dumps(out))
        """
    )
    manifests = [str(a.manifest_path) for a in built.result.published]

    # Execute
    run = subprocess.run(
        [tflite_python, "-c", script, *manifests],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    # Assert
    assert run.returncode == 0, run.stderr
    results = json.loads(run.stdout.strip().splitlines()[-1])
    for artifact in built.result.published:
        runtime, version, worst, tolerance = results[artifact.variant.value]
        assert (runtime, version) == ("tflite-runtime", "2.14.0")
        if "tflite-runtime" in _load_signed(artifact.manifest_path).manifest.runtimes:
            assert worst <= tolerance, artifact.variant
        else:  # dynamic-int8: silently wrong on tflite-runtime 2.14, which is why it is not allowed there
            assert worst > tolerance, artifact.variant


class _ConvDigitsTask(DigitsTask):
    """A user-style task: a small CNN on the 8x8 image, which litert-torch converts for batch 1 only."""

    name = "conv-digits"

    def model(self) -> Any:
        import torch
        from torch import nn

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return nn.Sequential(
                nn.Unflatten(1, (1, 8, 8)),
                nn.Conv2d(1, 8, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Flatten(),
                nn.Linear(8 * 4 * 4, 10),
            )


@pytest.mark.slow
def test_model_fixed_at_batch_1_is_evaluated_per_sample(tmp_path: Path) -> None:
    # Prepare
    task = _ConvDigitsTask()
    model = task.model()
    task.train(model, task.train_pool(), epochs=4, lr=1e-2, batch_size=64)

    # Execute
    result = build_variants(
        task,
        model.state_dict(),
        variants=["fp32", "full-int8"],
        out_dir=tmp_path / "models",
        model_version="conv-1",
        source=SOURCE,
        signer=Signer(tmp_path / "keys"),
    )

    # Assert
    assert [a.variant for a in result.published] == [ModelVariant.FP32, ModelVariant.FULL_INT8]
    assert result.reference_accuracy > 0.85
    for artifact in result.published:
        assert artifact.batch_resizable is False
        manifest = _load_signed(artifact.manifest_path).manifest
        assert artifact.path is not None
        loaded = TFLiteModel.load(artifact.path, preprocessing=manifest.input_contract())
        assert len(manifest.golden.input) == 1  # a device predicts the golden input as one batch
        got = loaded.predict(np.asarray(manifest.golden.input, dtype=np.float32))
        assert (
            np.abs(got - np.asarray(manifest.golden.output, dtype=np.float32)).max()
            <= manifest.golden.tolerance
        )


# --------------------------------------------------------------------------------------------------- the gate


@pytest.mark.slow
def test_int8_variants_that_lose_accuracy_are_rejected(
    task: DigitsTask, trained: dict[str, Any], tmp_path: Path
) -> None:
    # Prepare: hidden unit 0 always fires at ~2000 but feeds nothing: the float models ignore it, while the
    # int8 activation range of the hidden layer stretches to 2000 and crushes every other unit's resolution.
    weights = {k: v.clone() for k, v in trained.items()}
    weights["0.bias"][0] = 2000.0
    weights["2.weight"][:, 0] = 0.0
    out_dir = tmp_path / "models"
    out_dir.mkdir()
    for stale in ("bad-full-int8.tflite", "bad-full-int8.manifest.json"):  # an earlier build of this version
        (out_dir / stale).write_text("stale")

    # Execute
    result = build_variants(
        task, weights, out_dir=out_dir, model_version="bad", source=SOURCE, signer=Signer(tmp_path / "keys")
    )

    # Assert
    assert [a.variant for a in result.published] == [ModelVariant.FP32, ModelVariant.FP16]
    assert {a.variant for a in result.rejected} == {ModelVariant.DYNAMIC_INT8, ModelVariant.FULL_INT8}
    for rejected in result.rejected:
        assert rejected.reason is not None and "below fp32's" in rejected.reason
        assert rejected.accuracy_drop is not None and rejected.accuracy_drop > 0.01
        assert rejected.path is None and rejected.manifest_path is None and rejected.signed is None
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        f"bad-{v}.{s}" for v in ("fp32", "fp16") for s in ("tflite", "manifest.json")
    )


@pytest.mark.slow
def test_negative_gate_rejects_quantised_variants_with_a_reason(
    task: DigitsTask, trained: dict[str, Any], tmp_path: Path
) -> None:
    # Execute
    result = build_variants(
        task,
        trained,
        variants=["fp16"],
        out_dir=tmp_path / "models",
        model_version="strict",
        source=SOURCE,
        signer=Signer(tmp_path / "keys"),
        max_accuracy_drop=-0.01,
    )

    # Assert: fp32 is the reference only (not requested), fp16 cannot be 0.01 *better* than fp32
    (fp16,) = result.artifacts
    assert fp16.variant is ModelVariant.FP16 and not fp16.published
    assert fp16.reason is not None and "gate: at most -0.0100 below" in fp16.reason
    assert list((tmp_path / "models").iterdir()) == []


# -------------------------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    ("change", "kwargs", "message"),
    [
        ("drop-key", {}, "do not fit"),
        ("nan", {}, "non-finite"),
        (None, {"model_version": "../escape"}, "model_version"),
        (None, {"variants": ["int4"]}, "unknown variant 'int4'"),
        (None, {"variants": []}, "no variants"),
        (None, {"runtime_minimums": {"tflite-micro-x": "1"}}, "unknown runtime"),
    ],
)
@pytest.mark.slow
def test_bad_inputs_raise_build_error_before_converting(
    task: DigitsTask,
    trained: dict[str, Any],
    tmp_path: Path,
    change: str | None,
    kwargs: dict[str, Any],
    message: str,
) -> None:
    # Prepare
    weights = {k: v.clone() for k, v in trained.items()}
    if change == "drop-key":
        del weights["2.bias"]
    elif change == "nan":
        weights["0.weight"][3, 3] = float("nan")
    arguments: dict[str, Any] = {
        "out_dir": tmp_path / "models",
        "model_version": "v1",
        "source": SOURCE,
        "signer": Signer(tmp_path / "keys"),
        **kwargs,
    }

    # Execute / Assert
    with pytest.raises(BuildError, match=message):
        build_variants(task, weights, **arguments)
    assert not (tmp_path / "keys").exists()  # nothing was signed
    shutil.rmtree(tmp_path / "models", ignore_errors=True)
