"""Inference: each TFLite variant against torch fp32 eager and ONNX Runtime, on the same model and data.

    python bench/inference.py [--model mlp,mlp-wide,cnn] [--runs 1000] [--batch 64] [--batch-runs 200]
                              [--epochs N] [--json bench/results/inference.json]

For each model (trained first, centrally, on the digits task's training pool; evaluated on its held-out set):

* engines: torch fp32 eager (``torch.no_grad``), ONNX Runtime fp32 (``torch.onnx.export``, CPU provider; reported
  as unavailable if onnxruntime is missing or the export fails), and the four TFLite variants that
  ``federated.build`` produces (fp32, fp16, dynamic-int8, full-int8), run with ai-edge-litert;
* latency: one sample (batch 1), one thread everywhere, median over ``--runs`` timed calls, taken in blocks of
  200 alternating between engines (the machine is shared: drift hits every engine alike). Timed: set input,
  run, read output; inputs are prepared beforehand (already int8 for full-int8). ``predict`` is the same through
  ``agent.runtime.TFLiteModel.predict``, quantisation by the host included (what the agent pays);
* throughput: batch ``--batch`` (``resize_tensor_input`` for TFLite), samples/s from the median batch time;
* size: the artifact (TFLite flatbuffer, ONNX file, ``torch.save`` of the state dict);
* accuracy: held-out, through each engine.

Models: ``mlp`` is the shipped digits MLP (64-64-10, ~4.8k parameters: flatbuffer overhead dominates its size);
``mlp-wide`` 64-512-512-10 (~300k); ``cnn`` two 3x3 convolutions (32, 64 channels) on the 8x8 image, max-pool,
1024-128-10 (~151k).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from _common import ROOT

os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "0")
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", message=r".*experimental_preserve_all_tensors.*")

from federated.build import (
    convert_fp32,
    quantize_dynamic_int8,
    quantize_fp16,
    quantize_full_int8,
)
from federated.tasks.digits import DigitsTask

MODELS = ("mlp", "mlp-wide", "cnn")
VARIANTS = ("fp32", "fp16", "dynamic-int8", "full-int8")
BLOCK = 200
SPEED_TARGET = 4.0  # full-int8 vs torch eager, batch-1 latency
SIZE_TARGET = 3.5  # TFLite fp32 / full-int8
ACCURACY_TARGET = 0.01  # full-int8 within 1 point of fp32
DEFAULT_EPOCHS = {"mlp": 30, "mlp-wide": 15, "cnn": 15}


class BenchTask(DigitsTask):
    """The digits task with a choice of model (same data, split and preprocessing)."""

    def __init__(self, arch: str) -> None:
        super().__init__()
        self.arch = arch

    def model(self) -> Any:
        import torch
        from torch import nn

        if self.arch == "mlp":
            return super().model()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            if self.arch == "mlp-wide":
                return nn.Sequential(
                    nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
                )
            if self.arch == "cnn":
                return nn.Sequential(
                    nn.Unflatten(1, (1, 8, 8)),
                    nn.Conv2d(1, 32, 3, padding=1),
                    nn.ReLU(),
                    nn.Conv2d(32, 64, 3, padding=1),
                    nn.ReLU(),
                    nn.MaxPool2d(2),
                    nn.Flatten(),
                    nn.Linear(64 * 4 * 4, 128),
                    nn.ReLU(),
                    nn.Linear(128, 10),
                )
        raise ValueError(f"unknown model {self.arch!r} (known: {', '.join(MODELS)})")


# ----------------------------------------------------------------------------------------------------- engines


class Engine:
    """One way to run the model: ``call1`` runs the prepared batch-1 input, ``callb`` the prepared batch."""

    def __init__(
        self,
        name: str,
        size_bytes: int,
        call1: Callable[[], Any],
        callb: Callable[[], Any],
        scores: Callable[[np.ndarray], np.ndarray],
        predict1: Callable[[], Any] | None = None,
    ) -> None:
        self.name = name
        self.size_bytes = size_bytes
        self.call1 = call1
        self.callb = callb
        self.scores = scores
        self.predict1 = predict1
        self.times: dict[str, list[float]] = {"single": [], "batch": [], "predict": []}
        self.batch_via = "native"


def _torch_engine(model: Any, x1: np.ndarray, xb: np.ndarray) -> Engine:
    import torch

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    t1, tb = torch.from_numpy(x1), torch.from_numpy(xb)

    def run(t: Any) -> Any:
        with torch.no_grad():
            return model(t)

    def scores(x: np.ndarray) -> np.ndarray:
        return np.asarray(run(torch.from_numpy(x)).numpy(), dtype=np.float32)

    return Engine("torch fp32 eager", len(buffer.getvalue()), lambda: run(t1), lambda: run(tb), scores)


def _onnx_engine(model: Any, x1: np.ndarray, xb: np.ndarray, workdir: Path) -> Engine | str:
    """ONNX Runtime, or why it is unavailable."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return f"onnxruntime not installed ({exc})"
    import torch

    path = workdir / "model.onnx"
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            torch.onnx.export(
                model,
                (torch.from_numpy(x1),),
                str(path),
                dynamo=True,
                input_names=["x"],
                output_names=["logits"],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                external_data=False,
            )
    except (RuntimeError, ValueError, TypeError, ImportError, AssertionError) as exc:  # report, never fake
        return f"torch.onnx.export failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def scores(x: np.ndarray) -> np.ndarray:
        return np.asarray(session.run(None, {name: x})[0], dtype=np.float32)

    size = sum(p.stat().st_size for p in workdir.glob("model.onnx*"))
    return Engine(
        f"onnxruntime {ort.__version__} fp32",
        size,
        lambda: session.run(None, {name: x1}),
        lambda: session.run(None, {name: xb}),
        scores,
    )


def _resizable(data: bytes, batch: int) -> bool:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=data)
    detail = it.get_input_details()[0]
    try:
        it.resize_tensor_input(detail["index"], [batch, *detail["shape"][1:]])
        it.allocate_tensors()
    except RuntimeError:
        return False
    return True


def _tflite_engine(
    variant: str, path: Path, x1: np.ndarray, xb: np.ndarray, batch_path: Path | None
) -> Engine:
    """``batch_path``: the same variant converted at the batch size, for models that cannot be resized."""
    from ai_edge_litert.interpreter import Interpreter

    from agent.runtime import TFLiteModel

    def interpreter(model_path: Path, batch: np.ndarray) -> tuple[Any, Any, int, np.ndarray]:
        it = Interpreter(model_path=str(model_path), num_threads=1)
        inp, out = it.get_input_details()[0], it.get_output_details()[0]
        if tuple(inp["shape"]) != batch.shape:
            it.resize_tensor_input(inp["index"], list(batch.shape))
        it.allocate_tensors()
        feed = batch
        if np.dtype(inp["dtype"]).kind == "i":
            scale, zero_point = inp["quantization"]
            info = np.iinfo(inp["dtype"])
            feed = np.clip(np.round(batch / scale) + zero_point, info.min, info.max).astype(inp["dtype"])
        return it, inp["index"], out["index"], np.ascontiguousarray(feed)

    it1, in1, out1, feed1 = interpreter(path, x1)
    itb, inb, outb, feedb = interpreter(batch_path or path, xb)

    def call(it: Any, index: int, out: int, feed: np.ndarray) -> Any:
        it.set_tensor(index, feed)
        it.invoke()
        return it.get_tensor(out)

    agent_model = TFLiteModel.load(path, runtime="ai-edge-litert")
    evaluator = TFLiteModel.load(path, runtime="ai-edge-litert")  # its own interpreter: batch sizes change

    def scores(x: np.ndarray) -> np.ndarray:
        if batch_path is None:
            return evaluator.predict(x)
        return np.concatenate([evaluator.predict(x[i : i + 1]) for i in range(len(x))])

    engine = Engine(
        f"tflite {variant}",
        path.stat().st_size,
        lambda: call(it1, in1, out1, feed1),
        lambda: call(itb, inb, outb, feedb),
        scores,
        predict1=lambda: agent_model.predict(x1),
    )
    engine.batch_via = "resize_tensor_input" if batch_path is None else f"converted at batch {len(xb)}"
    return engine


# ------------------------------------------------------------------------------------------------- measuring


def _time(fn: Callable[[], Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter_ns()
        fn()
        out.append((time.perf_counter_ns() - started) / 1e3)
    return out


def _measure(engines: list[Engine], runs: int, batch_runs: int) -> None:
    for engine in engines:  # warm-up: first calls allocate, page in, pick kernels
        _time(engine.call1, 50)
        _time(engine.callb, 10)
        if engine.predict1:
            _time(engine.predict1, 50)
    blocks = max(1, math.ceil(runs / BLOCK))
    batch_block = max(1, math.ceil(batch_runs / blocks))
    for _ in range(blocks):
        for engine in engines:
            engine.times["single"] += _time(engine.call1, BLOCK)
            engine.times["batch"] += _time(engine.callb, batch_block)
            if engine.predict1:
                engine.times["predict"] += _time(engine.predict1, BLOCK)


def bench_model(arch: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    task = BenchTask(arch)
    heldout = task.heldout()
    x = heldout.model_input(task.input_scale)
    y = heldout.y

    model = task.model()
    params = sum(p.numel() for p in model.parameters())
    epochs = args.epochs or DEFAULT_EPOCHS[arch]
    started = time.perf_counter()
    task.train(model, task.train_pool(), epochs=epochs, lr=1e-3 if arch != "mlp" else 1e-2, batch_size=64)
    train_s = time.perf_counter() - started
    model.eval()
    print(f"[{arch}] {params} parameters, trained {epochs} epochs in {train_s:.1f} s", flush=True)

    x1 = np.ascontiguousarray(x[:1])
    xb = np.ascontiguousarray(np.resize(x, (args.batch, *x.shape[1:])))
    with tempfile.TemporaryDirectory(prefix=f"bench-inference-{arch}-") as tmp:
        workdir = Path(tmp)
        convert_s: dict[str, float] = {}
        started = time.perf_counter()
        fp32 = convert_fp32(model, task.sample_input())
        convert_s["fp32"] = time.perf_counter() - started

        def producers(fp32: bytes) -> dict[str, Callable[[], bytes]]:
            return {
                "fp32": lambda: fp32,
                "fp16": lambda: quantize_fp16(fp32),
                "dynamic-int8": lambda: quantize_dynamic_int8(fp32),
                "full-int8": lambda: quantize_full_int8(fp32, task.calibration_data(640)),
            }

        # litert-torch bakes batch 1 into the RESHAPE ops of some models (the CNN): those cannot be resized, so
        # their batch figures come from the same variants converted at the batch size (and labelled so).
        fixed_batch = not _resizable(fp32, args.batch)
        batch_producers = None
        if fixed_batch:
            import litert_torch

            fp32_batch = bytes(litert_torch.convert(model, (torch.from_numpy(xb),)).model_content())
            batch_producers = producers(fp32_batch)
        engines: list[Engine] = [_torch_engine(model, x1, xb)]
        onnx = _onnx_engine(model, x1, xb, workdir)
        onnx_unavailable = onnx if isinstance(onnx, str) else None
        if isinstance(onnx, Engine):
            engines.append(onnx)
        for variant in VARIANTS:
            started = time.perf_counter()
            data = producers(fp32)[variant]()
            if variant != "fp32":
                convert_s[variant] = time.perf_counter() - started
            path = workdir / f"{arch}-{variant}.tflite"
            path.write_bytes(data)
            batch_path = None
            if batch_producers is not None:
                batch_path = workdir / f"{arch}-{variant}-batch{args.batch}.tflite"
                batch_path.write_bytes(batch_producers[variant]())
            engines.append(_tflite_engine(variant, path, x1, xb, batch_path))
        print(f"[{arch}] converted: " + ", ".join(f"{k} {v:.2f} s" for k, v in convert_s.items()), flush=True)

        _measure(engines, args.runs, args.batch_runs)
        rows = []
        for engine in engines:
            single = statistics.median(engine.times["single"])
            batch = statistics.median(engine.times["batch"])
            rows.append(
                {
                    "engine": engine.name,
                    "size_bytes": engine.size_bytes,
                    "latency_us_median": round(single, 2),
                    "latency_us_p90": round(float(np.percentile(engine.times["single"], 90)), 2),
                    "latency_runs": len(engine.times["single"]),
                    "predict_us_median": (
                        round(statistics.median(engine.times["predict"]), 2)
                        if engine.times["predict"]
                        else None
                    ),
                    "batch": args.batch,
                    "batch_via": engine.batch_via,
                    "batch_us_median": round(batch, 2),
                    "batch_runs": len(engine.times["batch"]),
                    "throughput_per_s": round(args.batch / batch * 1e6, 1),
                    "accuracy": round(float(np.mean(engine.scores(x).argmax(axis=1) == y)), 4),
                }
            )

    by_name = {r["engine"]: r for r in rows}
    torch_row, fp32_row, int8_row = (
        by_name["torch fp32 eager"],
        by_name["tflite fp32"],
        by_name["tflite full-int8"],
    )
    ratios = {
        "int8_speedup_vs_torch_eager": round(
            torch_row["latency_us_median"] / int8_row["latency_us_median"], 2
        ),
        "int8_batch_throughput_vs_torch_eager": round(
            int8_row["throughput_per_s"] / torch_row["throughput_per_s"], 2
        ),
        "size_fp32_over_int8": round(fp32_row["size_bytes"] / int8_row["size_bytes"], 2),
        "accuracy_delta_int8_minus_fp32": round(int8_row["accuracy"] - fp32_row["accuracy"], 4),
    }
    targets = {
        "int8_speedup_vs_torch_eager": ratios["int8_speedup_vs_torch_eager"] >= SPEED_TARGET,
        "size_fp32_over_int8": ratios["size_fp32_over_int8"] >= SIZE_TARGET,
        "accuracy_within_1_point": abs(ratios["accuracy_delta_int8_minus_fp32"]) <= ACCURACY_TARGET,
    }
    return {
        "model": arch,
        "parameters": params,
        "epochs": epochs,
        "train_s": round(train_s, 2),
        "convert_s": {k: round(v, 2) for k, v in convert_s.items()},
        "heldout_samples": len(y),
        "batch_1_only_after_conversion": fixed_batch,
        "onnxruntime_unavailable": onnx_unavailable,
        "engines": rows,
        "ratios": ratios,
        "targets_met": targets,
    }


def print_table(result: dict[str, Any]) -> None:
    header = (
        f"{'engine':<26} | {'size KB':>8} | {'batch-1 µs':>10} | {'p90 µs':>8} | {'predict() µs':>12} | "
        f"{'batch-' + str(result['engines'][0]['batch']) + ' /s':>11} | {'accuracy':>8}"
    )
    print(
        f"\n{result['model']} ({result['parameters']} parameters, held-out {result['heldout_samples']} samples)"
    )
    print(header)
    print("-" * len(header))
    for r in result["engines"]:
        predict = f"{r['predict_us_median']:.1f}" if r["predict_us_median"] is not None else "-"
        print(
            f"{r['engine']:<26} | {r['size_bytes'] / 1024:>8.1f} | {r['latency_us_median']:>10.1f} | "
            f"{r['latency_us_p90']:>8.1f} | {predict:>12} | {r['throughput_per_s']:>11.0f} | {r['accuracy']:>8.4f}"
        )
    if result["batch_1_only_after_conversion"]:
        print(
            f"(the TFLite conversion of {result['model']} runs at batch 1 only: its batch figures are for the same "
            "variants converted at that batch size)"
        )
    if result["onnxruntime_unavailable"]:
        print(f"onnxruntime: unavailable: {result['onnxruntime_unavailable']}")
    ratios, met = result["ratios"], result["targets_met"]
    print(
        f"full-int8 vs torch eager: {ratios['int8_speedup_vs_torch_eager']:.2f}x faster at batch 1 "
        f"(target >= {SPEED_TARGET}x: {'met' if met['int8_speedup_vs_torch_eager'] else 'MISSED'}), "
        f"{ratios['int8_batch_throughput_vs_torch_eager']:.2f}x the batch throughput"
    )
    print(
        f"size fp32 / full-int8: {ratios['size_fp32_over_int8']:.2f}x "
        f"(target >= {SIZE_TARGET}x: {'met' if met['size_fp32_over_int8'] else 'MISSED'}); "
        f"accuracy full-int8 - fp32: {ratios['accuracy_delta_int8_minus_fp32']:+.4f} "
        f"(target within {ACCURACY_TARGET}: {'met' if met['accuracy_within_1_point'] else 'MISSED'})"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=",".join(MODELS), help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--runs", type=int, default=1000, help="timed batch-1 calls per engine (>= 1000)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batch-runs", type=int, default=200, help="timed batch calls per engine")
    parser.add_argument("--epochs", type=int, default=0, help="training epochs (default: per model)")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "inference.json")
    args = parser.parse_args()
    models = [m.strip() for m in args.model.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")

    import torch

    from agent.runtime import load_interpreter_class

    results = [bench_model(m, args) for m in models]
    for result in results:
        print_table(result)
    try:
        import onnxruntime

        ort_version: str | None = onnxruntime.__version__
    except ImportError:
        ort_version = None
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "machine": {
                    "python": platform.python_version(),
                    "platform": platform.platform(),
                    "cpus": os.cpu_count(),
                    "torch": torch.__version__,
                    "ai_edge_litert": load_interpreter_class("ai-edge-litert").version,
                    "onnxruntime": ort_version,
                },
                "settings": {
                    "runs": args.runs,
                    "batch": args.batch,
                    "batch_runs": args.batch_runs,
                    "threads": 1,
                },
                "models": {r["model"]: r for r in results},
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
