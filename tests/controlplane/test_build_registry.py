"""A trained model is built into gated, signed TFLite variants and served for devices to verify."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from litestar.testing import TestClient

from agent.manifest import decode_signed, file_sha256, verify_signature
from controlplane.app import create_app
from controlplane.auth import Role, create_token
from controlplane.devices.schemas import DeviceCreate
from controlplane.statuses import ModelSource
from controlplane.wiring import Fleet
from tests._services import fleet_settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(name="fleet")
def fx_fleet(mosquitto_url: str, tmp_path: Path) -> Iterator[Fleet]:
    settings = fleet_settings(mosquitto_url, tmp_path / "cp")
    fleet = Fleet(settings).start()
    yield fleet
    fleet.stop()


@pytest.fixture(name="weights", scope="module")
def fx_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A digits model trained centrally for a few epochs, saved as a state_dict .npz (what a round returns)."""
    from federated.tasks import get_task

    task = get_task("digits")
    model = task.model()
    task.train(model, task.train_pool(), epochs=20, lr=0.01, batch_size=32)
    path = tmp_path_factory.mktemp("weights") / "global.npz"
    np.savez(path, **{k: v.detach().numpy() for k, v in model.state_dict().items()})
    return path


def test_build_registers_only_what_the_fleet_can_run(fleet: Fleet, weights: Path) -> None:
    # Prepare: a fleet of Pi 4s (tflite-runtime 2.14: fp32, fp16, full-int8) and Corals (full-int8)
    fleet.devices.enroll(DeviceCreate(device_id="pi4", profile="raspberry-pi-4"))
    fleet.devices.enroll(DeviceCreate(device_id="coral", profile="coral-dev-board"))
    # Execute
    version = fleet.pipeline.publish(weights=weights, task="digits", name="v-test",
                                     source=ModelSource.ROUND, source_id="7")
    model = fleet.models.get(version)
    # Assert
    assert model.status == "ready"
    variants = {v.variant: v for v in model.variants}
    assert set(variants) == {"fp32", "fp16", "full-int8"}  # no dynamic-int8: nobody here can run it
    assert all(v.published for v in variants.values()), [v.reason for v in variants.values()]
    assert variants["fp32"].accuracy is not None and variants["fp32"].accuracy > 0.85
    assert abs((variants["full-int8"].accuracy or 0) - variants["fp32"].accuracy) <= 0.01
    assert (variants["full-int8"].size_bytes or 0) < (variants["fp32"].size_bytes or 0)


def test_served_manifest_verifies_with_the_enrolment_key(fleet: Fleet, weights: Path) -> None:
    # Prepare
    creds = fleet.devices.enroll(DeviceCreate(device_id="pi5", profile="raspberry-pi-5"))
    version = fleet.pipeline.publish(weights=weights, task="digits", name="v-served",
                                     source=ModelSource.ROUND, source_id="8")
    _, token = create_token(fleet.engine, Role.VIEWER)
    auth = {"Authorization": f"Bearer {token}"}
    with TestClient(app=create_app(fleet=fleet)) as client:
        # Execute
        manifest = client.get(f"/api/v1/models/{version}/variants/full-int8/manifest", headers=auth)
        artifact = client.get(f"/api/v1/models/{version}/variants/full-int8/artifact", headers=auth)
    # Assert: what a device would check, with the key it got at enrolment
    signed = verify_signature(decode_signed(manifest.content), base64.b64decode(creds.signing_public_key))
    assert signed.variant == "full-int8" and signed.source.id == "8"
    target = fleet.settings.data_dir / "dl.tflite"
    target.write_bytes(artifact.content)
    assert file_sha256(target) == signed.sha256
