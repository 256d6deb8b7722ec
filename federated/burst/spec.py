"""What a burst job is (:class:`JobSpec`) and what it will cost (:func:`estimate_cost`).

The control plane writes a :class:`JobSpec` as JSON, the Ray job's entrypoint
(``python -m federated.burst.worker --spec spec.json --out-dir DIR``) reads it back. The placement policy calls
:func:`estimate_cost` to compare a job with the profiles' training RAM budgets before deciding where it runs.

Importing this module is cheap (msgspec only); :func:`estimate_cost` imports torch to build the task's model.
"""

from __future__ import annotations

import enum
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal

import msgspec

if TYPE_CHECKING:
    from federated.tasks import Task

__all__ = [
    "RUNTIME_OVERHEAD_MB",
    "JobKind",
    "JobSpec",
    "estimate_cost",
    "load_spec",
    "teacher_parameters",
]


class JobKind(enum.StrEnum):
    """What a burst job does; declared here once (the control plane's API schema and CLI use this enum)."""

    FINETUNE = "finetune"
    DISTILL = "distill"
    QAT = "qat"


class WorkerOutcome(enum.StrEnum):
    """How a burst worker run ended (``result.json``'s ``status``; the control plane maps it to its JobStatus)."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"


DeviceChoice = Literal["auto", "cpu", "cuda"]

# Resident memory of a Python process that has imported torch (CPU build) and scikit-learn and created an
# optimiser, before any data or model (measured: ~363 MiB, torch 2.13.0+cpu, Python 3.11, x86-64).
RUNTIME_OVERHEAD_MB: Final = 370.0
_BYTES_PER_PARAM_TRAINING: Final = 16  # fp32 weight + gradient + Adam's two moments
_ACTIVATION_COPIES: Final = 3  # forward output kept for backward, its gradient, a transient (autocast/ReLU mask)


class JobSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """One burst training job.

    ``base_weights`` is an ``.npz`` of the task model's state dict (``{name: array}``, as the control plane
    stores a build's weights); None starts from ``task.model()``'s seeded initial weights. ``time_budget_s`` is
    counted over all attempts of the job (a resumed job continues its clock). ``teacher_hidden``,
    ``temperature`` and ``distill_alpha`` matter for ``kind="distill"`` only: the loss is
    ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(labels)``.
    """

    job_id: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
    kind: JobKind
    task: str = "digits"
    base_weights: str | None = None
    epochs: Annotated[int, msgspec.Meta(ge=1)] = 30
    lr: Annotated[float, msgspec.Meta(gt=0)] = 1e-2
    batch_size: Annotated[int, msgspec.Meta(ge=1)] = 64
    time_budget_s: Annotated[float, msgspec.Meta(gt=0)] = 3600.0
    seed: int = 0
    checkpoint_every_steps: Annotated[int, msgspec.Meta(ge=1)] = 100
    device: DeviceChoice = "auto"
    teacher_hidden: Annotated[int, msgspec.Meta(ge=1)] = 512
    temperature: Annotated[float, msgspec.Meta(gt=0)] = 4.0
    distill_alpha: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.7

    def to_json(self) -> bytes:
        return msgspec.json.encode(self)

    @classmethod
    def from_json(cls, data: bytes | str) -> JobSpec:
        """Decode and validate; raises :class:`msgspec.ValidationError` on a bad spec."""
        return msgspec.json.decode(data, type=cls)


def load_spec(path: str | Path) -> JobSpec:
    return JobSpec.from_json(Path(path).read_bytes())


def teacher_parameters(input_features: int, hidden: int, num_classes: int) -> int:
    """Parameters of the distillation teacher: ``in -> hidden -> hidden -> classes`` MLP."""
    return input_features * hidden + hidden + hidden * hidden + hidden + hidden * num_classes + num_classes


def _per_sample_activations(model: Any, sample: Any) -> int:
    """Floats every leaf module outputs for one sample (what backward keeps alive per sample)."""
    import torch

    total = 0

    def hook(_module: Any, _inputs: Any, output: Any) -> None:
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += int(output[0].numel())

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(torch.as_tensor(sample))
    finally:
        for handle in handles:
            handle.remove()
    return total


def estimate_cost(task: Task | str, spec: JobSpec) -> dict[str, Any]:
    """Rough cost of ``spec`` on ``task`` (a task or its name), for placement.

    Returns ``parameters`` (the edge model's; ``teacher_parameters`` too for distill), ``samples`` (training
    pool), ``epochs``, ``steps``, ``flops`` (``6 x params x samples x epochs`` for each model trained, plus one
    teacher forward pass over the pool for distill) and ``memory_mb``: the training working set (fp32 weights,
    gradients and Adam moments; activations of one batch; the pool as float32 model input; the teacher and its
    soft targets) plus :data:`RUNTIME_OVERHEAD_MB` for the Python/torch process itself, with the parts in
    ``memory_breakdown_mb``. A placement decision needs no more than the order of magnitude.
    """
    from federated.tasks import get_task

    resolved = get_task(task) if isinstance(task, str) else task
    pool = resolved.train_pool()  # type: ignore[attr-defined]  # ArrayClassificationTask, not the Protocol
    samples = len(pool)
    model = resolved.model()
    params = sum(int(p.numel()) for p in model.parameters())
    features = math.prod(resolved.input_shape)
    activations = _per_sample_activations(model, resolved.sample_input())
    flops = 6 * params * samples * spec.epochs
    steps_per_epoch = math.ceil(samples / spec.batch_size)
    steps = steps_per_epoch * spec.epochs
    teacher = 0
    extra_bytes = 0
    if spec.kind == JobKind.DISTILL:
        teacher = teacher_parameters(features, spec.teacher_hidden, resolved.num_classes)
        flops += 6 * teacher * samples * spec.epochs + 2 * teacher * samples
        steps *= 2  # the teacher's epochs, then the student's
        teacher_activations = 2 * spec.teacher_hidden + resolved.num_classes
        extra_bytes += teacher * _BYTES_PER_PARAM_TRAINING
        extra_bytes += spec.batch_size * teacher_activations * 4 * _ACTIVATION_COPIES
        extra_bytes += samples * resolved.num_classes * 4  # the teacher's logits over the pool
    elif spec.kind == JobKind.QAT:
        extra_bytes += params * 4  # the fake-quantised copy of every weight
    mib = 1024.0 * 1024.0
    breakdown = {
        "parameters_and_optimizer": params * _BYTES_PER_PARAM_TRAINING / mib,
        "activations": spec.batch_size * activations * 4 * _ACTIVATION_COPIES / mib,
        "data": samples * (features * 4 + 8) / mib,
        "kind_extra": extra_bytes / mib,
        "runtime": RUNTIME_OVERHEAD_MB,
    }
    result: dict[str, Any] = {
        "task": resolved.name,
        "kind": spec.kind,
        "parameters": params,
        "samples": samples,
        "epochs": spec.epochs,
        "steps": steps,
        "flops": flops,
        "memory_mb": round(sum(breakdown.values()), 2),
        "memory_breakdown_mb": {k: round(v, 3) for k, v in breakdown.items()},
    }
    if spec.kind == JobKind.DISTILL:
        result["teacher_parameters"] = teacher
    return result
