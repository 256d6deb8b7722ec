"""``edgefleet tasks check NAME``: everything a fleet would do with a task, on this machine, without a fleet.

A data scientist bringing a task wants to know before the first nightly round whether it will work on the devices.
:func:`check_task` runs, in order, the steps a round and a rollout take, and stops at the first that cannot go on:

1. **load**: the task resolves by name through this process's registry (built-ins, ``edgefleet.tasks`` entry
   points, ``EDGEFLEET_TASKS``) and has the :class:`~federated.tasks.Task` members;
2. **contract**: its input contract (:func:`~federated.tasks.input_contract_of`) is valid for ``input_shape``;
3. **data**: the held-out set and the devices' pool are non-empty, of ``input_shape``, with labels in
   ``0..num_classes-1``; every class is in the held-out set; ``sample_input``/``calibration_data`` have the shape
   the converter needs;
4. **partition**: the pool splits into device partitions that survive the partition file round trip a device reads;
5. **train**: the task's own ``train`` on its whole pool (centrally, what a round of federated averaging
   approximates), then ``evaluate`` on the held-out set: the accuracy must beat always-the-majority-class by
   more than chance (three standard errors on the held-out set);
6. **build**: conversion to every TFLite variant, quantisation, evaluation through the TFLite runtime the devices
   use, the accuracy gate and signing (with a throw-away key), exactly as the control plane builds a round's
   model: at least one variant must pass the gate.

The report lists each step with its verdict and figures (and each variant with its size, accuracy and gate
verdict); ``ok`` is true when every step passed. Needs the ``train`` and ``build`` extras (torch, litert-torch).
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.manifest import ModelSource
from federated.tasks import Task, TaskNotFound, TaskRegistry, input_contract_of

__all__ = ["CheckStep", "TaskCheck", "check_task"]

DEFAULT_EPOCHS = 10


@dataclass
class CheckStep:
    name: str
    ok: bool
    detail: str
    figures: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class TaskCheck:
    task: str
    steps: list[CheckStep] = field(default_factory=list)
    variants: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.steps) and all(step.ok for step in self.steps) and self.steps[-1].name == "build"

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "ok": self.ok,
                "steps": [{"name": s.name, "ok": s.ok, "detail": s.detail, "figures": s.figures,
                           "seconds": round(s.seconds, 3)} for s in self.steps],
                "variants": self.variants}


class _Failed(Exception):
    def __init__(self, detail: str, figures: dict[str, Any] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.figures = figures or {}


def _check_dataset(task: Task, what: str, x: Any, y: Any) -> dict[str, Any]:
    x, y = np.asarray(x), np.asarray(y)
    if len(x) == 0:
        raise _Failed(f"{what} is empty")
    if len(x) != len(y):
        raise _Failed(f"{what}: {len(x)} samples but {len(y)} labels")
    if tuple(x.shape[1:]) != tuple(task.input_shape):
        raise _Failed(f"{what}: samples of shape {tuple(x.shape[1:])}, the task declares input_shape "
                      f"{tuple(task.input_shape)}")
    if not np.issubdtype(y.dtype, np.integer):
        raise _Failed(f"{what}: labels of dtype {y.dtype}, expected integers")
    if y.min() < 0 or y.max() >= task.num_classes:
        raise _Failed(f"{what}: labels {int(y.min())}..{int(y.max())} outside 0..{task.num_classes - 1}")
    if not np.all(np.isfinite(x.astype(np.float64))):
        raise _Failed(f"{what}: non-finite values in the samples")
    return {"samples": len(x), "classes_present": len(np.unique(y))}


def _pool(task: Task) -> Any:
    """The samples the devices would share: ``train_pool()`` where the task has one, else one partition of all."""
    pool = getattr(task, "train_pool", None)
    if callable(pool):
        return pool()
    return task.partition(1, 1.0, 0)[0]


def check_task(
    name: str,
    *,
    registry: TaskRegistry | None = None,
    epochs: int = DEFAULT_EPOCHS,
    devices: int = 4,
    variants: Iterable[str] | None = None,
    out_dir: Path | None = None,
) -> TaskCheck:
    """Run the checks above on the registered task ``name``; ``out_dir`` keeps the built variants (else a
    temporary directory). Never raises for a problem of the task: the failing step says what is wrong."""
    report = TaskCheck(task=name)
    state: dict[str, Any] = {}

    def step(step_name: str, body: Any) -> bool:
        started = time.perf_counter()
        try:
            detail, figures = body()
            report.steps.append(CheckStep(step_name, True, detail, figures, time.perf_counter() - started))
            return True
        except _Failed as exc:
            report.steps.append(CheckStep(step_name, False, exc.detail, exc.figures, time.perf_counter() - started))
        except Exception as exc:  # noqa: BLE001 - the task's own code failed: that is the finding, with its type
            report.steps.append(CheckStep(step_name, False, f"{type(exc).__name__}: {exc}", {},
                                          time.perf_counter() - started))
        return False

    def load() -> tuple[str, dict[str, Any]]:
        from federated.tasks import get_task

        try:
            task = get_task(name, registry)
        except TaskNotFound as exc:
            raise _Failed(str(exc)) from None
        if task.num_classes < 2:
            raise _Failed(f"num_classes is {task.num_classes}: a classifier needs at least 2")
        if not task.input_shape or not all(isinstance(d, int) and d > 0 for d in task.input_shape):
            raise _Failed(f"input_shape {task.input_shape!r} is not a tuple of positive ints")
        state["task"] = task
        return (f"{type(task).__module__}.{type(task).__qualname__}",
                {"num_classes": task.num_classes, "input_shape": list(task.input_shape)})

    def contract() -> tuple[str, dict[str, Any]]:
        task: Task = state["task"]
        from agent.runtime import Preprocessor

        declared = input_contract_of(task)
        try:
            state["preprocess"] = Preprocessor(declared, tuple(task.input_shape))
        except ValueError as exc:
            raise _Failed(f"input contract: {exc}") from None
        return declared.source or "declared", {"features": math.prod(task.input_shape), "dtype": declared.dtype,
                                               "per_feature": len(declared.scale) > 1}

    def data() -> tuple[str, dict[str, Any]]:
        task: Task = state["task"]
        heldout, pool = task.heldout(), _pool(task)
        figures: dict[str, Any] = {"heldout": _check_dataset(task, "heldout()", heldout.x, heldout.y),
                   "pool": _check_dataset(task, "the training pool", pool.x, pool.y)}
        missing = sorted(set(range(task.num_classes)) - {int(v) for v in np.unique(heldout.y)})
        if missing:
            raise _Failed(f"heldout() has no sample of class(es) {missing}: the gate could not measure them",
                          figures)
        sample = np.asarray(task.sample_input())
        if sample.shape != (1, *task.input_shape) or sample.dtype != np.float32:
            raise _Failed(f"sample_input() is {sample.dtype} {sample.shape}, expected float32 "
                          f"{(1, *task.input_shape)}", figures)
        calibration = np.asarray(task.calibration_data(8))
        if calibration.shape != (8, *task.input_shape) or calibration.dtype != np.float32:
            raise _Failed(f"calibration_data(8) is {calibration.dtype} {calibration.shape}, expected float32 "
                          f"{(8, *task.input_shape)}", figures)
        model_input = state["preprocess"](np.asarray(heldout.x))
        if not np.all(np.isfinite(model_input)):
            raise _Failed("the input contract turns held-out samples into non-finite model inputs", figures)
        figures["model_input_range"] = [round(float(model_input.min()), 4), round(float(model_input.max()), 4)]
        state["heldout"], state["pool"] = heldout, pool
        majority = float(np.bincount(np.asarray(heldout.y), minlength=task.num_classes).max() / len(heldout.y))
        state["majority"] = majority
        figures["majority_class_share"] = round(majority, 4)
        return f"{len(pool.x)} training samples, {len(heldout.x)} held out", figures

    def partition() -> tuple[str, dict[str, Any]]:
        task: Task = state["task"]
        parts = task.partition(devices, 0.5, 0)
        if len(parts) != devices:
            raise _Failed(f"partition({devices}, ...) returned {len(parts)} partitions")
        sizes = [len(p.x) for p in parts]
        with tempfile.TemporaryDirectory(prefix="edgefleet-check-") as tmp:
            path = Path(tmp) / "partition.npz"
            task.write_partition(parts[0], path)
            back = task.load_partition(path)
        if not (np.array_equal(np.asarray(back.x), np.asarray(parts[0].x))
                and np.array_equal(np.asarray(back.y), np.asarray(parts[0].y))):
            raise _Failed("a partition written with write_partition() reads back different with load_partition()")
        return f"{devices} device partitions (Dirichlet alpha 0.5), file round trip ok", {"sizes": sizes}

    def train() -> tuple[str, dict[str, Any]]:
        task: Task = state["task"]
        model = task.model()
        fit = task.train(model, state["pool"], epochs=epochs, lr=float(getattr(task, "default_lr", 1e-2)),
                         batch_size=int(getattr(task, "default_batch_size", 32)))
        metrics = task.evaluate(model, state["heldout"])
        accuracy = float(metrics["accuracy"])
        figures = {"epochs": epochs, "train_loss": round(float(fit["loss"]), 4),
                   "heldout_accuracy": round(accuracy, 4), "heldout_loss": round(float(metrics["loss"]), 4),
                   "majority_class_share": round(state["majority"], 4)}
        # Better than always-the-majority-class by more than chance: three standard errors of that share.
        majority, n = state["majority"], len(state["heldout"].y)
        bar = majority + 3.0 * math.sqrt(majority * (1.0 - majority) / n)
        figures["chance_bar"] = round(bar, 4)
        if not accuracy > bar:
            raise _Failed(f"held-out accuracy {accuracy:.4f} after {epochs} epochs is no better than always "
                          f"predicting the majority class ({majority:.4f}; chance reaches {bar:.4f} on {n} "
                          f"samples)", figures)
        state["weights"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return f"held-out accuracy {accuracy:.4f} (majority class {state['majority']:.4f})", figures

    def build() -> tuple[str, dict[str, Any]]:
        from federated.build import ALL_VARIANTS, build_variants
        from federated.signing import Signer

        task: Task = state["task"]
        with tempfile.TemporaryDirectory(prefix="edgefleet-check-") as tmp:
            target = out_dir if out_dir is not None else Path(tmp) / "build"
            target.mkdir(parents=True, exist_ok=True)
            result = build_variants(task, state["weights"], variants=list(variants or ALL_VARIANTS), out_dir=target,
                                    model_version=f"{task.name}-check", source=ModelSource(kind="check", id=name),
                                    signer=Signer(Path(tmp) / "keys"))
        for artifact in result.artifacts:
            report.variants.append({
                "variant": artifact.variant.value, "published": artifact.published,
                "size_bytes": artifact.size_bytes, "accuracy": artifact.accuracy,
                "accuracy_drop": artifact.accuracy_drop, "reason": artifact.reason,
                "path": str(artifact.path) if artifact.path is not None and out_dir is not None else None})
        figures = {"reference_accuracy": round(result.reference_accuracy, 4),
                   "published": [a.variant.value for a in result.published],
                   "rejected": {a.variant.value: a.reason for a in result.rejected}}
        if not result.published:
            raise _Failed("no variant passed the gate", figures)
        return ((f"{len(result.published)} of {len(result.artifacts)} variants pass the gate "
                f"(fp32 {result.reference_accuracy:.4f} through the TFLite runtime)"), figures)

    for step_name, body in (("load", load), ("contract", contract), ("data", data), ("partition", partition),
                            ("train", train), ("build", build)):
        if not step(step_name, body):
            break
    return report
