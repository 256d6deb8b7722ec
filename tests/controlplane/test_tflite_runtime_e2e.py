"""A real agent on tflite-runtime 2.14 (the Raspberry Pi 4 class's runtime), started from the device-like
environment ``make test`` builds (no LiteRT there to fall back to): enrolment, telemetry, then a signed rollout
in which it receives only a variant that runtime computes correctly, installs it, passes its self-test and reports
the new model on tflite-runtime."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane.app import create_app
from controlplane.demo import AppServer
from controlplane.deployments.schemas import DeploymentCreate, Targets
from controlplane.deployments.service import choose_variant
from controlplane.devices.schemas import DeviceCreate, DeviceEnrolled
from controlplane.settings import Settings
from controlplane.statuses import CommandStatus, DeploymentStatus, ModelSource, TargetStatus
from controlplane.wiring import Fleet
from firmware_profiles import ModelVariant, RuntimeName, get_profile, variant_unsupported
from tests._services import free_port, wait_for
from tests.controlplane.test_build_registry import fx_weights  # noqa: F401 - the trained weights fixture
from tests.processes import stop_process

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]
PI4 = "raspberry-pi-4"
LABELLED = 500  # labelled inferences on the new model before its on-device accuracy is judged
MAX_GAP = 0.02  # on-device accuracy at most this far below the gate's figure for the variant


@pytest.fixture(name="served")
def fx_served(tmp_path: Path) -> Iterator[tuple[Fleet, str]]:
    fleet = Fleet(Settings(data_dir=tmp_path / "cp", embedded_broker_port=free_port())).start()
    port = free_port()
    with AppServer(create_app(fleet=fleet), port):
        yield fleet, f"http://127.0.0.1:{port}"
    fleet.stop()


def _start_agent(python: str, creds: DeviceEnrolled, controlplane: str, data_dir: Path,
                 log: Path) -> subprocess.Popen[bytes]:
    """``edgefleet agent run`` (the console script's code path) in the given environment, with this checkout's
    code."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [python, "-m", "controlplane._entry", "agent", "run", "--device-id", creds.device_id, "--profile", creds.profile,
             "--broker", creds.broker_url, "--data-dir", str(data_dir), "--controlplane", controlplane,
             "--signing-key", creds.signing_public_key, "--telemetry-interval", "1", "--inference-rate", "100",
             "--log-level", "info"],
            cwd=REPO_ROOT, env=dict(os.environ, EDGEFLEET_MQTT_PASSWORD=creds.mqtt_password, PYTHONPATH=str(REPO_ROOT)),
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )


def _inference(fleet: Fleet, device_id: str, version: str) -> dict[str, Any]:
    """Inference totals of ``version`` from the device's stored telemetry."""
    count = labelled = correct = errors = 0
    for record in fleet.devices.telemetry(device_id, since=None, until=None, limit=100_000):
        inference = record.payload.get("inference") or {}
        if inference.get("model_version") == version:
            count += inference.get("count", 0)
            labelled += inference.get("labelled", 0)
            correct += inference.get("correct", 0)
            errors += inference.get("errors", 0)
    return {"count": count, "labelled": labelled, "errors": errors,
            "accuracy": correct / labelled if labelled else None}


def test_a_pi4_agent_on_tflite_runtime_enrols_reports_and_installs_only_what_it_computes_correctly(
    served: tuple[Fleet, str], weights: Path, tflite_python: str, tmp_path: Path
) -> None:
    # Prepare: a Pi 4 (tflite-runtime 2.14) and a Pi 5 (LiteRT, never started here) enrolled, so the build also
    # publishes dynamic-int8, the variant tflite-runtime 2.14 computes wrongly without an error.
    fleet, url = served
    pi4 = fleet.devices.enroll(DeviceCreate(device_id="pi4", profile=PI4))
    fleet.devices.enroll(DeviceCreate(device_id="pi5", profile="raspberry-pi-5"))
    log = tmp_path / "pi4-agent.log"
    agent = _start_agent(tflite_python, pi4, url, tmp_path / "pi4", log)

    def state() -> dict[str, Any]:
        return fleet.devices.get("pi4").reported_state or {}

    def why() -> str:
        return f"state {state()}; agent log:\n{log.read_text(errors='replace')[-3000:]}"

    try:
        # Execute (1): enrolment and telemetry on the starter model
        wait_for(lambda: fleet.devices.get("pi4").online and state().get("runtime") is not None, timeout=60,
                 what=f"the Pi 4 agent online with its state ({why()})")
        starter = state()["active_model"]
        wait_for(lambda: _inference(fleet, "pi4", starter)["count"] > 0, timeout=30,
                 what=f"telemetry with inference on the starter model ({why()})")

        # Assert (1): the device runs tflite-runtime 2.14, not LiteRT, and predicts
        assert (state()["runtime"], state()["runtime_version"], state()["profile"]) == ("tflite-runtime", "2.14.0",
                                                                                     PI4)
        assert starter.startswith("starter-")
        assert _inference(fleet, "pi4", starter)["errors"] == 0

        # Execute (2): build, then a signed rollout to the Pi 4
        version = fleet.pipeline.publish(weights=weights, task="digits", name="pi4-r1",
                                         source=ModelSource.ROUND, source_id="1")
        published = fleet.models.published(version)
        created = fleet.deployments.create(DeploymentCreate(model_version=version,
                                                            targets=Targets(device_ids=["pi4"])))
        wait_for(lambda: fleet.deployments.get(created.id).status != DeploymentStatus.RUNNING, timeout=120,
                 what=f"the rollout done ({why()})")
        wait_for(lambda: state().get("active_model") == version, timeout=30,
                 what=f"the Pi 4 reporting {version} ({why()})")
        wait_for(lambda: _inference(fleet, "pi4", version)["labelled"] >= LABELLED, timeout=60,
                 what=f"{LABELLED} labelled inferences on {version} ({why()})")

        # Assert (2): the variant the profile's rules choose, never dynamic-int8 (published, but wrong on
        # tflite-runtime 2.14); installed after a passing self-test on tflite-runtime; reported by the device.
        result = fleet.deployments.get(created.id)
        assert result.status == DeploymentStatus.SUCCEEDED, result
        (target,) = result.targets
        assert "dynamic-int8" in published
        assert variant_unsupported(RuntimeName.TFLITE_RUNTIME, "2.14.0", ModelVariant.DYNAMIC_INT8) is not None
        assert target.variant != "dynamic-int8"
        assert target.variant == choose_variant(get_profile(PI4), published)[0]
        assert target.status == TargetStatus.SUCCEEDED, target
        assert target.command_id is not None
        command = fleet.devices.get_command("pi4", target.command_id)
        assert command.status == CommandStatus.OK, command
        assert command.result is not None
        assert command.result["runtime"] == "tflite-runtime 2.14.0"
        figures = command.result["self_test"]
        assert figures["max_abs_diff"] <= figures["tolerance"], figures
        assert (state()["runtime"], state()["runtime_version"]) == ("tflite-runtime", "2.14.0")
        assert (state()["active_model"], state()["active_variant"]) == (version, target.variant)

        # ... and it predicts on its own data as well as the build gate measured that variant
        seen = _inference(fleet, "pi4", version)
        gate = {v.variant: v.accuracy for v in fleet.models.get(version).variants}[target.variant]
        assert gate is not None
        assert seen["errors"] == 0
        assert seen["accuracy"] >= gate - MAX_GAP, (seen, gate, target.variant)
    finally:
        stop_process(agent, timeout=15)
