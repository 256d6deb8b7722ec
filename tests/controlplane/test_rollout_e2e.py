"""Build → sign → roll out to real agents, which verify, self-test, swap and report (or refuse and keep)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane.app import create_app
from controlplane.demo import AppServer
from controlplane.deployments.schemas import DeploymentCreate, Targets
from controlplane.devices.schemas import CommandCreate, DeviceCreate, DeviceEnrolled
from controlplane.settings import Settings
from controlplane.statuses import ModelSource
from controlplane.wiring import Fleet
from tests._services import free_port, wait_for
from tests.controlplane.test_build_registry import fx_weights  # noqa: F401 - the trained weights fixture

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(name="served")
def fx_served(tmp_path: Path) -> Iterator[tuple[Fleet, str]]:
    fleet = Fleet(Settings(data_dir=tmp_path / "cp", embedded_broker_port=free_port())).start()
    port = free_port()
    with AppServer(create_app(fleet=fleet), port):
        yield fleet, f"http://127.0.0.1:{port}"
    fleet.stop()


def start_agent(creds: DeviceEnrolled, controlplane: str, data_dir: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "controlplane._entry", "agent", "run", "--device-id", creds.device_id,
         "--profile", creds.profile, "--broker", creds.broker_url, "--data-dir", str(data_dir),
         "--controlplane", controlplane, "--signing-key", creds.signing_public_key, "--telemetry-interval", "1",
         "--log-level", "warning", *extra],
        env=dict(os.environ, EDGEFLEET_MQTT_PASSWORD=creds.mqtt_password),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_rollout_reaches_each_device_class_with_its_best_variant(served: tuple[Fleet, str], weights: Path,
                                                               tmp_path: Path) -> None:
    # Prepare
    fleet, url = served
    pi5 = fleet.devices.enroll(DeviceCreate(device_id="pi5", profile="raspberry-pi-5"))
    coral = fleet.devices.enroll(DeviceCreate(device_id="coral", profile="coral-dev-board"))
    version = fleet.pipeline.publish(weights=weights, task="digits", name="r1",
                                     source=ModelSource.ROUND, source_id="1")
    agents = [start_agent(pi5, url, tmp_path / "pi5"), start_agent(coral, url, tmp_path / "coral")]
    try:
        wait_for(lambda: all(d.online for d in fleet.devices.find()), what="agents online")
        # Execute
        created = fleet.deployments.create(DeploymentCreate(model_version=version, targets=Targets(all=True),
                                                            waves=[50.0, 100.0]))
        wait_for(lambda: fleet.deployments.get(created.id).status != "running", timeout=90, what="rollout done")
        # Assert
        result = fleet.deployments.get(created.id)
        assert result.status == "succeeded", result
        variants = {t.device_id: t.variant for t in result.targets}
        assert variants["coral"] == "full-int8"
        for device_id in ("pi5", "coral"):
            wait_for(lambda d=device_id: (fleet.devices.get(d).reported_state or {}).get("active_model") == version,
                     what=f"{device_id} reports the new model")
            assert fleet.devices.get(device_id).reported_state["active_variant"] == variants[device_id]  # type: ignore[index]
    finally:
        for agent in agents:
            stop(agent)


def test_tampered_artifact_is_refused_and_the_old_model_kept(served: tuple[Fleet, str], weights: Path,
                                                            tmp_path: Path) -> None:
    # Prepare: flip a byte of the stored artifact after it was signed
    fleet, url = served
    creds = fleet.devices.enroll(DeviceCreate(device_id="pi5", profile="raspberry-pi-5"))
    version = fleet.pipeline.publish(weights=weights, task="digits", name="r-bad",
                                     source=ModelSource.ROUND, source_id="2")
    for variant in fleet.models.published(version).values():
        assert variant.path is not None
        data = bytearray(Path(variant.path).read_bytes())
        data[len(data) // 2] ^= 0xFF
        Path(variant.path).write_bytes(bytes(data))
    agent = start_agent(creds, url, tmp_path / "pi5")
    try:
        wait_for(lambda: fleet.devices.get("pi5").online, what="agent online")
        before = (fleet.devices.get("pi5").reported_state or {}).get("active_model")
        # Execute
        created = fleet.deployments.create(DeploymentCreate(model_version=version, targets=Targets(all=True)))
        wait_for(lambda: fleet.deployments.get(created.id).status != "running", timeout=60, what="rollout done")
        # Assert
        result = fleet.deployments.get(created.id)
        assert result.status == "halted"
        assert "sha256" in (result.targets[0].reason or ""), result.targets[0].reason
        assert (fleet.devices.get("pi5").reported_state or {}).get("active_model") == before
    finally:
        stop(agent)


def test_devices_refuse_what_is_not_for_them_and_the_records_say_why(served: tuple[Fleet, str], weights: Path,
                                                                     tmp_path: Path) -> None:
    # Prepare: two Pi 5s, one of them running another task; an operator who names a download elsewhere
    fleet, url = served
    pi5 = fleet.devices.enroll(DeviceCreate(device_id="pi5", profile="raspberry-pi-5"))
    other = fleet.devices.enroll(DeviceCreate(device_id="pi5-kws", profile="raspberry-pi-5"))
    version = fleet.pipeline.publish(weights=weights, task="digits", name="r3",
                                     source=ModelSource.ROUND, source_id="3")
    agents = [start_agent(pi5, url, tmp_path / "pi5"), start_agent(other, url, tmp_path / "kws", "--task", "kws")]
    try:
        wait_for(lambda: all(d.online for d in fleet.devices.find()), what="agents online")
        # Execute: a rollout to both; then a deploy_model command naming the release on another server (to the
        # device that does not run it: the one that does would answer "already active" without downloading)
        created = fleet.deployments.create(DeploymentCreate(model_version=version, targets=Targets(all=True),
                                                            failure_threshold=1.0))
        wait_for(lambda: fleet.deployments.get(created.id).status != "running", timeout=90, what="rollout done")
        result = fleet.deployments.get(created.id)
        sent = {t.device_id: t for t in result.targets}["pi5"]
        elsewhere = f"http://127.0.0.1:{free_port()}"
        replay = fleet.devices.send_command("pi5-kws", CommandCreate(kind="deploy_model", wait_s=30, args={
            "model_version": version, "variant": sent.variant, "deployment_id": created.id,
            "manifest_url": f"{elsewhere}/api/v1/deployments/{created.id}/variants/{sent.variant}/manifest",
            "artifact_url": f"{elsewhere}/api/v1/deployments/{created.id}/variants/{sent.variant}/artifact"}))

        # Assert: the deployment record shows each device's outcome and reason; the device kept its model
        by_device = {t.device_id: t for t in result.targets}
        assert by_device["pi5"].status == "succeeded", by_device["pi5"]
        assert by_device["pi5-kws"].status == "failed"
        assert by_device["pi5-kws"].reason == "the release is a 'digits' model, this device runs task 'kws'"
        assert (fleet.devices.get("pi5-kws").reported_state or {}).get("active_model") != version
        assert replay.status == "error"
        assert f"is not on the control plane this device was enrolled with ({url})" in (replay.reason or "")
        assert (fleet.devices.get("pi5").reported_state or {}).get("active_model") == version
        assert (fleet.devices.get("pi5-kws").reported_state or {}).get("active_model") != version
    finally:
        for agent in agents:
            stop(agent)
