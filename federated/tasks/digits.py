"""The built-in task: scikit-learn's bundled 8x8 handwritten digits (1797 samples, no download).

The split is the one :mod:`federated.starter` uses (stratified, 20% held out, seed 0), and the model is the
same 64 -> 64 -> 10 MLP, so the starter model shipped with the agent is "version 0" of this task: its state dict
loads into :meth:`DigitsTask.model`.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Final

import numpy as np
import numpy.typing as npt

from federated.tasks._base import ArrayClassificationTask, Dataset, IntArray

if TYPE_CHECKING:
    import torch

__all__ = ["DigitsTask"]

NUM_FEATURES: Final = 64
NUM_CLASSES: Final = 10
HIDDEN: Final = 64
HELDOUT_FRACTION: Final = 0.2
SPLIT_SEED: Final = 0  # federated.starter's default seed: the same held-out set
DEFAULT_EPOCHS: Final = 30
DEFAULT_LR: Final = 1e-2
DEFAULT_BATCH_SIZE: Final = 64


@functools.cache
def _digits() -> tuple[npt.NDArray[np.uint8], IntArray, IntArray, IntArray]:
    """(x uint8 0..16, y, indices of the training pool, indices of the held-out set); loaded once."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = np.asarray(bunch.data)
    if x.min() < 0 or x.max() > 16 or not np.array_equal(x, np.round(x)):
        raise RuntimeError("unexpected pixel values in scikit-learn's digits data set")
    y = np.asarray(bunch.target, dtype=np.int64)
    pool_idx, heldout_idx = train_test_split(
        np.arange(len(y)), test_size=HELDOUT_FRACTION, stratify=y, random_state=SPLIT_SEED, shuffle=True
    )
    x_u8 = x.astype(np.uint8)
    for array in (x_u8, y):
        array.setflags(write=False)
    return x_u8, y, np.sort(pool_idx).astype(np.int64), np.sort(heldout_idx).astype(np.int64)


class DigitsTask(ArrayClassificationTask):
    """Digits: raw samples are uint8 pixels 0..16 (shape (64,)), the model takes pixels / 16."""

    name = "digits"
    num_classes = NUM_CLASSES
    input_shape = (NUM_FEATURES,)
    input_scale = 1.0 / 16.0
    default_epochs = DEFAULT_EPOCHS
    default_lr = DEFAULT_LR
    default_batch_size = DEFAULT_BATCH_SIZE

    def __init__(self, *, seed: int = 0) -> None:
        self.seed = seed  # initial weights of model()

    def train_pool(self) -> Dataset:
        x, y, pool_idx, _ = _digits()
        return Dataset(x[pool_idx], y[pool_idx])

    def heldout(self) -> Dataset:
        x, y, _, heldout_idx = _digits()
        return Dataset(x[heldout_idx], y[heldout_idx])

    def model(self) -> torch.nn.Module:
        """The starter MLP (64 -> 64 -> ReLU -> 10 logits), initial weights seeded by ``seed``."""
        import torch
        from torch import nn

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return nn.Sequential(nn.Linear(NUM_FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, NUM_CLASSES))

    def centralized_baseline(self, epochs: int = DEFAULT_EPOCHS, *, seed: int = 0) -> float:
        """Held-out accuracy of a fresh model trained on the whole training pool (what federation competes with)."""
        model = self.model()
        self.train(
            model,
            self.train_pool(),
            epochs=epochs,
            lr=self.default_lr,
            batch_size=self.default_batch_size,
            seed=seed,
        )
        return self.evaluate(model, self.heldout())["accuracy"]
