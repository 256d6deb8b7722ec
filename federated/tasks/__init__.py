"""Pluggable learning tasks, resolved through a registry: :func:`get_task` selects a task by NAME.

A name never imports code by itself: only tasks registered before the process started can be selected, so an
API request, a schedule stored in the database, a Flower run config (which every device of the round reads) or a
burst job's spec can pick a task but cannot make any process import a module of its choosing.

The registry of a process (:meth:`TaskRegistry.from_env`) is, in this order:

* the built-in tasks: ``"digits"`` (:class:`~federated.tasks.digits.DigitsTask`, scikit-learn's 8x8 digits, no
  download);
* the ``edgefleet.tasks`` entry points of the installed distributions (``name = "package.module:Class"``);
* the allow-list in the ``EDGEFLEET_TASKS`` environment variable: comma-separated ``name=package.module:Class``
  entries (a bare ``package.module:Class`` is registered under that dotted path as its name). ``edgefleet
  controlplane serve --task name=package.module:Class`` adds to it.

A task is also selectable by the exact ``package.module:Class`` target it is registered with (so
``"federated.tasks.digits:DigitsTask"`` is ``"digits"``); any other dotted path is an unknown task, and an unknown
name raises :class:`TaskNotFound` listing the known ones. Every process that resolves a task does so through its
own registry: the control plane (API validation, builds), the Flower ServerApp (a SuperLink subprocess) and the
burst worker inherit the control plane's environment, and a device's ClientApp resolves the run's task with the
device agent's registry, so a custom task must be installed and registered on the control plane and on every
device that trains it.

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

        def __init__(self) -> None:   # the registry calls the class without arguments
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

register it, on the control plane and on the training devices, either as an entry point of your package::

    # pyproject.toml of mypkg
    [project.entry-points."edgefleet.tasks"]
    vibration = "mypkg.vibration:VibrationTask"

or in the environment (``EDGEFLEET_TASKS=vibration=mypkg.vibration:VibrationTask``), and select it as
``get_task("vibration")`` (``"task": "vibration"`` in the API). Names are at most 64 characters of letters,
digits, ``_``, ``.`` and ``-``. Rules that keep the rest of the pipeline working:

* the model's input is the raw sample through the task's input contract
  (:meth:`ArrayClassificationTask.input_contract`): ``raw * input_scale`` by default; set ``standardize = True``
  for per-feature ``(raw - mean) / std`` over the training pool (tabular data), or override ``input_contract()``
  to declare any per-feature ``raw * scale + offset``. The contract is signed into every built model's manifest
  and the devices apply exactly it to their raw samples (live and in the golden self-test); the model takes one
  float32 tensor of shape ``(N, *input_shape)`` and its output is one ``(N, num_classes)`` logits tensor (the
  TFLite artifact has the same single input and output);
* the model must convert with litert-torch at batch 1 (no data-dependent control flow);
* partitions are ``.npz`` files with ``x`` (raw, as a device stores it) and ``y`` (int labels).
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Final

from federated.tasks._base import (
    DEFAULT_MIN_PARTITION_SAMPLES,
    ArrayClassificationTask,
    Dataset,
    Task,
    dirichlet_partition,
    evaluate_classifier,
    input_contract_of,
    train_classifier,
)

__all__ = [
    "BUILTIN_TASKS",
    "DEFAULT_MIN_PARTITION_SAMPLES",
    "ENTRY_POINT_GROUP",
    "TASKS_ENV",
    "ArrayClassificationTask",
    "Dataset",
    "Task",
    "TaskEntry",
    "TaskNotFound",
    "TaskRegistry",
    "dirichlet_partition",
    "evaluate_classifier",
    "get_task",
    "input_contract_of",
    "parse_allow_list",
    "train_classifier",
]

log = logging.getLogger("edgefleet.federated.tasks")

BUILTIN_TASKS: Final = {"digits": "federated.tasks.digits:DigitsTask"}
TASKS_ENV: Final = "EDGEFLEET_TASKS"
ENTRY_POINT_GROUP: Final = "edgefleet.tasks"
NAME_PATTERN: Final = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$"
_NAME: Final = re.compile(NAME_PATTERN)
_IDENT: Final = r"[A-Za-z_][A-Za-z0-9_]*"
_TARGET: Final = re.compile(rf"^{_IDENT}(\.{_IDENT})*:{_IDENT}(\.{_IDENT})*$")


class TaskNotFound(LookupError):
    """No task registered under that name, or its registered target cannot be loaded as a task."""


@dataclass(frozen=True, slots=True)
class TaskEntry:
    """A registered task: its ``name``, the ``package.module:Class`` it loads and where it was registered."""

    name: str
    target: str
    source: str  # "built-in" | "entry point <distribution>" | "EDGEFLEET_TASKS"


def parse_allow_list(value: str) -> list[tuple[str, str]]:
    """``(name, target)`` pairs from ``"name=package.module:Class,..."`` (whitespace also separates entries; a
    bare target is its own name). Raises ValueError naming the first malformed entry."""
    pairs: list[tuple[str, str]] = []
    for item in re.split(r"[,\s]+", value.strip()):
        if not item:
            continue
        name, sep, target = item.partition("=")
        if not sep:
            name, target = item, item
        if not _TARGET.match(target):
            raise ValueError(f"{item!r}: the target must be 'package.module:Class'")
        if name != target and not _NAME.match(name):
            raise ValueError(f"{item!r}: a task name is 1-64 letters, digits, '_', '.' or '-'")
        pairs.append((name, target))
    return pairs


class TaskRegistry:
    """The tasks a process may load, by name; see the module docstring for where they come from."""

    def __init__(self, entries: Iterable[TaskEntry]) -> None:
        self._entries: dict[str, TaskEntry] = {}
        for entry in entries:
            self._entries.setdefault(entry.name, entry)

    @classmethod
    def load(cls, allow_list: str | Iterable[str] | None = None, *, with_entry_points: bool = True) -> TaskRegistry:
        """Built-ins, then the ``edgefleet.tasks`` entry points, then ``allow_list`` (``EDGEFLEET_TASKS`` syntax,
        or its entries one by one). Raises ValueError for a malformed allow-list or one that re-registers a
        name with another target; an entry point that does so is skipped with a warning."""
        entries = {name: TaskEntry(name, target, "built-in") for name, target in BUILTIN_TASKS.items()}
        if with_entry_points:
            for ep in entry_points(group=ENTRY_POINT_GROUP):
                target = f"{ep.module}:{ep.attr}" if ep.attr else ep.module
                dist = ep.dist.name if ep.dist is not None else "?"
                if not _NAME.match(ep.name) or not _TARGET.match(target):
                    log.warning("task entry point %s = %r of %s is not 'name = package.module:Class': skipped",
                                ep.name, ep.value, dist)
                elif ep.name in entries and entries[ep.name].target != target:
                    log.warning("task entry point %s = %r of %s: the name is taken by %s (%s): skipped",
                                ep.name, ep.value, dist, entries[ep.name].target, entries[ep.name].source)
                else:
                    entries.setdefault(ep.name, TaskEntry(ep.name, target, f"entry point {dist}"))
        items = allow_list if allow_list is None or isinstance(allow_list, str) else ",".join(allow_list)
        try:
            pairs = parse_allow_list(items or "")
        except ValueError as exc:
            raise ValueError(f"{TASKS_ENV}: {exc}") from None
        for name, target in pairs:
            known = entries.get(name)
            if known is not None and known.target != target:
                raise ValueError(f"{TASKS_ENV}: task {name!r} is already registered as {known.target} "
                                 f"({known.source})")
            entries.setdefault(name, TaskEntry(name, target, TASKS_ENV))
        return cls(entries.values())

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TaskRegistry:
        """This process's registry: built-ins, entry points and ``EDGEFLEET_TASKS`` (ValueError if malformed)."""
        return cls.load((os.environ if env is None else env).get(TASKS_ENV))

    def __iter__(self) -> Iterator[TaskEntry]:
        return iter(self._entries.values())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._find(name) is not None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def _find(self, name: str) -> TaskEntry | None:
        entry = self._entries.get(name)
        if entry is None and ":" in name:
            entry = next((e for e in self._entries.values() if e.target == name), None)
        return entry

    def entry(self, name: str) -> TaskEntry:
        """The registered task ``name`` (or registered with exactly that target); TaskNotFound lists the known."""
        entry = self._find(name)
        if entry is None:
            shown = name if len(name) <= 80 else name[:80] + "..."
            raise TaskNotFound(f"unknown task {shown!r}: known tasks are {', '.join(self.names())} (register "
                               f"others with {TASKS_ENV} or the {ENTRY_POINT_GROUP!r} entry point group)")
        return entry

    def get(self, name: str) -> Task:
        """A new instance of the registered task ``name``: its class is imported and called without arguments.

        Raises
        ------
        TaskNotFound
            Unknown name; or the registered module, class or instance fails to load or is not a :class:`Task`.
        """
        entry = self.entry(name)
        module_name, _, attr = entry.target.partition(":")
        try:
            factory: object = importlib.import_module(module_name)
        except Exception as exc:
            raise TaskNotFound(f"task {entry.name!r}: cannot import module {module_name!r}: "
                               f"{type(exc).__name__}: {exc}") from exc
        for part in attr.split("."):
            try:
                factory = getattr(factory, part)
            except AttributeError:
                raise TaskNotFound(f"task {entry.name!r}: module {module_name!r} has no {attr!r}") from None
        if not callable(factory):
            raise TaskNotFound(f"task {entry.name!r}: {entry.target} is not callable")
        try:
            task = factory()
        except Exception as exc:
            raise TaskNotFound(f"task {entry.name!r}: {entry.target}() failed: {type(exc).__name__}: {exc}") from exc
        if not isinstance(task, Task):
            missing = [m for m in _TASK_MEMBERS if not hasattr(task, m)]
            raise TaskNotFound(f"task {entry.name!r}: {entry.target} is not a Task (missing {', '.join(missing)})")
        return task


def get_task(name: str, registry: TaskRegistry | None = None) -> Task:
    """A task instance by registered name (``"digits"``), from ``registry`` or this process's
    (:meth:`TaskRegistry.from_env`).

    Raises
    ------
    TaskNotFound
        Unknown name (the message lists the known ones), a malformed ``EDGEFLEET_TASKS``, or a registered task
        that fails to load.
    """
    if registry is None:
        try:
            registry = TaskRegistry.from_env()
        except ValueError as exc:
            raise TaskNotFound(str(exc)) from None
    return registry.get(name)


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
