"""Pluggable learning tasks: :func:`get_task` by name (built-in) or by dotted path (your own).

Built-in: ``"digits"`` (:class:`~federated.tasks.digits.DigitsTask`, scikit-learn's 8x8 digits, no download).

Writing your own task
---------------------
A task is any object with the members of the :class:`Task` protocol. The easiest way is to subclass
:class:`ArrayClassificationTask`, which implements partitioning (Dirichlet over labels), partition files,
training (Adam, with the FedProx term when ``proximal_mu > 0``), evaluation and the conversion inputs; you
provide the data and the model::

    # mypkg/vibration.py
    import numpy as np
    from federated.tasks import ArrayClassificationTask, Dataset

    class VibrationTask(ArrayClassificationTask):
        name = "vibration"
        num_classes = 4
        input_shape = (128,)          # one raw sample, without the batch dimension
        input_scale = 1.0 / 32768.0   # raw int16 -> model input

        def __init__(self) -> None:   # get_task() calls the class without arguments
            data = np.load("/srv/vibration.npz")
            self._pool = Dataset(data["x_train"], data["y_train"].astype(np.int64))
            self._heldout = Dataset(data["x_test"], data["y_test"].astype(np.int64))

        def train_pool(self) -> Dataset:      # what gets partitioned among devices
            return self._pool

        def heldout(self) -> Dataset:         # the control plane's test set; gates every build
            return self._heldout

        def model(self):                      # fresh, seeded; returns logits (N, num_classes)
            import torch                      # import torch lazily: importing the task must stay cheap
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Linear(128, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))

and select it as ``get_task("mypkg.vibration:VibrationTask")`` (the package must be importable by the control
plane and by training devices). Rules that keep the rest of the pipeline working:

* the model's input is ``raw * input_scale`` as float32, one tensor of shape ``(N, *input_shape)``, and its
  output is one ``(N, num_classes)`` logits tensor (the TFLite artifact has the same single input and output);
* the model must convert with litert-torch at batch 1 (no data-dependent control flow);
* partitions are ``.npz`` files with ``x`` (raw, as a device stores it) and ``y`` (int labels).
"""

from __future__ import annotations

import importlib
import re
from typing import Final

from federated.tasks._base import (
    DEFAULT_MIN_PARTITION_SAMPLES,
    ArrayClassificationTask,
    Dataset,
    Task,
    dirichlet_partition,
    evaluate_classifier,
    train_classifier,
)

__all__ = [
    "BUILTIN_TASKS",
    "DEFAULT_MIN_PARTITION_SAMPLES",
    "ArrayClassificationTask",
    "Dataset",
    "Task",
    "TaskNotFound",
    "dirichlet_partition",
    "evaluate_classifier",
    "get_task",
    "train_classifier",
]

BUILTIN_TASKS: Final = {"digits": "federated.tasks.digits:DigitsTask"}
_DOTTED: Final = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")


class TaskNotFound(LookupError):
    """No task of that name, or the dotted path does not lead to a task class."""


def get_task(name: str) -> Task:
    """A task instance: a built-in name (``"digits"``) or ``"package.module:ClassName"``.

    The class is called without arguments and the result must satisfy :class:`Task`.

    Raises
    ------
    TaskNotFound
        Unknown name, module or class, or the object is not a task.
    """
    target = BUILTIN_TASKS.get(name, name)
    if not _DOTTED.match(target):
        known = ", ".join(sorted(BUILTIN_TASKS))
        raise TaskNotFound(f"unknown task {name!r}: use one of {known} or 'package.module:ClassName'")
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise TaskNotFound(f"task {name!r}: cannot import module {module_name!r}: {exc}") from exc
    try:
        factory = getattr(module, class_name)
    except AttributeError:
        raise TaskNotFound(f"task {name!r}: module {module_name!r} has no {class_name!r}") from None
    task = factory()
    if not isinstance(task, Task):
        missing = [m for m in _TASK_MEMBERS if not hasattr(task, m)]
        raise TaskNotFound(f"task {name!r}: {target} is not a Task (missing {', '.join(missing)})")
    return task


_TASK_MEMBERS: Final = (
    "name",
    "num_classes",
    "input_shape",
    "input_scale",
    "model",
    "load_partition",
    "write_partition",
    "train",
    "evaluate",
    "heldout",
    "sample_input",
    "calibration_data",
    "partition",
)
