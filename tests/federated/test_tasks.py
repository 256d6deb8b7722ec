"""federated.tasks: the task registry, the digits task, Dirichlet partitions, training with and without FedProx."""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from federated.tasks import (
    TASKS_ENV,
    Dataset,
    Task,
    TaskNotFound,
    TaskRegistry,
    dirichlet_partition,
    get_task,
    input_contract_of,
)
from federated.tasks.digits import DigitsTask

REPO_ROOT = Path(__file__).resolve().parents[2]
# tests/federated/_canary.py: importing it or calling touch() writes to $EDGEFLEET_TEST_CANARY (a harmless os:abort)
CANARY, CANARY_ENV = "tests.federated._canary:touch", "EDGEFLEET_TEST_CANARY"
_MISSING = [m for m in ("torch", "sklearn") if importlib.util.find_spec(m) is None]
needs_training = pytest.mark.skipif(
    bool(_MISSING), reason=f"needs the train extra ({', '.join(_MISSING)} missing)"
)


@pytest.fixture(name="task", scope="module")
def fx_task() -> DigitsTask:
    return DigitsTask()


def _rows(ds: Dataset) -> collections.Counter[bytes]:
    """The samples (x and y together) as a multiset: partitions must hold each exactly once."""
    return collections.Counter(
        row.tobytes() + bytes([label]) for row, label in zip(ds.x, ds.y.astype(np.uint8), strict=True)
    )


def _label_share(ds: Dataset, num_classes: int) -> np.ndarray:
    return np.bincount(ds.y, minlength=num_classes) / len(ds)


# ------------------------------------------------------------------------------------------------- registry


def test_import_does_not_pull_torch() -> None:
    # Execute
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                """
                import sys
                import federated.tasks, federated.tasks.digits, federated.build, federated.signing
                print(sorted(m for m in sys.modules if m.split(".")[0] in {"torch", "litert_torch", "sklearn"}))
                """
            ),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    # Assert
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_builtin_task_by_name() -> None:
    # Execute
    task = get_task("digits")

    # Assert
    assert isinstance(task, DigitsTask)
    assert isinstance(task, Task)
    assert (task.name, task.num_classes, task.input_shape, task.input_scale) == ("digits", 10, (64,), 1 / 16)


def test_task_by_dotted_path() -> None:
    # Execute
    task = get_task("federated.tasks.digits:DigitsTask")

    # Assert
    assert isinstance(task, DigitsTask)


@pytest.fixture(name="canary")
def fx_canary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The file tests/federated/_canary.py writes when it is imported or called."""
    path = tmp_path / "canary"
    monkeypatch.setenv(CANARY_ENV, str(path))
    monkeypatch.delitem(sys.modules, "tests.federated._canary", raising=False)
    return path


@pytest.mark.parametrize(
    "name",
    ["nope", "no_such_module_xyz:Task", "federated.tasks.digits:Missing", "collections:OrderedDict", "../evil:Task",
     "os:abort", CANARY, "x" * 10_000],
)
def test_an_unregistered_name_is_unknown_and_lists_the_known_tasks(name: str) -> None:
    # Execute / Assert
    with pytest.raises(TaskNotFound, match=r"unknown task .*: known tasks are digits \(register others with "
                                           r"EDGEFLEET_TASKS or the 'edgefleet.tasks' entry point group\)"):
        get_task(name)


def test_a_dotted_path_in_a_task_name_is_never_imported_or_called(canary: Path) -> None:
    # Execute: before the registry this imported the module and called touch() (and "os:abort" killed the
    # process that resolved it: the control plane, the ServerApp, a device's ClientApp, the burst worker).
    with pytest.raises(TaskNotFound, match="unknown task"):
        get_task(CANARY)

    # Assert
    assert not canary.exists(), canary.read_text()
    assert "tests.federated._canary" not in sys.modules


def test_allow_listed_task_by_name_and_by_its_target(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    monkeypatch.setenv(TASKS_ENV, "tiny=federated.tasks.digits:DigitsTask, tests.federated.test_tasks:TinyTask")

    # Execute
    by_name = get_task("tiny")
    by_bare_target = get_task("tests.federated.test_tasks:TinyTask")
    registry = TaskRegistry.from_env()

    # Assert
    assert isinstance(by_name, DigitsTask)
    assert isinstance(by_bare_target, TinyTask) and by_bare_target.name == "tiny-digits"
    assert registry.names() == ["digits", "tests.federated.test_tasks:TinyTask", "tiny"]
    assert [e.source for e in registry] == ["built-in", "EDGEFLEET_TASKS", "EDGEFLEET_TASKS"]


@pytest.mark.parametrize(
    ("allow_list", "message"),
    [
        ("bad name=federated.tasks.digits:DigitsTask", "the target must be"),
        ("x=not a target", "the target must be 'package.module:Class'"),
        ("x=os.path", "the target must be 'package.module:Class'"),
        ("../evil=federated.tasks.digits:DigitsTask", "a task name is 1-64 letters"),
        ("digits=tests.federated.test_tasks:TinyTask", ("task 'digits' is already registered as "
                                                      "federated.tasks.digits:DigitsTask \\(built-in\\)")),
        ("a=federated.tasks.digits:DigitsTask,a=tests.federated.test_tasks:TinyTask", "task 'a' is already"),
    ],
)
def test_a_malformed_allow_list_is_refused_with_the_entry(allow_list: str, message: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    monkeypatch.setenv(TASKS_ENV, allow_list)

    # Execute / Assert: at start-up (from_env), and by every resolution in a process started with it
    with pytest.raises(ValueError, match=f"EDGEFLEET_TASKS: .*{message}"):
        TaskRegistry.from_env()
    with pytest.raises(TaskNotFound, match="EDGEFLEET_TASKS: "):
        get_task("digits")


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("no_such_module_xyz:Task", "task 'broken': cannot import module 'no_such_module_xyz'"),
        ("federated.tasks.digits:Missing", "task 'broken': module 'federated.tasks.digits' has no 'Missing'"),
        ("collections:OrderedDict", "task 'broken': collections:OrderedDict is not a Task \\(missing name, "),
        ("tests.federated.test_tasks:BrokenTask", ("task 'broken': .*BrokenTask\\(\\) failed: "
                                                  "FileNotFoundError: no /srv/data.npz")),
    ],
)
def test_a_registered_task_that_does_not_load_is_task_not_found(target: str, message: str) -> None:
    # Prepare
    registry = TaskRegistry.load(f"broken={target}", with_entry_points=False)

    # Execute / Assert
    with pytest.raises(TaskNotFound, match=message):
        registry.get("broken")


def test_entry_point_tasks_are_registered(tmp_path: Path) -> None:
    # Prepare: an installed distribution (its metadata on sys.path) declaring an edgefleet.tasks entry point
    dist = tmp_path / "site" / "vibration_tasks-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vibration-tasks\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[edgefleet.tasks]\nvibration = federated.tasks.digits:DigitsTask\n"
        "digits = tests.federated.test_tasks:TinyTask\n")
    code = textwrap.dedent(
        """
        import json
        from federated.tasks import TaskRegistry, get_task
        print(json.dumps([[e.name, e.target, e.source] for e in TaskRegistry.from_env()]))
        print(type(get_task("vibration")).__name__, type(get_task("digits")).__name__)
        """
    )

    # Execute
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(REPO_ROOT)])},
    )

    # Assert: the entry point is a task; one that would rebind a built-in is skipped with a warning
    assert result.returncode == 0, result.stderr
    entries, classes = result.stdout.strip().splitlines()
    assert json.loads(entries) == [["digits", "federated.tasks.digits:DigitsTask", "built-in"],
                                   ["vibration", "federated.tasks.digits:DigitsTask",
                                    "entry point vibration-tasks"]]
    assert classes == "DigitsTask DigitsTask"
    assert "the name is taken by federated.tasks.digits:DigitsTask (built-in): skipped" in result.stderr


def test_the_clientapp_resolves_the_run_configs_task_through_the_registry(canary: Path) -> None:
    # Prepare: what a device's ClientApp receives: a run config naming the task (any SuperLink client sets it)
    pytest.importorskip("flwr")
    pytest.importorskip("torch")
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.common import Metadata

    from federated.flower import client_app

    context = Context(run_id=1, node_id=1, node_config={"device-id": "pi-1", "data-path": "/nonexistent"},
                      state=RecordDict(), run_config={"task": CANARY})
    metadata = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                        group_id="1", created_at=time.time(), ttl=60.0, message_type="train")
    message = Message(content=RecordDict({"config": ConfigRecord({})}), metadata=metadata)  # type: ignore[call-overload]

    # Execute / Assert
    with pytest.raises(TaskNotFound, match="unknown task"):
        client_app._prepare(message, context)
    assert not canary.exists()


@needs_training
@pytest.mark.slow
def test_the_burst_worker_resolves_the_specs_task_through_the_registry(canary: Path, tmp_path: Path) -> None:
    # Prepare: a job spec as a Ray/local backend hands it to the worker process
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"job_id": "7", "kind": "finetune", "task": CANARY, "epochs": 1}))

    # Execute
    result = subprocess.run(
        [sys.executable, "-m", "federated.burst.worker", "--spec", str(spec), "--out-dir", str(tmp_path / "out")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False,
    )

    # Assert
    assert result.returncode == 1, result.stderr
    outcome = json.loads((tmp_path / "out" / "result.json").read_text())
    assert outcome["status"] == "failed" and outcome["error"].startswith("TaskNotFound: unknown task"), outcome
    assert not canary.exists()


class TinyTask(DigitsTask):
    """A user-style task for the registry tests."""

    name = "tiny-digits"


class BrokenTask(DigitsTask):
    def __init__(self) -> None:
        raise FileNotFoundError("no /srv/data.npz")


# ------------------------------------------------------------------------------------------ input contract


class _WineTask(DigitsTask):
    """Tabular: scikit-learn's bundled wine data (13 features on scales from 0.1 to 1680), standardised."""

    name = "wine"
    num_classes = 3
    input_shape = (13,)
    standardize = True

    def train_pool(self) -> Dataset:
        from sklearn.datasets import load_wine

        bunch = load_wine()
        return Dataset(np.asarray(bunch.data)[::2], np.asarray(bunch.target, dtype=np.int64)[::2])

    def heldout(self) -> Dataset:
        from sklearn.datasets import load_wine

        bunch = load_wine()
        return Dataset(np.asarray(bunch.data)[1::2], np.asarray(bunch.target, dtype=np.int64)[1::2])


@needs_training
def test_standardize_declares_per_feature_mean_and_std_of_the_training_pool() -> None:
    # Prepare
    task = _WineTask()
    pool = task.train_pool()

    # Execute
    contract = task.input_contract()
    model_input = pool.model_input(contract)

    # Assert: (x - mean) / std per feature, as the devices will compute it from their raw samples
    assert contract.shape == [13] and len(contract.scale) == len(contract.offset) == 13
    assert contract.source.startswith("standardised on the training pool")
    np.testing.assert_allclose(model_input.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(model_input.std(axis=0), 1.0, atol=1e-4)
    assert task.calibration_data(8).std() == pytest.approx(1.0, abs=0.5)  # calibrated on model input
    assert task.input_contract() is contract  # computed once


def test_digits_keeps_its_scale_through_the_contract(task: DigitsTask) -> None:
    # Execute
    contract = input_contract_of(task)

    # Assert
    assert (contract.scale, contract.offset, contract.shape, contract.dtype) == ([1 / 16], [0.0], [64], "float32")
    raw = task.heldout().x
    np.testing.assert_array_equal(task.heldout().model_input(contract),
                                  (raw.astype(np.float32) * np.float32(1 / 16)).astype(np.float32))


def test_a_protocol_only_task_without_input_contract_is_read_as_input_scale() -> None:
    # Prepare: a Task that predates input_contract(): only the members of the old protocol
    class Old:
        name, num_classes, input_shape, input_scale = "old", 2, (3,), 0.5

    # Execute
    contract = input_contract_of(Old())  # type: ignore[arg-type]

    # Assert
    assert (contract.scale, contract.shape) == ([0.5], [3])


# ---------------------------------------------------------------------------------------------------- digits


@needs_training
def test_heldout_is_the_starters_stratified_20_percent(task: DigitsTask) -> None:
    # Prepare
    from sklearn.datasets import load_digits

    all_y = np.asarray(load_digits().target)

    # Execute
    pool, heldout = task.train_pool(), task.heldout()

    # Assert
    assert len(pool) + len(heldout) == len(all_y) == 1797
    assert len(heldout) == 360
    assert pool.x.dtype == np.uint8 and pool.x.max() <= 16
    assert _rows(pool) + _rows(heldout) == _rows(Dataset(load_digits().data.astype(np.uint8), all_y))
    # Stratified: every class keeps (about) its share in the held-out set.
    share = _label_share(heldout, 10) - np.bincount(all_y, minlength=10) / len(all_y)
    assert np.abs(share).max() < 0.01


@needs_training
def test_partition_is_non_iid_and_covers_every_sample_once(task: DigitsTask) -> None:
    # Prepare
    pool = task.train_pool()
    global_share = _label_share(pool, 10)

    # Execute
    parts = task.partition(5, alpha=0.3, seed=1)

    # Assert
    assert len(parts) == 5
    assert sum(len(p) for p in parts) == len(pool)
    assert sum((_rows(p) for p in parts), collections.Counter()) == _rows(pool)
    assert min(len(p) for p in parts) >= task.min_partition_samples
    # Non-IID: the clients' label distributions are far from the pool's (total variation distance).
    distances = [0.5 * np.abs(_label_share(p, 10) - global_share).sum() for p in parts]
    assert np.mean(distances) > 0.3, distances


@needs_training
def test_large_alpha_is_close_to_iid(task: DigitsTask) -> None:
    # Prepare
    global_share = _label_share(task.train_pool(), 10)

    # Execute
    parts = task.partition(4, alpha=1000.0, seed=1)

    # Assert
    distances = [0.5 * np.abs(_label_share(p, 10) - global_share).sum() for p in parts]
    assert max(distances) < 0.1, distances


@needs_training
def test_partition_is_deterministic_per_seed(task: DigitsTask) -> None:
    # Execute
    first, again, other = (task.partition(3, alpha=0.5, seed=s) for s in (7, 7, 8))

    # Assert
    assert all(
        np.array_equal(a.y, b.y) and np.array_equal(a.x, b.x) for a, b in zip(first, again, strict=True)
    )
    assert not all(np.array_equal(a.y, b.y) for a, b in zip(first, other, strict=True))


def test_dirichlet_partition_gives_every_client_the_minimum() -> None:
    # Prepare: very skewed labels and a tiny alpha make small partitions likely.
    labels = np.repeat(np.arange(10), 50)

    # Execute
    parts = dirichlet_partition(labels, 20, alpha=0.1, seed=0, min_samples=5)

    # Assert
    assert min(len(p) for p in parts) >= 5
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))


@pytest.mark.parametrize(
    ("n_clients", "alpha", "min_samples", "message"),
    [
        (0, 1.0, 1, "n_clients must be positive"),
        (2, 0.0, 1, "alpha must be a positive number"),
        (2, float("nan"), 1, "alpha must be a positive number"),
        (11, 1.0, 10, "cannot give 11 clients at least 10"),
    ],
)
def test_dirichlet_partition_rejects_impossible_requests(
    n_clients: int, alpha: float, min_samples: int, message: str
) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=message):
        dirichlet_partition(np.zeros(100, dtype=np.int64), n_clients, alpha, seed=0, min_samples=min_samples)


@needs_training
def test_partition_file_round_trip(task: DigitsTask, tmp_path: Path) -> None:
    # Prepare
    part = task.partition(3, alpha=0.5, seed=0)[0]
    path = tmp_path / "device-1" / "partition.npz"

    # Execute
    task.write_partition(part, path)
    loaded = task.load_partition(path)

    # Assert
    assert loaded.x.dtype == np.uint8
    assert np.array_equal(loaded.x, part.x) and np.array_equal(loaded.y, part.y)
    assert [p.name for p in path.parent.iterdir()] == ["partition.npz"]  # no temporary file left


def test_load_partition_rejects_another_tasks_data(task: DigitsTask, tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "wrong.npz"
    np.savez(path, x=np.zeros((4, 32), dtype=np.uint8), y=np.zeros(4, dtype=np.int64))

    # Execute / Assert
    with pytest.raises(ValueError, match=r"samples of shape \(32,\)"):
        task.load_partition(path)


# -------------------------------------------------------------------------------------------------- training


@needs_training
def test_model_is_the_starter_mlp_and_seeded(task: DigitsTask) -> None:
    # Execute
    first, second = task.model(), task.model()

    # Assert
    shapes = {k: tuple(v.shape) for k, v in first.state_dict().items()}
    assert shapes == {"0.weight": (64, 64), "0.bias": (64,), "2.weight": (10, 64), "2.bias": (10,)}
    assert all(
        np.array_equal(a.numpy(), b.numpy())
        for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True)
    )
    assert task.sample_input().shape == (1, 64) and task.sample_input().dtype == np.float32
    calibration = task.calibration_data(100)
    assert calibration.shape == (100, 64) and calibration.dtype == np.float32 and calibration.max() <= 1.0


@needs_training
def test_training_a_few_epochs_beats_085_on_heldout(task: DigitsTask) -> None:
    # Prepare
    model = task.model()
    before = task.evaluate(model, task.heldout())

    # Execute
    trained = task.train(model, task.train_pool(), epochs=5, lr=1e-2, batch_size=64)
    after = task.evaluate(model, task.heldout())

    # Assert
    assert before["accuracy"] < 0.3
    assert after["accuracy"] > 0.85
    assert after["loss"] < before["loss"]
    assert trained["num_examples"] == len(task.train_pool())
    assert after["num_examples"] == 360
    assert 0.0 < trained["loss"] < 1.0


@needs_training
def test_fedprox_term_pulls_the_update_towards_the_global_model(task: DigitsTask) -> None:
    # Prepare: one non-IID client; the same global model and data for both runs.
    data = task.partition(5, alpha=0.3, seed=3)[0]
    global_model = task.model()
    global_arrays = [v.numpy().copy() for v in global_model.state_dict().values()]

    def local_update(mu: float, global_params: list[np.ndarray] | None) -> list[np.ndarray]:
        model = task.model()
        model.load_state_dict(global_model.state_dict())
        task.train(model, data, epochs=3, lr=1e-2, batch_size=32, proximal_mu=mu, global_params=global_params)
        return [v.detach().numpy().copy() for v in model.state_dict().values()]

    def distance(arrays: list[np.ndarray]) -> float:
        return float(np.sqrt(sum(((a - g) ** 2).sum() for a, g in zip(arrays, global_arrays, strict=True))))

    # Execute
    plain = local_update(0.0, None)
    prox = local_update(1.0, global_arrays)
    prox_implicit_anchor = local_update(1.0, None)  # None: anchored at the weights it starts from

    # Assert
    assert not all(np.array_equal(a, b) for a, b in zip(plain, prox, strict=True))
    assert distance(prox) < 0.8 * distance(plain)
    assert all(np.array_equal(a, b) for a, b in zip(prox, prox_implicit_anchor, strict=True))


@needs_training
def test_fedprox_rejects_global_params_of_another_model(task: DigitsTask) -> None:
    # Prepare
    model = task.model()
    data = task.partition(2, alpha=1.0, seed=0)[0]

    # Execute / Assert
    with pytest.raises(ValueError, match="global_params has 1 arrays"):
        task.train(
            model, data, epochs=1, lr=1e-2, batch_size=32, proximal_mu=0.1, global_params=[np.zeros(3)]
        )


@needs_training
def test_centralized_baseline(task: DigitsTask) -> None:
    # Execute
    accuracy = task.centralized_baseline(epochs=10)

    # Assert
    assert accuracy > 0.93
