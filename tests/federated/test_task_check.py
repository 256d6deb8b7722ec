"""`edgefleet tasks check`: a task's whole path to a fleet (load, contract, data, partitions, training, build and
gate) on this machine, through the CLI a data scientist runs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from controlplane.cli import app
from federated.tasks import TASKS_ENV, Dataset
from federated.tasks.digits import DigitsTask

_MISSING = [m for m in ("torch", "sklearn", "litert_torch") if importlib.util.find_spec(m) is None]
needs_build = pytest.mark.skipif(bool(_MISSING), reason=f"needs the train and build extras ({_MISSING} missing)")
HERE = __name__


class WineTask(DigitsTask):
    """A user's tabular task: scikit-learn's bundled wine data (13 features from 0.1 to 1680), standardised."""

    name = "wine"
    num_classes = 3
    input_shape = (13,)
    standardize = True

    def _split(self, part: int) -> Dataset:
        from sklearn.datasets import load_wine

        bunch = load_wine()
        return Dataset(np.asarray(bunch.data)[part::2], np.asarray(bunch.target, dtype=np.int64)[part::2])

    def train_pool(self) -> Dataset:
        return self._split(0)

    def heldout(self) -> Dataset:
        return self._split(1)

    def model(self):  # type: ignore[no-untyped-def]
        import torch

        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(13, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


class WrongShapeTask(DigitsTask):
    """Declares 32 features; its data has 64."""

    name = "wrong-shape"
    input_shape = (32,)

    def input_contract(self):  # type: ignore[no-untyped-def]
        from agent.manifest import InputContract

        return InputContract(scale=[1 / 16], shape=[64])


class BadLabelsTask(DigitsTask):
    """Held-out labels 1..10 for a 10-class task (an off-by-one a user makes)."""

    name = "bad-labels"

    def heldout(self) -> Dataset:
        data = super().heldout()
        return Dataset(data.x, data.y + 1)


class NoiseTask(DigitsTask):
    """Labels shuffled against the samples: nothing to learn, so it must not pass as ready."""

    name = "noise"

    def train_pool(self) -> Dataset:
        data = super().train_pool()
        return Dataset(data.x, np.random.default_rng(0).permutation(data.y))

    def heldout(self) -> Dataset:
        data = super().heldout()
        return Dataset(data.x, np.random.default_rng(1).permutation(data.y))


def _check(monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[int, dict[str, object]]:
    # `--task` adds to this process's EDGEFLEET_TASKS (as `serve --task` does): setenv restores it after the test
    monkeypatch.setenv(TASKS_ENV, "")
    result = CliRunner().invoke(app, ["tasks", "check", *args, "--json"])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, json.loads(result.stdout)


def _steps(report: dict[str, object]) -> dict[str, dict[str, object]]:
    return {s["name"]: s for s in report["steps"]}  # type: ignore[attr-defined,index]


@pytest.mark.parametrize(("task", "step", "message"), [
    ("WrongShapeTask", "contract", r"the input contract is for samples of shape \[64\], the model takes \[32\]"),
    ("BadLabelsTask", "data", r"heldout\(\): labels 1..10 outside 0..9"),
    ("NoiseTask", "train", r"no better than always predicting the majority class"),
])
def test_a_broken_task_fails_at_its_step_with_the_reason(monkeypatch: pytest.MonkeyPatch, task: str, step: str,
                                                         message: str) -> None:
    # Arrange
    if task == "NoiseTask" and _MISSING[:2]:
        pytest.skip("needs torch and scikit-learn")
    # Execute
    code, report = _check(monkeypatch, task.lower(), "--task", f"{task.lower()}={HERE}:{task}", "--epochs", "3")
    # Assert: it stops at that step, says why, and does not go on to build
    steps = _steps(report)
    assert code == 1 and report["ok"] is False
    assert list(steps)[-1] == step and steps[step]["ok"] is False
    import re

    assert re.search(message, str(steps[step]["detail"])), steps[step]
    assert all(s["ok"] for name, s in steps.items() if name != step)
    assert "build" not in steps


def test_an_unknown_task_names_the_known_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    # Execute
    code, report = _check(monkeypatch, "nope")
    # Assert
    assert code == 1 and _steps(report)["load"]["ok"] is False
    assert "unknown task 'nope': known tasks are digits" in str(_steps(report)["load"]["detail"])


def test_an_unknown_variant_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # Execute
    monkeypatch.setenv(TASKS_ENV, "")
    result = CliRunner().invoke(app, ["tasks", "check", "digits", "--variant", "int4"])
    # Assert
    assert result.exit_code == 2 and "unknown variant(s) int4" in result.output


@pytest.mark.slow
@needs_build
def test_a_users_standardised_tabular_task_is_ready_and_its_variants_pass_the_gate(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    # Execute
    code, report = _check(monkeypatch, "wine", "--task", f"wine={HERE}:WineTask", "--epochs", "40",
                          "--variant", "fp32", "--variant", "full-int8", "--out", str(tmp_path))
    # Assert: every step, the central accuracy, and both variants gated through the TFLite runtime with files kept
    steps = _steps(report)
    assert code == 0 and report["ok"] is True, report
    assert list(steps) == ["load", "contract", "data", "partition", "train", "build"]
    assert steps["contract"]["figures"]["per_feature"] is True  # type: ignore[index]
    assert steps["train"]["figures"]["heldout_accuracy"] > 0.85  # type: ignore[index,operator]
    variants = {v["variant"]: v for v in report["variants"]}  # type: ignore[attr-defined]
    assert set(variants) == {"fp32", "full-int8"}
    assert variants["fp32"]["published"] is True and variants["fp32"]["accuracy"] > 0.85
    for v in variants.values():
        if v["published"]:
            assert Path(v["path"]).is_file() and Path(v["path"]).with_suffix(".manifest.json").is_file()
        else:
            assert v["reason"]


def test_tasks_list_shows_where_each_task_comes_from(monkeypatch: pytest.MonkeyPatch) -> None:
    # Execute
    monkeypatch.setenv(TASKS_ENV, "")
    result = CliRunner().invoke(app, ["tasks", "list", "--task", f"wine={HERE}:WineTask", "--json"])
    # Assert
    assert result.exit_code == 0, result.output
    entries = {e["name"]: e for e in json.loads(result.stdout)}
    assert entries["digits"]["source"] == "built-in"
    assert entries["wine"] == {"name": "wine", "target": f"{HERE}:WineTask", "source": "EDGEFLEET_TASKS"}
