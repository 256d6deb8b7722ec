"""A custom task with standardised tabular data, as a new user writes it: build → rollout → real agents that
predict on their raw local data as well as the build gate said they would (issue 9, 1b); and a rollout whose
device then predicts garbage on its own data is reported suspect, not as a success.

The model is trained centrally from the task (what a round returns: a state dict), not by a Flower round: the
round machinery is covered by tests/federated/test_flower_round.py and adds nothing to what this test pins, the
path from a task's preprocessing to the devices' inputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from controlplane.app import create_app
from controlplane.demo import AppServer
from controlplane.deployments.schemas import DeploymentCreate, Targets
from controlplane.devices.schemas import DeviceCreate
from controlplane.settings import Settings
from controlplane.statuses import ModelSource
from controlplane.wiring import Fleet
from federated.tasks import TASKS_ENV, ArrayClassificationTask, Dataset
from tests._services import free_port, wait_for
from tests.controlplane.test_rollout_e2e import start_agent, stop

if TYPE_CHECKING:
    import torch

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TASK_NAME = "breast-cancer"
MAX_GAP = 0.02  # on-device accuracy within 2 points of the gate's held-out figure
CYCLES = 5  # labelled inferences over at least this many passes through the held-out set


class BreastCancerTask(ArrayClassificationTask):
    """scikit-learn's bundled breast cancer data (569 x 30 float features, 2 classes), standardised per feature.

    The raw features span 0.001 .. 4254: a device holds them raw, the model takes ``(x - mean) / std``.
    """

    name = TASK_NAME
    num_classes = 2
    input_shape = (30,)
    standardize = True

    def __init__(self) -> None:
        from sklearn.datasets import load_breast_cancer
        from sklearn.model_selection import train_test_split

        bunch = load_breast_cancer()
        x, y = np.asarray(bunch.data), np.asarray(bunch.target, dtype=np.int64)
        pool, held = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=0)
        self._pool, self._heldout = Dataset(x[pool], y[pool]), Dataset(x[held], y[held])

    def train_pool(self) -> Dataset:
        return self._pool

    def heldout(self) -> Dataset:
        return self._heldout

    def model(self) -> torch.nn.Module:
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Linear(30, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))


@pytest.fixture(name="served")
def fx_served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Fleet, str]]:
    monkeypatch.setenv(TASKS_ENV, f"{TASK_NAME}={__name__}:BreastCancerTask")
    fleet = Fleet(Settings(data_dir=tmp_path / "cp", embedded_broker_port=free_port())).start()
    port = free_port()
    with AppServer(create_app(fleet=fleet), port):
        yield fleet, f"http://127.0.0.1:{port}"
    fleet.stop()


def _on_device(fleet: Fleet, device_id: str, version: str) -> dict[str, Any]:
    """Labelled/correct counts, classes and confidence of ``version``'s inferences, from the device's telemetry."""
    labelled = correct = count = 0
    confidence = 0.0
    classes: set[str] = set()
    for record in fleet.devices.telemetry(device_id, since=None, until=None, limit=100_000):
        inference = record.payload.get("inference") or {}
        if inference.get("model_version") != version:
            continue
        labelled += inference.get("labelled", 0)
        correct += inference.get("correct", 0)
        count += inference.get("count", 0)
        confidence += (inference.get("mean_confidence") or 0.0) * inference.get("count", 0)
        classes |= {k for k, v in (inference.get("class_histogram") or {}).items() if v}
    return {"labelled": labelled, "accuracy": correct / labelled if labelled else None, "classes": classes,
            "mean_confidence": confidence / count if count else None}


def _build(fleet: Fleet, tmp_path: Path) -> tuple[str, dict[str, float | None], Dataset]:
    """Train the task's model centrally, build it through the fleet's gate; (version, gate figures, held-out)."""
    task = BreastCancerTask()
    model = task.model()
    task.train(model, task.train_pool(), epochs=40, lr=1e-2, batch_size=32)
    weights = tmp_path / "global.npz"
    np.savez(weights, **{k: v.detach().numpy() for k, v in model.state_dict().items()})
    version = fleet.pipeline.publish(weights=weights, task=TASK_NAME, name="bc-1",
                                     source=ModelSource.ROUND, source_id="1")
    gate = {v.variant: v.accuracy for v in fleet.models.get(version).variants if v.published}
    assert gate and all(a is not None and a > 0.9 for a in gate.values()), gate
    return version, gate, task.heldout()


def _data_file(path: Path, x: Any, y: Any) -> Path:
    np.savez(path, x=x, y=y)
    return path


def test_standardised_custom_task_predicts_on_devices_as_the_gate_measured(
    served: tuple[Fleet, str], tmp_path: Path
) -> None:
    # Prepare: build the task's model, and give each device the raw held-out samples with their labels.
    fleet, url = served
    pi5 = fleet.devices.enroll(DeviceCreate(device_id="pi5", profile="raspberry-pi-5"))
    coral = fleet.devices.enroll(DeviceCreate(device_id="coral", profile="coral-dev-board"))
    version, gate, heldout = _build(fleet, tmp_path)  # the variants the enrolled devices can run
    data = _data_file(tmp_path / "heldout.npz", heldout.x, heldout.y)  # raw float64, as a device logs them
    assert float(np.abs(heldout.x).max()) > 1000.0  # raw, not standardised
    agents = [start_agent(creds, url, tmp_path / creds.device_id, "--data", str(data), "--inference-rate", "100",
                          "--task", TASK_NAME)
              for creds in (pi5, coral)]
    try:
        wait_for(lambda: all(d.online for d in fleet.devices.find()), what="agents online")
        # Execute
        created = fleet.deployments.create(DeploymentCreate(model_version=version, targets=Targets(all=True)))
        wait_for(lambda: fleet.deployments.get(created.id).status != "running", timeout=90, what="rollout done")
        result = fleet.deployments.get(created.id)
        assert result.status == "succeeded", result
        variants = {t.device_id: t.variant for t in result.targets}
        assert variants["coral"] == "full-int8"  # the calibrated variant gets the contract too
        needed = CYCLES * len(heldout)
        for device_id in variants:
            wait_for(lambda d=device_id: _on_device(fleet, d, version)["labelled"] >= needed, timeout=120,
                     what=f"{device_id}: {needed} labelled inferences on {version} (seen: "
                          f"{_on_device(fleet, device_id, version)}, {fleet.devices.get(device_id).reported_state})")
        # Assert: every device is as good as the gate's held-out figure for its variant, and not collapsed.
        for device_id, variant in variants.items():
            seen = _on_device(fleet, device_id, version)
            assert variant is not None
            expected = gate[variant]
            assert expected is not None
            print(f"{device_id} {variant}: on-device {seen['accuracy']:.4f} over {seen['labelled']} labelled, "
                  f"gate {expected:.4f}, mean confidence {seen['mean_confidence']:.3f}")
            assert abs(seen["accuracy"] - expected) <= MAX_GAP, (device_id, variant, seen, expected)
            assert seen["classes"] == {"0", "1"}, seen
        # ... and the watch after the rollout, which has seen these inferences, keeps calling it a success.
        fleet.deployments.step()
        assert fleet.deployments.get(created.id).status == "succeeded"
    finally:
        for agent in agents:
            stop(agent)


def test_a_rollout_whose_device_then_predicts_one_class_is_reported_suspect(
    served: tuple[Fleet, str], tmp_path: Path
) -> None:
    # Prepare: the same model; pi5 logs its features as the task does, coral in other units (x 1000): its
    # self-test passes (the golden sample is the manifest's), its own data then collapses the model.
    fleet, url = served
    pi5 = fleet.devices.enroll(DeviceCreate(device_id="pi5", profile="raspberry-pi-5"))
    coral = fleet.devices.enroll(DeviceCreate(device_id="coral", profile="coral-dev-board"))
    version, _, heldout = _build(fleet, tmp_path)
    good = _data_file(tmp_path / "good.npz", heldout.x, heldout.y)
    other_units = _data_file(tmp_path / "other-units.npz", heldout.x * 1000.0, heldout.y)
    agents = [start_agent(creds, url, tmp_path / creds.device_id, "--data", str(data), "--inference-rate", "100",
                          "--task", TASK_NAME)
              for creds, data in ((pi5, good), (coral, other_units))]
    try:
        wait_for(lambda: all(d.online for d in fleet.devices.find()), what="agents online")
        # Execute
        created = fleet.deployments.create(DeploymentCreate(model_version=version, targets=Targets(all=True)))
        wait_for(lambda: fleet.deployments.get(created.id).status == "suspect", timeout=90,
                 what="the rollout reported suspect")
        # Assert
        result = fleet.deployments.get(created.id)
        targets = {t.device_id: t for t in result.targets}
        assert targets["coral"].status == "suspect"
        assert targets["coral"].reason is not None
        assert "collapsed predictions" in targets["coral"].reason or "far below" in targets["coral"].reason
        assert targets["pi5"].status == "succeeded", targets["pi5"]
        assert result.reason is not None and "coral" in result.reason and "pi5" not in result.reason
        assert fleet.devices.get("coral").reported_state["active_model"] == version  # type: ignore[index]
    finally:
        for agent in agents:
            stop(agent)
