"""Rounds and schedules start from a model version (warm start) instead of relearning from zero."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from litestar.testing import TestClient

from controlplane.app import create_app
from controlplane.auth import Role, create_token
from controlplane.schedules import ScheduleCreate
from controlplane.statuses import ModelSource
from controlplane.wiring import Fleet
from tests._services import fx_fleet, wait_for  # noqa: F401 - fx_fleet
from tests.controlplane.test_build_registry import fx_weights  # noqa: F401 - the trained weights fixture

pytestmark = pytest.mark.integration


@pytest.mark.slow
def test_a_round_s_initial_model_is_validated(fleet: Fleet, weights: Path) -> None:
    # Prepare: a model version of another task, with weights
    fleet.models.start_version("other-1", "not-digits", "round", "1")
    fleet.pipeline.weights_of("other-1").parent.mkdir(parents=True)
    fleet.pipeline.weights_of("other-1").write_bytes(weights.read_bytes())
    fleet.models.start_version("no-weights-1", "digits", "round", "2")
    _, token = create_token(fleet.engine, Role.OPERATOR)
    auth = {"Authorization": f"Bearer {token}"}
    with TestClient(app=create_app(fleet=fleet)) as client:
        # Execute
        unknown = client.post("/api/v1/rounds", headers=auth, json={"initial_model": "round-404"})
        other = client.post("/api/v1/rounds", headers=auth, json={"initial_model": "other-1"})
        empty = client.post("/api/v1/rounds", headers=auth, json={"initial_model": "no-weights-1"})
        bad = client.post("/api/v1/rounds", headers=auth, json={"initial_model": "../etc/passwd"})
        long = client.post("/api/v1/rounds", headers=auth, json={"initial_model": "m" * 65})
        schedule = client.post("/api/v1/schedules", headers=auth, json={
            "cron": "0 2 * * *", "round": {"initial_model": "round-404"}})
    # Assert
    assert unknown.status_code == 400 and "initial_model: no model version 'round-404'" in unknown.text
    assert other.status_code == 400 and "is a model of task 'not-digits', not 'digits'" in other.text
    assert empty.status_code == 400 and "has no stored weights" in empty.text
    for response in (bad, long):
        assert response.status_code == 400 and "initial_model" in response.text, response.text
    assert schedule.status_code == 400 and "round-404" in schedule.text
    assert fleet.rounds.list_all() == []


@pytest.mark.slow
def test_a_schedule_starts_from_the_latest_released_model(fleet: Fleet, weights: Path, tmp_path: Path) -> None:
    """The round's first evaluation (round 0, before any training) is the released model's accuracy, not chance."""
    import torch

    from federated.tasks import get_task
    from tests.controlplane.test_fleet_e2e import stop
    from tests.controlplane.test_round_release import _agents, _round

    # Prepare: two training devices, a released model built from centrally trained weights
    procs = _agents(fleet, tmp_path, with_data=["warm-a", "warm-b"], without_data=[])
    try:
        version = fleet.pipeline.publish(weights=weights, task="digits", name="trained-1",
                                         source=ModelSource.ROUND, source_id="0")
        assert any(v.published for v in fleet.models.get(version).variants)
        task = get_task("digits")
        model = task.model()
        with np.load(weights) as npz:
            model.load_state_dict({k: torch.from_numpy(npz[k]) for k in npz.files})
        expected = float(task.evaluate(model, task.heldout())["accuracy"])
        assert expected > 0.8  # the positive control: a warm start is far from chance (0.1)
        # Execute: a schedule with no initial_model fires once
        fleet.schedules.create(ScheduleCreate(round=_round(), id="warm", interval_s=1, max_runs=1))
        wait_for(lambda: fleet.rounds.list_all(), timeout=30, what="the schedule's round")
        (started,) = fleet.rounds.list_all()
        wait_for(lambda: fleet.rounds.get(started.id).status in ("succeeded", "failed"), timeout=300,
                 what="the round to end")
        # Assert: it started from the released model, at that model's accuracy
        done = fleet.rounds.get(started.id)
        assert done.status == "succeeded", (done.reason, done.skipped)
        assert done.initial_model == "trained-1" and done.config["initial_model"] == "trained-1"
        initial = next(m for m in done.metrics if m["round"] == 0)
        assert initial["accuracy"] == pytest.approx(expected, abs=0.01), done.metrics
    finally:
        for proc in procs.values():
            stop(proc)


@pytest.mark.slow
def test_the_cli_starts_rounds_and_schedules_from_a_model(mosquitto_url: str, tmp_path: Path, weights: Path) -> None:
    from controlplane.cli import app
    from tests.controlplane.test_cli import runner, served

    with served(mosquitto_url, tmp_path) as (fleet, common):
        # Prepare: a registered model version with its weights (as the build keeps them)
        fleet.models.start_version("trained-2", "digits", "round", "2")
        fleet.pipeline.weights_of("trained-2").parent.mkdir(parents=True)
        fleet.pipeline.weights_of("trained-2").write_bytes(weights.read_bytes())
        # Execute
        unknown = runner.invoke(app, ["rounds", "start", "--initial-model", "round-404", *common])
        started = runner.invoke(app, ["rounds", "start", "--rounds", "1", "--initial-model", "trained-2", *common])
        created = runner.invoke(app, ["schedules", "create", "warm", "--interval", "3600", "--initial-model",
                                      "trained-2", *common])
        (stored,) = fleet.schedules.list_all()
        rounds = fleet.rounds.list_all()
    # Assert
    assert unknown.exit_code == 1 and "400" in unknown.output
    assert "initial_model: no model version 'round-404'" in unknown.output
    # no device is enrolled: the round fails at once, but it was asked to start from trained-2
    assert started.exit_code == 1 and "0 eligible device(s)" in started.stdout, started.output
    assert [r.initial_model for r in rounds] == ["trained-2"]
    assert created.exit_code == 0, created.output
    assert stored.round["initial_model"] == "trained-2"
