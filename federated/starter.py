"""Build the starter model that ships with the agent: a tiny MLP on scikit-learn's handwritten digits.

Run it in an environment with the ``train`` extra plus ``litert-torch`` and ``scikit-learn`` (never on a device)::

    python -m federated.starter --out-dir agent/models --data-out agent/data/digits.npz

It writes

* ``starter-digits-fp32.tflite``: float32 input ``[1, 64]`` (pixels / 16), float32 logits ``[1, 10]``;
* ``starter-digits-int8.tflite``: full-integer (static int8 weights and activations, int8 input and output,
  calibrated on the training split in batches of 64); the host quantizes inputs and dequantizes outputs with the
  tensors' (scale, zero_point);
* one ``.json`` metadata file per model (version, variant, input scale, sha256, size, test accuracy);
* the data set itself as ``digits.npz`` (``x``: uint8 0..16, shape (1797, 64); ``y``: int64 labels), which the
  agent's inference loop runs over.

Both models are converted at batch 1 (litert-torch has no dynamic batch dimension); the runtime resizes the input
tensor for other batch sizes. Training is seeded and takes well under a second on a CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

__all__ = ["INPUT_SCALE", "MODEL_VERSION", "NUM_CLASSES", "NUM_FEATURES", "main"]

MODEL_VERSION: Final = "starter-digits-1"
INPUT_SCALE: Final = 1.0 / 16.0  # load_digits pixels are integers 0..16
NUM_FEATURES: Final = 64
NUM_CLASSES: Final = 10
HIDDEN: Final = 64
TEST_SIZE: Final = 0.2
CALIBRATION_BATCH: Final = 64
MIN_ACCURACY: Final = 0.9

_FloatArray = npt.NDArray[np.float32]
_IntArray = npt.NDArray[np.int64]


def _load_digits() -> tuple[npt.NDArray[np.uint8], _IntArray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.asarray(bunch.data)
    if x.min() < 0 or x.max() > 16 or not np.array_equal(x, np.round(x)):
        raise RuntimeError("unexpected pixel values in scikit-learn's digits data set")
    return x.astype(np.uint8), np.asarray(bunch.target, dtype=np.int64)


def _split(y: _IntArray, seed: int) -> tuple[_IntArray, _IntArray]:
    """Indices of a fixed, stratified 80/20 train/test split."""
    from sklearn.model_selection import train_test_split

    train_idx, test_idx = train_test_split(
        np.arange(len(y)), test_size=TEST_SIZE, stratify=y, random_state=seed, shuffle=True
    )
    return np.sort(train_idx).astype(np.int64), np.sort(test_idx).astype(np.int64)


def _train(x: _FloatArray, y: _IntArray, *, seed: int, epochs: int) -> tuple[Any, float]:
    """The trained model (in eval mode) and the training time in seconds."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(NUM_FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, NUM_CLASSES))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(xs), generator=generator)
        for start in range(0, len(xs), 64):
            batch = order[start : start + 64]
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(xs[batch]), ys[batch])
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
    return model.eval(), time.perf_counter() - started


def _torch_accuracy(model: Any, x: _FloatArray, y: _IntArray) -> float:
    import torch

    with torch.no_grad():
        predicted = model(torch.from_numpy(x)).argmax(dim=1).numpy()
    return float(np.mean(predicted == y))


def _convert_fp32(model: Any, path: Path) -> None:
    import litert_torch
    import torch

    edge_model = litert_torch.convert(model, (torch.zeros(1, NUM_FEATURES),))
    edge_model.export(str(path))


def _convert_int8(model: Any, calibration: _FloatArray, path: Path) -> None:
    """Full-integer PT2E quantization: int8 weights (per channel) and activations, int8 model I/O."""
    import litert_torch
    import torch
    from litert_torch.quantize import pt2e_quantizer
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e import move_exported_model_to_eval, quantize_pt2e

    quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
        pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False)
    )
    # Capture with a dynamic batch dimension so that calibration can run in batches; the converter then
    # specializes the graph to batch 1 like the fp32 model.
    batch = torch.export.Dim("batch", min=1, max=4096)
    sample = torch.zeros(CALIBRATION_BATCH, NUM_FEATURES)
    captured = torch.export.export(model, (sample,), dynamic_shapes=({0: batch},)).module()
    prepared = quantize_pt2e.prepare_pt2e(captured, quantizer)
    with torch.no_grad():
        for start in range(0, len(calibration), CALIBRATION_BATCH):
            prepared(torch.from_numpy(calibration[start : start + CALIBRATION_BATCH]))
    quantized = move_exported_model_to_eval(quantize_pt2e.convert_pt2e(prepared, fold_quantize=False))
    # move_exported_model_to_eval switches the graph's special ops (dropout, batch norm) but leaves the
    # ``training`` flags alone, which makes the converter warn about a model "in training mode".
    for module in quantized.modules():
        module.training = False
    edge_model = litert_torch.convert(
        quantized, (torch.zeros(1, NUM_FEATURES),), quant_config=QuantConfig(pt2e_quantizer=quantizer)
    )
    edge_model.export(str(path))


def _tflite_scores(path: Path, x: _FloatArray) -> _FloatArray:
    """Run a converted model over a whole batch (resizing its batch-1 input), quantizing int I/O."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path), num_threads=1)
    (inp,) = interpreter.get_input_details()
    (out,) = interpreter.get_output_details()
    interpreter.resize_tensor_input(inp["index"], [len(x), NUM_FEATURES])
    interpreter.allocate_tensors()
    feed: npt.NDArray[Any] = x
    if np.issubdtype(inp["dtype"], np.integer):
        scale, zero_point = inp["quantization"]
        info = np.iinfo(inp["dtype"])
        feed = np.clip(np.round(x / scale) + zero_point, info.min, info.max).astype(inp["dtype"])
    interpreter.set_tensor(inp["index"], feed)
    interpreter.invoke()
    scores = interpreter.get_tensor(out["index"])
    if np.issubdtype(out["dtype"], np.integer):
        scale, zero_point = out["quantization"]
        scores = (np.asarray(scores, dtype=np.float32) - np.float32(zero_point)) * np.float32(scale)
    return np.asarray(scores, dtype=np.float32)


def _describe_io(path: Path) -> dict[str, Any]:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    (inp,) = interpreter.get_input_details()
    (out,) = interpreter.get_output_details()

    def one(detail: dict[str, Any]) -> dict[str, Any]:
        scale, zero_point = detail["quantization"]
        entry: dict[str, Any] = {
            "shape": [int(d) for d in detail["shape"]],
            "dtype": np.dtype(detail["dtype"]).name,
        }
        if scale:
            entry["quantization"] = {"scale": float(scale), "zero_point": int(zero_point)}
        return entry

    return {"input": one(inp), "output": one(out)}


def _write_metadata(path: Path, *, variant: str, accuracy: float, extra: dict[str, Any]) -> dict[str, Any]:
    data = path.read_bytes()
    metadata: dict[str, Any] = {
        "model_version": MODEL_VERSION,
        "variant": variant,
        "input_scale": INPUT_SCALE,
        # The model's input contract (agent.manifest.InputContract): the agent applies it to raw samples.
        "preprocessing": {"scale": [INPUT_SCALE], "offset": [0.0], "shape": [NUM_FEATURES], "dtype": "float32",
                          "source": "declared"},
        "num_classes": NUM_CLASSES,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size_bytes": len(data),
        "test_accuracy": round(accuracy, 4),
        **extra,
    }
    path.with_suffix(".json").write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    return metadata


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m federated.starter", description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", type=Path, default=Path("agent/models"), help="where the models go")
    parser.add_argument(
        "--data-out", type=Path, default=Path("agent/data/digits.npz"), help="where the data set goes"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--no-int8", action="store_true", help="skip the full-integer variant")
    args = parser.parse_args(argv)

    x_raw, y = _load_digits()
    x = (x_raw.astype(np.float32) * np.float32(INPUT_SCALE)).astype(np.float32)
    train_idx, test_idx = _split(y, args.seed)

    model, train_s = _train(x[train_idx], y[train_idx], seed=args.seed, epochs=args.epochs)
    torch_accuracy = _torch_accuracy(model, x[test_idx], y[test_idx])
    print(
        f"trained in {train_s * 1000:.0f} ms; torch test accuracy {torch_accuracy:.4f} ({len(test_idx)} samples)"
    )

    args.out_dir.mkdir(parents=True, exist_ok=True)
    args.data_out.parent.mkdir(parents=True, exist_ok=True)
    split = {"test_size": TEST_SIZE, "stratified": True, "seed": args.seed}

    variants: list[tuple[str, Path]] = [("fp32", args.out_dir / "starter-digits-fp32.tflite")]
    _convert_fp32(model, variants[0][1])
    if not args.no_int8:
        variants.append(("full-int8", args.out_dir / "starter-digits-int8.tflite"))
        _convert_int8(model, x[train_idx], variants[1][1])

    failed = False
    reference: npt.NDArray[np.int64] | None = None
    for variant, path in variants:
        predicted = _tflite_scores(path, x).argmax(axis=1)
        accuracy = float(np.mean(predicted[test_idx] == y[test_idx]))
        extra: dict[str, Any] = {"io": _describe_io(path), "split": split}
        agreement = ""
        if reference is None:
            reference = predicted
        else:
            extra["agreement_with_fp32"] = round(float(np.mean(predicted == reference)), 4)
            agreement = f", agrees with fp32 on {extra['agreement_with_fp32']:.4f} of all samples"
        metadata = _write_metadata(path, variant=variant, accuracy=accuracy, extra=extra)
        print(f"{path}: {metadata['size_bytes']} bytes, TFLite test accuracy {accuracy:.4f}{agreement}")
        failed |= accuracy < MIN_ACCURACY

    np.savez_compressed(args.data_out, x=x_raw, y=y)
    print(f"{args.data_out}: x {x_raw.shape} {x_raw.dtype}, y {y.shape} {y.dtype}")
    if failed:
        print(f"error: a model is below the minimum test accuracy {MIN_ACCURACY}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
