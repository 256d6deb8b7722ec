"""PyTorch -> TFLite conversion (litert-torch) and post-training quantisation (ai-edge-quantizer).

Every variant starts from the float32 flatbuffer that litert-torch produces at batch 1 (it has no dynamic batch
dimension; runtimes resize the input tensor). ai-edge-quantizer (AEQ) then rewrites that flatbuffer:

* ``fp16``: weight-only float casting (``FLOAT_CASTING``, 16 bits): float16 weights, dequantised to float32 at
  load, float32 compute and I/O;
* ``dynamic-int8``: dynamic range (``dynamic_wi8_afp32``): per-channel int8 weights, float activations that the
  kernels quantise on the fly, float32 I/O. tflite-runtime 2.14 gives wrong answers on these without an error;
* ``full-int8``: static (``static_wi8_ai8``): per-channel int8 weights, int8 activations calibrated on batches,
  int8 input and output tensors (the host quantises / dequantises with the tensors' scale and zero point).

AEQ min/max calibration keeps a moving range, so it is fed batches (64 samples), never single samples
(single-sample calibration clips the ranges).
"""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import torch

__all__ = [
    "CALIBRATION_BATCH",
    "convert_fp32",
    "quantize_dynamic_int8",
    "quantize_fp16",
    "quantize_full_int8",
]

CALIBRATION_BATCH: Final = 64


def _quiet_litert_torch() -> None:
    # litert-torch prints a progress tree for every conversion unless told otherwise (read at each call).
    os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "0")


def convert_fp32(model: torch.nn.Module, sample_input: npt.NDArray[np.float32]) -> bytes:
    """The float32 TFLite flatbuffer of ``model`` (put in eval mode) for an input like ``sample_input``."""
    _quiet_litert_torch()
    import litert_torch
    import torch

    if sample_input.shape[0] != 1:
        raise ValueError(f"convert at batch 1: sample_input has shape {sample_input.shape}")
    model.eval()
    sample = torch.from_numpy(np.ascontiguousarray(sample_input, dtype=np.float32))
    with warnings.catch_warnings():
        # torch.export inside litert-torch 0.10 uses a pytree API torch 2.13 deprecates: noise, not our call.
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
        edge_model = litert_torch.convert(model, (sample,))
    return bytes(edge_model.model_content())


def _quantize(fp32: bytes, recipe: Any, calibration_result: Any = None) -> bytes:
    from ai_edge_quantizer import quantizer  # type: ignore[import-untyped]

    qt = quantizer.Quantizer(bytearray(fp32), recipe)
    result = qt.quantize(calibration_result, enable_progress_report=False)
    if result.quantized_model is None:
        raise RuntimeError("ai-edge-quantizer returned no model")
    return bytes(result.quantized_model)


def quantize_fp16(fp32: bytes) -> bytes:
    """Float16 weights (weight-only float casting), float32 compute and I/O."""
    from ai_edge_quantizer import algorithm_manager, qtyping, recipe_manager

    manager = recipe_manager.RecipeManager()
    manager.add_weight_only_config(
        regex=".*",
        operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
        num_bits=16,
        algorithm_key=algorithm_manager.AlgorithmName.FLOAT_CASTING,
    )
    return _quantize(fp32, manager.get_quantization_recipe())


def quantize_dynamic_int8(fp32: bytes) -> bytes:
    """Dynamic range: per-channel int8 weights, float activations quantised at run time, float32 I/O."""
    from ai_edge_quantizer import recipe

    return _quantize(fp32, recipe.dynamic_wi8_afp32())


def quantize_full_int8(
    fp32: bytes, calibration: npt.NDArray[np.float32], *, batch_size: int = CALIBRATION_BATCH
) -> bytes:
    """Full integer: int8 weights and activations, int8 I/O; activations calibrated on ``calibration``.

    ``calibration`` is ``(n, *features)`` float32 model input; it is fed in batches of ``batch_size`` (AEQ's
    default moving-average min/max over batches). A float model that cannot be resized (litert-torch bakes batch
    1 into the RESHAPE ops of some models) is calibrated one sample at a time with the global min/max instead:
    a moving average over single samples would clip the ranges.
    """
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_quantizer import calibrator, quantizer, recipe, recipe_manager

    if calibration.ndim < 2 or calibration.shape[0] == 0:
        raise ValueError(f"calibration data must be a non-empty batch, got shape {calibration.shape}")
    interpreter = Interpreter(model_content=fp32)
    signatures = interpreter.get_signature_list()
    if len(signatures) != 1:
        raise ValueError(f"expected one signature in the float model, found {sorted(signatures)}")
    ((signature, io),) = signatures.items()
    if len(io["inputs"]) != 1:
        raise ValueError(f"expected one model input, found {io['inputs']}")
    input_name = io["inputs"][0]
    data = np.ascontiguousarray(calibration, dtype=np.float32)
    static_recipe = recipe.static_wi8_ai8()
    qt = quantizer.Quantizer(bytearray(fp32), static_recipe)
    with warnings.catch_warnings():
        # AEQ's calibrator keeps every intermediate tensor on purpose (that is how it records min/max).
        warnings.filterwarnings(
            "ignore", message=r".*experimental_preserve_all_tensors.*", category=UserWarning
        )
        if _resizable(interpreter, batch_size):
            batches = [{input_name: data[i : i + batch_size]} for i in range(0, len(data), batch_size)]
            calibration_result = qt.calibrate({signature: batches}, num_threads=1)
        else:
            manager = recipe_manager.RecipeManager()
            manager.load_quantization_recipe(static_recipe)
            calib = calibrator.Calibrator(bytearray(fp32), num_threads=1, qsv_update_func=_widen)
            for i in range(len(data)):  # one call per sample: AEQ shows a progress bar for long calls
                calib.calibrate({signature: [{input_name: data[i : i + 1]}]}, manager)
            calibration_result = calib.get_model_qsvs()
        result = qt.quantize(calibration_result, enable_progress_report=False)
    if result.quantized_model is None:
        raise RuntimeError("ai-edge-quantizer returned no model")
    return bytes(result.quantized_model)


def _resizable(interpreter: Any, batch_size: int) -> bool:
    """Whether a batch-1 model runs at ``batch_size`` (resize_tensor_input + allocate_tensors)."""
    detail = interpreter.get_input_details()[0]
    try:
        interpreter.resize_tensor_input(detail["index"], [batch_size, *detail["shape"][1:]])
        interpreter.allocate_tensors()
    except RuntimeError:
        return False
    return True


def _widen(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Global min/max across calibration steps (AEQ's default is a moving average)."""
    if not old:
        return new
    return {"min": np.minimum(old["min"], new["min"]), "max": np.maximum(old["max"], new["max"])}
