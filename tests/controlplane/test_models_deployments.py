"""Model registry downloads (auth, HTTP Range) and wave-by-wave rollouts driven by device acks over MQTT."""

from __future__ import annotations

import base64
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from litestar.testing import TestClient

from agent import protocol as wire
from agent.manifest import (
    Golden,
    ModelManifest,
    ModelSource,
    SignedManifest,
    canonical_bytes,
    file_sha256,
    key_id,
)
from agent.mqtt import MqttProtocol, make_client, parse_broker_url
from agent.runtime import TFLiteModel, starter_model_path
from controlplane.app import create_app
from controlplane.auth import Role, create_token
from controlplane.db import ModelArtifactRecord
from controlplane.deployments import choose_variant
from controlplane.deployments.schemas import DeploymentCreate, Targets
from controlplane.devices.schemas import DeviceCreate
from controlplane.models.controller import parse_range
from controlplane.wiring import Fleet
from firmware_profiles import get_profile
from tests._services import clear_retained, fleet_settings, wait_for

pytestmark = pytest.mark.integration


def sign(key: Ed25519PrivateKey, manifest: ModelManifest) -> SignedManifest:
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return SignedManifest(manifest=manifest, signature=base64.b64encode(key.sign(canonical_bytes(manifest))).decode(),
                          key_id=key_id(raw))


def register_starter(fleet: Fleet, version: str, accuracy: dict[str, float], *, real_golden: bool = False) -> None:
    """A model version whose variants are the shipped starter models, signed with a throwaway key. With
    ``real_golden`` its golden output is what the model computes (a real agent's self-test passes)."""
    key = Ed25519PrivateKey.generate()
    published = []
    for variant, file_variant in (("fp32", "fp32"), ("full-int8", "int8")):
        path = starter_model_path(file_variant)
        output = [[0.0] * 10]
        if real_golden:
            output = TFLiteModel.load(path).predict(np.zeros((1, 64), dtype=np.float32)).tolist()
        manifest = ModelManifest(
            model_version=version, task="digits", variant=variant, file_name=f"{version}-{variant}.tflite",
            sha256=file_sha256(path), size_bytes=path.stat().st_size,
            runtimes={"ai-edge-litert": "2.3.0", "tflite-runtime": "2.14.0"}, source=ModelSource(kind="test", id="1"),
            metrics={"accuracy": accuracy[variant]}, input_scale=1 / 16,
            golden=Golden(input=[[0.0] * 64], output=output, tolerance=1.0),
        )
        published.append((sign(key, manifest), path))
    fleet.models.start_version(version, "digits", "test", "1")
    fleet.models.register_build(version, published, {"dynamic-int8": "accuracy 0.90 is 7.5 points below fp32"},
                                {"accuracy": accuracy["fp32"]})


@pytest.fixture(name="fleet")
def fx_fleet(mosquitto_url: str, tmp_path: Path) -> Iterator[Fleet]:
    settings = fleet_settings(mosquitto_url, tmp_path / "cp")
    fleet = Fleet(settings).start()
    yield fleet
    device_ids = [d.device_id for d in fleet.devices.find(limit=100_000)]
    fleet.stop()
    clear_retained(mosquitto_url, device_ids)


class FakeDevice:
    """A device on the real broker that speaks the agent's protocol without an agent: it announces itself with its
    retained state (online, its active model) and a last will saying offline, and answers deploy_model commands
    with a chosen result; on success it reports the new model active in its state, as the agent does."""

    def __init__(self, broker_url: str, device_id: str, ok: bool, *, active_model: str | None = None,
                 connect: bool = True) -> None:
        self.address = parse_broker_url(broker_url)
        self.device_id, self.ok, self.seen = device_id, ok, 0
        self.active_model: str | None = active_model
        self.active_variant: str | None = None
        self.client = make_client(self.address, f"fake-{device_id}-{uuid.uuid4().hex[:4]}",
                                  protocol=MqttProtocol.V5)
        self.client.on_message = self._on_message
        self.client.will_set(wire.topic(device_id, wire.Channel.STATE), self._state(online=False), qos=1,
                             retain=True)
        self.connected = False
        if connect:
            self.connect()

    def _state(self, online: bool) -> bytes:
        return wire.encode(wire.State(device_id=self.device_id, online=online, ts=time.time(),
                                      active_model=self.active_model, active_variant=self.active_variant))

    def publish_state(self, online: bool = True) -> None:
        self.client.publish(wire.topic(self.device_id, wire.Channel.STATE), self._state(online), qos=1,
                            retain=True).wait_for_publish(5)

    def connect(self) -> None:
        """Come online: subscribe to its commands, then announce itself (retained), as the agent does."""
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect(self.address.host, self.address.port)
        self.client.subscribe(wire.topic(self.device_id, wire.Channel.CMD), qos=1)
        self.client.loop_start()
        assert subscribed.wait(5)
        self.connected = True
        self.publish_state(online=True)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        command = wire.decode(msg.payload, wire.Command)
        self.seen += 1
        if self.ok:  # swapped before the ack, as the agent does
            self.active_model, self.active_variant = command.args["model_version"], command.args["variant"]
        ack = wire.Ack(device_id=self.device_id, command_id=command.command_id, ok=self.ok,
                       reason=None if self.ok else "self-test failed: output differs by 0.4 (tolerance 0.001)")
        client.publish(wire.topic(self.device_id, wire.Channel.ACK), wire.encode(ack), qos=1)
        if self.ok:
            client.publish(wire.topic(self.device_id, wire.Channel.STATE), self._state(True), qos=1, retain=True)

    def close(self) -> None:
        """Go offline the way an agent that stops does: its state says offline (retained), then disconnect."""
        if not self.connected:
            return
        self.publish_state(online=False)
        self.client.disconnect()
        self.client.loop_stop()
        self.connected = False


def test_parse_range() -> None:
    assert parse_range(None, 100) is None
    assert parse_range("bytes=10-", 100) == (10, 99)
    assert parse_range("bytes=10-19", 100) == (10, 19)
    assert parse_range("bytes=-5", 100) == (95, 99)
    assert parse_range("bytes=90-200", 100) == (90, 99)
    with pytest.raises(ValueError):
        parse_range("bytes=100-", 100)


def test_choose_variant_follows_profile_runtime_and_accuracy() -> None:
    # Prepare
    def artifact(variant: str, accuracy: float, runtimes: dict[str, str] | None = None) -> ModelArtifactRecord:
        manifest = {"manifest": {"runtimes": runtimes or {"ai-edge-litert": "2.3.0", "tflite-runtime": "2.14.0"}}}
        return ModelArtifactRecord(model_version="v", variant=variant, published=True, size_bytes=10_000,
                                   accuracy=accuracy, signed_manifest=manifest)

    published = {"fp32": artifact("fp32", 0.97), "fp16": artifact("fp16", 0.97),
                 "dynamic-int8": artifact("dynamic-int8", 0.968, {"ai-edge-litert": "2.3.0"}),
                 "full-int8": artifact("full-int8", 0.95)}
    # Execute / Assert
    assert choose_variant(get_profile("raspberry-pi-5"), published)[0] == "dynamic-int8"  # int8 within 0.5 pt
    assert choose_variant(get_profile("raspberry-pi-4"), published)[0] == "fp16"  # no dynamic-int8 on tflite 2.14
    assert choose_variant(get_profile("coral-dev-board"), published)[0] == "full-int8"
    assert choose_variant(get_profile("jetson-orin-nano"), published)[0] == "fp16"  # GPU delegate
    none, why = choose_variant(get_profile("coral-dev-board"), {"fp32": artifact("fp32", 0.97)})
    assert none is None and "not allowed by profile" in why


def test_downloads_need_a_token_and_support_range(fleet: Fleet) -> None:
    # Prepare
    register_starter(fleet, "m1", {"fp32": 0.975, "full-int8": 0.975})
    _, token = create_token(fleet.engine, Role.VIEWER)
    url = "/api/v1/models/m1/variants/fp32/artifact"
    whole_file = starter_model_path("fp32").read_bytes()
    with TestClient(app=create_app(fleet=fleet)) as client:
        auth = {"Authorization": f"Bearer {token}"}
        # Execute
        anonymous = client.get(url)
        whole = client.get(url, headers=auth)
        part = client.get(url, headers={**auth, "Range": "bytes=100-"})
        past_end = client.get(url, headers={**auth, "Range": f"bytes={len(whole_file)}-"})
        manifest = client.get("/api/v1/models/m1/variants/fp32/manifest", headers=auth)
        listed = client.get("/api/v1/models/m1", headers=auth).json()
        missing = client.get("/api/v1/models/m1/variants/fp16/artifact", headers=auth)
    # Assert
    assert anonymous.status_code == 401
    assert whole.status_code == 200 and whole.content == whole_file
    assert part.status_code == 206 and part.content == whole_file[100:]
    assert part.headers["content-range"] == f"bytes 100-{len(whole_file) - 1}/{len(whole_file)}"
    assert past_end.status_code == 416
    assert manifest.json()["manifest"]["sha256"] == file_sha256(starter_model_path("fp32"))
    assert {v["variant"]: v["published"] for v in listed["variants"]} == {
        "dynamic-int8": False, "fp32": True, "full-int8": True}
    assert missing.status_code == 404


def test_artifacts_are_streamed_from_disk_not_read_whole(fleet: Fleet, tmp_path: Path) -> None:
    # Prepare: the registered artifact is a 64 MiB (sparse) file; a device resumes at its last 10 bytes
    import tracemalloc

    from sqlmodel import Session, select

    register_starter(fleet, "big", {"fp32": 0.975, "full-int8": 0.975})
    big = tmp_path / "big.tflite"
    with open(big, "wb") as fh:
        fh.truncate(64 * 2**20)
        fh.seek(64 * 2**20 - 10)
        fh.write(b"0123456789")
    with Session(fleet.engine) as session:
        record = session.exec(select(ModelArtifactRecord).where(ModelArtifactRecord.model_version == "big",
                                                                ModelArtifactRecord.variant == "fp32")).one()
        record.path = str(big)
        session.add(record)
        session.commit()
    _, token = create_token(fleet.engine, Role.VIEWER)
    auth = {"Authorization": f"Bearer {token}"}
    with TestClient(app=create_app(fleet=fleet)) as client:
        # Execute
        tracemalloc.start()
        try:
            tail = client.get("/api/v1/models/big/variants/fp32/artifact", headers={**auth, "Range": "bytes=-10"})
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        head = client.get("/api/v1/models/big/variants/fp32/artifact", headers={**auth, "Range": "bytes=0-3"})
    # Assert: the right bytes, and the server never held the file (64 MiB) in memory
    assert tail.status_code == 206 and tail.content == b"0123456789"
    assert tail.headers["content-range"] == f"bytes {64 * 2**20 - 10}-{64 * 2**20 - 1}/{64 * 2**20}"
    assert tail.headers["content-length"] == "10"
    assert head.status_code == 206 and head.content == b"\0\0\0\0"
    assert peak < 8 * 2**20, f"{peak / 2**20:.1f} MiB allocated while serving 10 bytes of a 64 MiB artifact"


@pytest.mark.slow
def test_rollout_goes_wave_by_wave_and_halts_on_failures(fleet: Fleet, mosquitto_url: str) -> None:
    # Prepare: 4 good devices and 1 that fails its self-test; a Coral (full-int8 only)
    register_starter(fleet, "m2", {"fp32": 0.975, "full-int8": 0.975})
    ids = [f"pi-{i}" for i in range(4)] + ["pi-bad"]
    fakes = []
    for device_id in ids:
        fleet.devices.enroll(DeviceCreate(device_id=device_id, profile="raspberry-pi-5", tags=["line-1"]))
        fakes.append(FakeDevice(mosquitto_url, device_id, ok=device_id != "pi-bad"))
    try:
        # Execute
        created = fleet.deployments.create(DeploymentCreate(
            model_version="m2", targets=Targets(tags=["line-1"]), waves=[40.0, 100.0], failure_threshold=0.0))

        def finished() -> bool:
            return fleet.deployments.get(created.id).status != "running"

        wait_for(finished, timeout=30, what="the rollout to finish")
        result = fleet.deployments.get(created.id)
        # Assert: wave 1 (pi-0, pi-1) succeeded; wave 2 had pi-bad fail -> halted with the device's reason
        by_device = {t.device_id: t for t in result.targets}
        assert [t.wave for t in result.targets] == [0, 0, 1, 1, 1]
        assert by_device["pi-0"].status == "succeeded" and by_device["pi-0"].variant == "full-int8"
        assert by_device["pi-bad"].status == "failed" and "self-test" in (by_device["pi-bad"].reason or "")
        assert result.status == "halted" and "pi-bad" in (result.reason or "")
    finally:
        for fake in fakes:
            fake.close()


def test_first_wave_failure_stops_the_rollout(fleet: Fleet, mosquitto_url: str) -> None:
    # Prepare
    register_starter(fleet, "m3", {"fp32": 0.975, "full-int8": 0.975})
    fleet.devices.enroll(DeviceCreate(device_id="a-bad", profile="raspberry-pi-5"))
    fleet.devices.enroll(DeviceCreate(device_id="b-good", profile="raspberry-pi-5"))
    fakes = [FakeDevice(mosquitto_url, "a-bad", ok=False), FakeDevice(mosquitto_url, "b-good", ok=True)]
    try:
        # Execute
        created = fleet.deployments.create(DeploymentCreate(
            model_version="m3", targets=Targets(device_ids=["a-bad", "b-good"]), waves=[50.0, 100.0]))
        wait_for(lambda: fleet.deployments.get(created.id).status != "running", timeout=30, what="halt")
        # Assert: the second wave never received a command
        result = fleet.deployments.get(created.id)
        assert result.status == "halted"
        assert fakes[1].seen == 0
        assert {t.device_id: t.status for t in result.targets} == {"a-bad": "failed", "b-good": "cancelled"}
        assert result.targets[1].reason == f"deployment {created.id} halted before it was sent"
    finally:
        for fake in fakes:
            fake.close()


def test_invalid_deployments_are_400(fleet: Fleet) -> None:
    # Prepare
    register_starter(fleet, "m4", {"fp32": 0.975, "full-int8": 0.975})
    _, token = create_token(fleet.engine, Role.OPERATOR)
    auth = {"Authorization": f"Bearer {token}"}
    with TestClient(app=create_app(fleet=fleet)) as client:
        # Execute
        no_devices = client.post("/api/v1/deployments", headers=auth,
                                 json={"model_version": "m4", "targets": {"tags": ["nowhere"]}})
        bad_waves = client.post("/api/v1/deployments", headers=auth,
                                json={"model_version": "m4", "targets": {"all": True}, "waves": [50, 20]})
        unknown = client.post("/api/v1/deployments", headers=auth,
                              json={"model_version": "nope", "targets": {"all": True}})
    # Assert
    assert no_devices.status_code == 400 and "match no enrolled device" in no_devices.json()["detail"]
    assert bad_waves.status_code == 400 and "waves" in bad_waves.json()["detail"]
    assert unknown.status_code == 404


