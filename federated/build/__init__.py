"""Model build: trained weights -> TFLite variants per device class, evaluated with the TFLite runtime, gated, signed.

``build_variants(task, state_dict, variants=..., out_dir=..., model_version=..., source=..., signer=...)``
converts with litert-torch and ai-edge-quantizer (fp32, fp16, dynamic-int8, full-int8), evaluates each variant on
the task's held-out set through ``agent.runtime.TFLiteModel``, rejects variants more than one accuracy point
below fp32, and writes ``<model_version>-<variant>.tflite`` with a signed ``.manifest.json`` for each published
one. Needs the ``build`` extra (torch, litert-torch); importing this package does not import them.
"""

from federated.build._build import (
    ALL_VARIANTS,
    DEFAULT_MAX_ACCURACY_DROP,
    DEFAULT_RUNTIME_MINIMUMS,
    BuildError,
    BuildResult,
    ManifestSigner,
    VariantArtifact,
    build_variants,
    golden_tolerance,
)
from federated.build._convert import (
    CALIBRATION_BATCH,
    convert_fp32,
    quantize_dynamic_int8,
    quantize_fp16,
    quantize_full_int8,
)

__all__ = [
    "ALL_VARIANTS",
    "CALIBRATION_BATCH",
    "DEFAULT_MAX_ACCURACY_DROP",
    "DEFAULT_RUNTIME_MINIMUMS",
    "BuildError",
    "BuildResult",
    "ManifestSigner",
    "VariantArtifact",
    "build_variants",
    "convert_fp32",
    "golden_tolerance",
    "quantize_dynamic_int8",
    "quantize_fp16",
    "quantize_full_int8",
]
