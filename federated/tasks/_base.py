"""The task contract: what a federated round, the build step and the demo need to know about a learning problem.

A *task* bundles a data set (raw samples as the devices hold them, a held-out test set kept by the control
plane), the preprocessing from raw samples to model input (the task's input contract,
:meth:`ArrayClassificationTask.input_contract`: ``x * scale + offset`` per feature, e.g. a multiplier or a
standardisation; it is signed into every built model's manifest and applied by the devices to raw samples), a
fresh PyTorch model, and the training / evaluation loops. :class:`ArrayClassificationTask` implements everything but
the data and the model for classifiers over in-memory numpy arrays; :class:`federated.tasks.digits.DigitsTask`
is the built-in one.

Torch is imported inside the functions that need it, never at module import, so that ``import federated.tasks``
stays cheap (the scheduler and the API import it to list tasks).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from agent.fsutil import atomic_writer
from agent.manifest import InputContract

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_MIN_PARTITION_SAMPLES",
    "ArrayClassificationTask",
    "Dataset",
    "Task",
    "dirichlet_partition",
    "evaluate_classifier",
    "input_contract_of",
    "train_classifier",
]

DEFAULT_MIN_PARTITION_SAMPLES: Final = 10
_MAX_PARTITION_DRAWS: Final = 1000

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True, eq=False)
class Dataset:
    """Raw samples ``x`` (as stored on a device, e.g. uint8 pixels) and integer labels ``y``."""

    x: npt.NDArray[Any]
    y: IntArray

    def __post_init__(self) -> None:
        if self.x.ndim < 2:
            raise ValueError(f"x must be (samples, *features), got shape {self.x.shape}")
        if self.y.shape != (self.x.shape[0],):
            raise ValueError(f"y has shape {self.y.shape}, expected ({self.x.shape[0]},)")
        if self.x.dtype.kind not in "iuf":
            raise ValueError(f"x has non-numeric type {self.x.dtype}")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def model_input(self, preprocessing: float | InputContract) -> FloatArray:
        """What the model (and the TFLite artifact) takes: ``x`` through the input contract (or ``x * scale``).

        Computed by the same function as on a device (:class:`agent.runtime.Preprocessor`), so training,
        evaluation, calibration and the devices see bit-identical model input.
        """
        from agent.runtime import Preprocessor

        contract = preprocessing if isinstance(preprocessing, InputContract) else InputContract(
            scale=[float(preprocessing)])
        return Preprocessor(contract, tuple(self.x.shape[1:]))(self.x)


@runtime_checkable
class Task(Protocol):
    """A supervised classification problem that the fleet learns federatedly.

    The model maps a float32 batch ``(N, *input_shape)`` (raw samples through the task's input contract,
    :func:`input_contract_of`) to logits ``(N, num_classes)``. ``isinstance(obj, Task)`` checks that the members
    exist, not their signatures.
    """

    name: str
    num_classes: int
    input_shape: tuple[int, ...]  # per sample, without the batch dimension
    input_scale: float  # raw sample -> model input multiplier, when the task declares no input_contract()

    def model(self) -> torch.nn.Module:
        """A fresh model with seeded (reproducible) initial weights."""
        ...

    def load_partition(self, path: Path) -> Dataset:
        """A device's partition: an ``.npz`` with ``x`` (raw) and ``y``."""
        ...

    def write_partition(self, ds: Dataset, path: Path) -> None:
        """Write a partition as :meth:`load_partition` reads it."""
        ...

    def train(
        self,
        model: torch.nn.Module,
        data: Dataset,
        *,
        epochs: int,
        lr: float,
        batch_size: int,
        proximal_mu: float = 0.0,
        global_params: Sequence[npt.NDArray[Any]] | Mapping[str, npt.NDArray[Any]] | None = None,
    ) -> dict[str, float]:
        """Train ``model`` in place; ``{"loss", "num_examples"}``. FedProx when ``proximal_mu > 0``."""
        ...

    def evaluate(self, model: torch.nn.Module, data: Dataset) -> dict[str, float]:
        """``{"loss", "accuracy", "num_examples"}`` of ``model`` on ``data``."""
        ...

    def heldout(self) -> Dataset:
        """The control plane's held-out test set (never partitioned among devices)."""
        ...

    def sample_input(self) -> FloatArray:
        """One float32 model input, batch of 1, for conversion."""
        ...

    def calibration_data(self, n: int) -> FloatArray:
        """``n`` float32 model inputs ``(n, *input_shape)`` for full-integer calibration."""
        ...

    def partition(self, n_clients: int, alpha: float, seed: int) -> list[Dataset]:
        """Non-IID (Dirichlet over labels) disjoint partitions of the non-held-out data, one per client."""
        ...


def input_contract_of(task: Task) -> InputContract:
    """The task's input contract: its ``input_contract()`` if it has one, else ``x * input_scale``."""
    declared = getattr(task, "input_contract", None)
    if callable(declared):
        contract = declared()
        if not isinstance(contract, InputContract):
            raise TypeError(f"task {task.name}: input_contract() returned {type(contract).__name__}, "
                            f"not an InputContract")
        return contract
    return InputContract(scale=[float(task.input_scale)], shape=list(task.input_shape),
                         source="declared: x * input_scale")


# ------------------------------------------------------------------------------------------------ partitions


def dirichlet_partition(
    y: npt.ArrayLike,
    n_clients: int,
    alpha: float,
    seed: int,
    *,
    min_samples: int = DEFAULT_MIN_PARTITION_SAMPLES,
) -> list[IntArray]:
    """Split sample indices among ``n_clients`` with label proportions drawn from ``Dirichlet(alpha)``.

    For every class the class's samples are shuffled and cut among the clients by proportions drawn from a
    symmetric Dirichlet distribution (small ``alpha``: each client sees few classes; large: close to IID). The
    draw is repeated until every client has at least ``min_samples`` samples. Every index appears in exactly one
    partition; each partition is sorted. Deterministic for a given ``seed``.

    Raises
    ------
    ValueError
        Bad arguments, or no draw gave every client ``min_samples`` samples (lower it or raise ``alpha``).
    """
    labels = np.asarray(y)
    if labels.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {labels.shape}")
    if n_clients < 1:
        raise ValueError(f"n_clients must be positive, got {n_clients}")
    if not (math.isfinite(alpha) and alpha > 0.0):
        raise ValueError(f"alpha must be a positive number, got {alpha}")
    if min_samples < 0:
        raise ValueError(f"min_samples must be >= 0, got {min_samples}")
    if n_clients * min_samples > len(labels):
        raise ValueError(
            f"{len(labels)} samples cannot give {n_clients} clients at least {min_samples} samples each"
        )
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    by_class = [np.flatnonzero(labels == c) for c in classes]
    for _ in range(_MAX_PARTITION_DRAWS):
        parts: list[list[IntArray]] = [[] for _ in range(n_clients)]
        for indices in by_class:
            shuffled = rng.permutation(indices)
            proportions = rng.dirichlet(np.full(n_clients, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(shuffled)).astype(np.int64)
            for client, chunk in enumerate(np.split(shuffled, cuts)):
                parts[client].append(chunk)
        result = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
        if min(len(p) for p in result) >= min_samples:
            return result
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) draw in {_MAX_PARTITION_DRAWS} gave each of {n_clients} clients "
        f"at least {min_samples} samples; raise alpha or lower min_samples"
    )


def _write_npz_atomically(path: Path, x: npt.NDArray[Any], y: npt.NDArray[Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(path) as fh:
        np.savez_compressed(fh, x=x, y=y)  # a file object: savez adds no ".npz" suffix


# ------------------------------------------------------------------------------------------ train / evaluate


def _tensor_dataset(data: Dataset, preprocessing: float | InputContract) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    return torch.from_numpy(data.model_input(preprocessing)), torch.from_numpy(data.y.astype(np.int64))


def _global_tensors(
    model: torch.nn.Module,
    global_params: Sequence[npt.NDArray[Any]] | Mapping[str, npt.NDArray[Any]] | None,
) -> list[torch.Tensor]:
    """The FedProx anchor, one tensor per ``model.parameters()``.

    ``global_params`` may be a mapping by parameter name (a state dict), a sequence aligned with
    ``model.parameters()``, or a sequence aligned with ``model.state_dict()`` (Flower's usual array list); None
    anchors to the model's weights as they are now (the global model it was just loaded with).
    """
    import torch

    named = list(model.named_parameters())
    if global_params is None:
        return [p.detach().clone() for _, p in named]
    if isinstance(global_params, Mapping):
        missing = [name for name, _ in named if name not in global_params]
        if missing:
            raise ValueError(f"global_params lacks parameters {missing}")
        arrays = [np.asarray(global_params[name]) for name, _ in named]
    else:
        values = list(global_params)
        state_keys = list(model.state_dict().keys())
        if len(values) == len(named):
            arrays = [np.asarray(v) for v in values]
        elif len(values) == len(state_keys):
            by_key = dict(zip(state_keys, values, strict=True))
            arrays = [np.asarray(by_key[name]) for name, _ in named]
        else:
            raise ValueError(
                f"global_params has {len(values)} arrays; the model has {len(named)} parameters "
                f"and {len(state_keys)} state entries"
            )
    tensors: list[torch.Tensor] = []
    for (name, param), array in zip(named, arrays, strict=True):
        if tuple(array.shape) != tuple(param.shape):
            raise ValueError(
                f"global_params[{name!r}] has shape {array.shape}, expected {tuple(param.shape)}"
            )
        tensors.append(torch.as_tensor(array, dtype=param.dtype).detach().clone())
    return tensors


def train_classifier(
    model: torch.nn.Module,
    data: Dataset,
    *,
    input_scale: float | InputContract,
    epochs: int,
    lr: float,
    batch_size: int,
    proximal_mu: float = 0.0,
    global_params: Sequence[npt.NDArray[Any]] | Mapping[str, npt.NDArray[Any]] | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Adam on cross-entropy, shuffled mini-batches (seeded), ``model`` trained in place and left in eval mode.

    ``input_scale`` is the preprocessing of ``data``'s raw samples: the task's input contract, or a multiplier.

    With ``proximal_mu > 0`` the FedProx term ``mu / 2 * ||w - w_global||^2`` is added to every batch's loss
    (``w_global``: see :func:`_global_tensors`). Returns ``{"loss": mean cross-entropy over the last epoch
    (without the proximal term), "num_examples": len(data)}``.
    """
    import torch
    from torch import nn

    if epochs < 1 or batch_size < 1 or not lr > 0.0:
        raise ValueError(f"need epochs >= 1, batch_size >= 1, lr > 0; got {epochs}, {batch_size}, {lr}")
    if proximal_mu < 0.0:
        raise ValueError(f"proximal_mu must be >= 0, got {proximal_mu}")
    if len(data) == 0:
        raise ValueError("cannot train on an empty data set")
    xs, ys = _tensor_dataset(data, input_scale)
    anchor = _global_tensors(model, global_params) if proximal_mu > 0.0 else []
    params = list(model.parameters())
    optimizer = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    epoch_loss = 0.0
    for _ in range(epochs):
        order = torch.randperm(len(xs), generator=generator)
        total = 0.0
        for start in range(0, len(xs), batch_size):
            batch = order[start : start + batch_size]
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(xs[batch]), ys[batch])
            objective = loss
            if anchor:
                proximal = sum(((p - g) ** 2).sum() for p, g in zip(params, anchor, strict=True))
                objective = loss + (proximal_mu / 2.0) * proximal
            torch.autograd.backward(objective)
            optimizer.step()
            total += float(loss.detach()) * len(batch)
        epoch_loss = total / len(xs)
    model.eval()
    return {"loss": epoch_loss, "num_examples": float(len(data))}


def evaluate_classifier(
    model: torch.nn.Module, data: Dataset, *, input_scale: float | InputContract
) -> dict[str, float]:
    """``{"loss": mean cross-entropy, "accuracy", "num_examples"}``; the model is put in eval mode."""
    import torch
    from torch import nn

    if len(data) == 0:
        raise ValueError("cannot evaluate on an empty data set")
    xs, ys = _tensor_dataset(data, input_scale)
    model.eval()
    with torch.no_grad():
        logits = model(xs)
        loss = float(nn.functional.cross_entropy(logits, ys))
        accuracy = float((logits.argmax(dim=1) == ys).float().mean())
    return {"loss": loss, "accuracy": accuracy, "num_examples": float(len(data))}


# ---------------------------------------------------------------------------------------------- base class


class ArrayClassificationTask(abc.ABC):
    """A :class:`Task` over in-memory arrays: subclasses provide the data and the model, this does the rest.

    Subclasses set ``name``, ``num_classes`` and ``input_shape`` and implement :meth:`train_pool` (the samples
    that get partitioned among devices), :meth:`heldout` and :meth:`model`. The preprocessing from a raw sample
    to model input is :meth:`input_contract`: ``x * input_scale`` by default, per-feature standardisation
    ``(x - mean) / std`` over the training pool with ``standardize = True``, or override it to declare any
    per-feature ``x * scale + offset``. It is signed into every built model's manifest and the devices apply it.
    """

    name: str
    num_classes: int
    input_shape: tuple[int, ...]
    input_scale: float = 1.0
    standardize: bool = False  # input contract: (x - mean) / std per feature, statistics of train_pool()
    min_partition_samples: int = DEFAULT_MIN_PARTITION_SAMPLES
    calibration_seed: int = 0
    _input_contract: InputContract | None = None

    def input_contract(self) -> InputContract:
        """The preprocessing from a raw sample to model input, as the devices will apply it (computed once).

        ``standardize``: per feature, ``scale = 1 / std`` and ``offset = -mean / std`` of the training pool's raw
        samples (a constant feature gets std 1); else ``x * input_scale``.
        """
        if self._input_contract is None:
            shape = [int(d) for d in self.input_shape]
            if self.standardize:
                raw = np.asarray(self.train_pool().x, dtype=np.float64).reshape(-1, math.prod(shape))
                mean, std = raw.mean(axis=0), raw.std(axis=0)
                std = np.where(std > 1e-12, std, 1.0)
                self._input_contract = InputContract(
                    scale=(1.0 / std).tolist(), offset=(-mean / std).tolist(), shape=shape,
                    source=f"standardised on the training pool ({raw.shape[0]} samples)")
            else:
                self._input_contract = InputContract(scale=[float(self.input_scale)], shape=shape,
                                                     source="declared: x * input_scale")
        return self._input_contract

    @abc.abstractmethod
    def train_pool(self) -> Dataset:
        """Everything but the held-out set: what :meth:`partition` splits among devices."""

    @abc.abstractmethod
    def heldout(self) -> Dataset: ...

    @abc.abstractmethod
    def model(self) -> torch.nn.Module: ...

    # ---------------------------------------------------------------------------------------- data files

    def load_partition(self, path: Path) -> Dataset:
        """Read a partition ``.npz`` (``x`` raw, ``y`` labels); raises ValueError if it does not fit the task."""
        with np.load(path, allow_pickle=False) as npz:
            missing = {"x", "y"} - set(npz.files)
            if missing:
                raise ValueError(f"{path}: missing arrays {sorted(missing)} (found {sorted(npz.files)})")
            ds = Dataset(np.asarray(npz["x"]), np.asarray(npz["y"]).astype(np.int64))
        if tuple(ds.x.shape[1:]) != tuple(self.input_shape):
            raise ValueError(
                f"{path}: samples of shape {ds.x.shape[1:]}, task {self.name} takes {self.input_shape}"
            )
        if len(ds) and (ds.y.min() < 0 or ds.y.max() >= self.num_classes):
            raise ValueError(f"{path}: labels outside 0..{self.num_classes - 1}")
        return ds

    def write_partition(self, ds: Dataset, path: Path) -> None:
        """Write ``ds`` atomically as an ``.npz`` (``x`` in its raw type, ``y`` int64)."""
        _write_npz_atomically(Path(path), ds.x, ds.y.astype(np.int64))

    def partition(
        self, n_clients: int, alpha: float, seed: int, *, min_samples: int | None = None
    ) -> list[Dataset]:
        """See :func:`dirichlet_partition`; ``min_samples`` defaults to :attr:`min_partition_samples`."""
        pool = self.train_pool()
        minimum = self.min_partition_samples if min_samples is None else min_samples
        parts = dirichlet_partition(pool.y, n_clients, alpha, seed, min_samples=minimum)
        return [Dataset(pool.x[idx], pool.y[idx]) for idx in parts]

    # ------------------------------------------------------------------------------------------- conversion

    def sample_input(self) -> FloatArray:
        return self.train_pool().model_input(self.input_contract())[:1].copy()

    def calibration_data(self, n: int) -> FloatArray:
        """``n`` samples of the training pool (a fixed random subset; all of it if ``n`` is larger)."""
        if n < 1:
            raise ValueError(f"n must be positive, got {n}")
        pool = self.train_pool()
        rng = np.random.default_rng(self.calibration_seed)
        chosen = np.sort(rng.permutation(len(pool))[: min(n, len(pool))])
        return np.ascontiguousarray(pool.model_input(self.input_contract())[chosen])

    # ----------------------------------------------------------------------------------- train / evaluate

    def train(
        self,
        model: torch.nn.Module,
        data: Dataset,
        *,
        epochs: int,
        lr: float,
        batch_size: int,
        proximal_mu: float = 0.0,
        global_params: Sequence[npt.NDArray[Any]] | Mapping[str, npt.NDArray[Any]] | None = None,
        seed: int = 0,
    ) -> dict[str, float]:
        """See :func:`train_classifier`."""
        return train_classifier(
            model,
            data,
            input_scale=self.input_contract(),
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            proximal_mu=proximal_mu,
            global_params=global_params,
            seed=seed,
        )

    def evaluate(self, model: torch.nn.Module, data: Dataset) -> dict[str, float]:
        """See :func:`evaluate_classifier`."""
        return evaluate_classifier(model, data, input_scale=self.input_contract())
