"""Deployments' signed releases and download tokens, over real HTTP (the app), a real broker and a real
database (SQLite and PostgreSQL): release ordering, explicit rollbacks, and tokens that are hashed, scoped to
one deployment and variant, expire with it and are never shown to viewers."""

from __future__ import annotations

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from litestar.testing import TestClient
from sqlalchemy import text
from sqlmodel import Session, select

from agent import protocol as wire
from agent.manifest import decode_signed_release, verify_release
from agent.runtime import starter_model_path
from controlplane.app import create_app
from controlplane.auth import Role, create_token
from controlplane.db import CommandRecord, DeploymentTargetRecord, create_db_engine, migrate
from controlplane.deployments.schemas import DeploymentCreate, Targets
from controlplane.devices.schemas import DeviceCreate
from controlplane.models.service import ModelService
from controlplane.wiring import Fleet
from tests._services import fx_fleet, wait_for  # noqa: F401 - fx_fleet
from tests.controlplane.test_models_deployments import FakeDevice, register_starter

pytestmark = pytest.mark.integration


class Device(FakeDevice):
    """A device on the real broker that keeps the deploy_model commands it gets and acks only when told."""

    def __init__(self, broker_url: str, device_id: str) -> None:
        self.commands: list[wire.Command] = []
        self.acked = 0
        super().__init__(broker_url, device_id, ok=True)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        self.commands.append(wire.decode(msg.payload, wire.Command))

    def ack(self, ok: bool = True, reason: str | None = None) -> None:
        """Ack the commands not acked yet."""
        fresh, self.acked = self.commands[self.acked:], len(self.commands)
        for command in fresh:
            ack = wire.Ack(device_id=self.device_id, command_id=command.command_id, ok=ok, reason=reason)
            self.client.publish(wire.topic(self.device_id, wire.Channel.ACK), wire.encode(ack), qos=1)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_download_tokens_are_hashed_scoped_hidden_and_expire(fleet: Fleet, mosquitto_url: str) -> None:
    # Prepare: a Pi 5 gets full-int8, a Jetson fp32 (the starter's two variants); both hold their commands
    register_starter(fleet, "m1", {"fp32": 0.975, "full-int8": 0.975})
    register_starter(fleet, "m2", {"fp32": 0.975, "full-int8": 0.975})
    fleet.devices.enroll(DeviceCreate(device_id="pi-0", profile="raspberry-pi-5"))
    fleet.devices.enroll(DeviceCreate(device_id="jet-0", profile="jetson-orin-nano"))
    pi, jet = Device(mosquitto_url, "pi-0"), Device(mosquitto_url, "jet-0")
    _, viewer = create_token(fleet.engine, Role.VIEWER)
    try:
        # Execute
        created = fleet.deployments.create(DeploymentCreate(model_version="m2", targets=Targets(all=True)))
        wait_for(lambda: pi.commands and jet.commands, what="both commands")
        dep = created.id
        pi_cmd, jet_cmd = pi.commands[0], jet.commands[0]
        pi_token, jet_token = pi_cmd.args["bearer"], jet_cmd.args["bearer"]
        with TestClient(app=create_app(fleet=fleet)) as client:
            shown = client.get(f"/api/v1/devices/pi-0/commands/{pi_cmd.command_id}", headers=bearer(viewer))
            own_manifest = client.get(pi_cmd.args["manifest_url"], headers=bearer(pi_token))
            own_range = client.get(pi_cmd.args["artifact_url"], headers={**bearer(pi_token), "Range": "bytes=10-"})
            other_variant = client.get(f"/api/v1/deployments/{dep}/variants/fp32/artifact",
                                       headers=bearer(pi_token))
            other_device_variant = client.get(jet_cmd.args["manifest_url"], headers=bearer(pi_token))
            model_route = client.get("/api/v1/models/m2/variants/full-int8/artifact", headers=bearer(pi_token))
            older_model = client.get("/api/v1/models/m1/variants/full-int8/artifact", headers=bearer(pi_token))
            jet_own = client.get(jet_cmd.args["artifact_url"], headers=bearer(jet_token))
            # the devices answer; the deployment ends; the tokens end with it
            pi.ack()
            jet.ack()
            wait_for(lambda: fleet.deployments.get(dep).status == "succeeded", what="the rollout to finish")
            after = client.get(pi_cmd.args["artifact_url"], headers=bearer(pi_token))

        # Assert: a viewer sees the command without its token, and the database holds only its SHA-256
        assert shown.status_code == 200, shown.text
        assert "bearer" not in shown.json()["args"] and pi_token not in shown.text
        assert shown.json()["args"]["deployment_id"] == dep
        with Session(fleet.engine) as session:
            stored = session.exec(select(CommandRecord).where(CommandRecord.command_id == pi_cmd.command_id)).one()
            target = session.get(DeploymentTargetRecord, (dep, "pi-0"))
            assert "bearer" not in stored.args
            assert target is not None and target.token_hash == hashlib.sha256(pi_token.encode()).hexdigest()
            tables = ["command", "deployment", "deployment_target", "deployment_release"]
            dump = " ".join(str(row) for t in tables for row in session.connection().execute(text(f"SELECT * FROM {t}")))
            assert pi_token not in dump and jet_token not in dump
        # the token opens its own deployment and variant (with Range), nothing else
        assert own_manifest.status_code == 200
        assert own_range.status_code == 206
        assert own_range.content == starter_model_path("int8").read_bytes()[10:]
        assert jet_own.status_code == 200 and jet_own.content == starter_model_path("fp32").read_bytes()
        for refused in (other_variant, other_device_variant):
            assert refused.status_code == 401 and "another deployment or variant" in refused.text, refused.text
        for refused in (model_route, older_model):
            assert refused.status_code == 401 and "need an API token" in refused.text, refused.text
        assert after.status_code == 401 and "is succeeded: its download tokens have expired" in after.text
        # the release the Pi verifies: signed by the fleet's key, bound to this deployment, its class and task
        release = verify_release(decode_signed_release(own_manifest.content), fleet.signer.public_key_raw)
        assert (release.model_version, release.variant, release.task) == ("m2", "full-int8", "digits")
        assert release.release == fleet.models.get("m2").release == fleet.models.get("m1").release + 1
        assert release.deployment_id == dep and release.device_classes == ["raspberry-pi-5"]
        assert release.rollback is False
        assert time.time() < release.expires_at <= time.time() + 600 + 900 + 5
    finally:
        pi.close()
        jet.close()


@pytest.mark.slow
def test_a_lower_release_needs_an_explicit_rollback(fleet: Fleet, mosquitto_url: str) -> None:
    # Prepare: m-old (release n), m-new (n+1), m-bad (n+2); m-new is deployed, m-bad reached no device
    register_starter(fleet, "m-old", {"fp32": 0.975, "full-int8": 0.975})
    register_starter(fleet, "m-new", {"fp32": 0.975, "full-int8": 0.975})
    register_starter(fleet, "m-bad", {"fp32": 0.975, "full-int8": 0.975})
    fleet.devices.enroll(DeviceCreate(device_id="pi-0", profile="raspberry-pi-5"))
    pi = Device(mosquitto_url, "pi-0")
    _, operator = create_token(fleet.engine, Role.OPERATOR)
    old, new = fleet.models.get("m-old").release, fleet.models.get("m-new").release
    try:
        with TestClient(app=create_app(fleet=fleet)) as client:
            first = client.post("/api/v1/deployments", headers=bearer(operator),
                                json={"model_version": "m-new", "targets": {"all": True}})
            wait_for(lambda: pi.commands, what="the first command")
            pi.ack()
            wait_for(lambda: fleet.deployments.get(first.json()["id"]).status == "succeeded", what="rollout 1")
            bad = client.post("/api/v1/deployments", headers=bearer(operator),
                              json={"model_version": "m-bad", "targets": {"all": True}})
            wait_for(lambda: len(pi.commands) == 2, what="the m-bad command")
            pi.ack(ok=False, reason="self-test failed")
            wait_for(lambda: fleet.deployments.get(bad.json()["id"]).status == "halted", what="rollout 2 halts")
            # Execute
            plain = client.post("/api/v1/deployments", headers=bearer(operator),
                                json={"model_version": "m-old", "targets": {"all": True}})
            rollback = client.post("/api/v1/deployments", headers=bearer(operator),
                                   json={"model_version": "m-old", "targets": {"all": True}, "rollback": True})
            wait_for(lambda: len(pi.commands) == 3, what="the rollback command")
            command = pi.commands[2]
            signed = client.get(command.args["manifest_url"], headers=bearer(command.args["bearer"]))

        # Assert
        assert first.status_code == 201 and first.json()["release"] == new and first.json()["rollback"] is False
        assert plain.status_code == 400
        assert plain.json()["detail"] == (f"model 'm-old' is release {old}, lower than release {new} ('m-new') "
                                          f'already deployed: going back needs "rollback": true')
        assert rollback.status_code == 201, rollback.text
        assert rollback.json()["rollback"] is True and rollback.json()["release"] == old
        release = verify_release(decode_signed_release(signed.content), fleet.signer.public_key_raw)
        assert (release.release, release.rollback, release.rollback_from) == (old, True, new)
    finally:
        pi.close()


def test_release_numbers_increase_across_concurrent_registrations(database_url: str, tmp_path: Path) -> None:
    # Prepare
    engine = create_db_engine(database_url)
    migrate(engine)
    models = ModelService(engine, tmp_path / "artifacts")

    # Execute: 12 versions registered from 6 threads at once
    with ThreadPoolExecutor(6) as pool:
        numbers = list(pool.map(lambda i: models.start_version(f"v{i}", "digits", "test", str(i)), range(12)))

    # Assert: each got its own number, and the registry reports the same ones
    assert sorted(numbers) == list(range(1, 13))
    assert {m.version: m.release for m in models.list_all()} == {f"v{i}": n for i, n in enumerate(numbers)}
    engine.dispose()



def test_the_migration_numbers_existing_versions_and_drops_plain_tokens(database_url: str, tmp_path: Path) -> None:
    # Prepare: a database at revision 0004 with two model versions and a deployment holding a plain token
    from alembic import command
    from alembic.config import Config

    from controlplane.db import _engine

    engine = create_db_engine(database_url)
    config = Config()
    config.set_main_option("script_location", str(_engine._MIGRATIONS))
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0004")
        for version, created in (("b-second", "2026-01-02"), ("a-first", "2026-01-01")):
            conn.execute(text("INSERT INTO model_version (version, task, source_kind, source_id, created_at, status, "
                              "metrics) VALUES (:v, 'digits', 'test', '1', :c, 'ready', '{}')"),
                         {"v": version, "c": created})
        conn.execute(text("INSERT INTO deployment (model_version, targets, waves, failure_threshold, wave_timeout_s, "
                          "current_wave, status, download_token, created_at, updated_at) VALUES ('a-first', '{}', "
                          "'[100]', 0, 600, 0, 'succeeded', 'plain-secret', '2026-01-03', '2026-01-03')"))

    # Execute
    migrate(engine)

    # Assert: numbered in registration order; the plain token is gone; the deployment is no rollback
    with engine.connect() as conn:
        releases = dict(conn.execute(text("SELECT version, release FROM model_version")).all())
        deployment = conn.execute(text("SELECT * FROM deployment")).mappings().one()
    assert releases == {"a-first": 1, "b-second": 2}
    assert "download_token" not in deployment and not deployment["rollback"]
    assert ModelService(engine, tmp_path / "artifacts").start_version("c-third", "digits", "test", "3") == 3
    engine.dispose()
