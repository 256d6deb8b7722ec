"""Broker accounts and ACLs, against real brokers: mosquitto + dynamic-security and the embedded amqtt broker.

The ACL rule: a device (username == device id) publishes only its own telemetry/state/ack and subscribes to /
receives only its own cmd; the service account may do everything under ``edgefleet/``.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.protocol import Channel, topic
from controlplane.broker import (
    BrokerAuth,
    BrokerAuthError,
    CredentialsFile,
    EmbeddedBroker,
    EmbeddedBrokerAuth,
    MosquittoDynsecAuth,
    NoBrokerAuth,
    hash_password,
    hash_password_pbkdf2,
    hash_secret,
    verify_password,
)
from controlplane.broker._credentials import acl_allows
from controlplane.broker._dynsec import device_role_acls
from tests.conftest import (
    EmbeddedBrokerInstance,
    MosquittoInstance,
    find_mosquitto,
    free_port,
    start_mosquitto,
    stop_process,
    wait_for_port,
)

REPO = Path(__file__).resolve().parents[2]
QUIET = 0.5  # how long "nothing arrives" is watched for, after a later message did arrive


# -- a small synchronous MQTT client ---------------------------------------------------------------------------


class Probe:
    """A paho client run in its own thread, with blocking helpers for tests."""

    def __init__(
        self,
        host: str,
        port: int,
        username: str | None,
        password: str | None,
        *,
        protocol: int = mqtt.MQTTv311,
        will: tuple[str, bytes] | None = None,
        client_id: str | None = None,
        persistent: bool = False,
    ) -> None:
        """``client_id``: a random one by default; ``persistent``: a session that outlives the connection
        (MQTT 3.1.1 clean_session=False; MQTT 5 clean_start=False with a session expiry)."""
        self.host, self.port = host, port
        self.protocol, self.persistent = protocol, persistent
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.connack: ReasonCode | None = None
        self.session_present = False
        self.disconnects: list[ReasonCode] = []
        self._connack_event = threading.Event()
        self._subacks: dict[int, list[ReasonCode]] = {}
        self._suback_event = threading.Condition()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"probe-{secrets.token_hex(4)}" if client_id is None else client_id,
            protocol=protocol,
            clean_session=None if protocol == mqtt.MQTTv5 else not persistent,
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = lambda _c, _u, message: self.messages.put(message)
        self.client.reconnect_delay_set(0.2, 1)

    def _on_connect(self, _c: Any, _u: Any, flags: Any, reason: ReasonCode, _p: Any) -> None:
        if self.connack is None:
            self.connack = reason
            self.session_present = bool(flags.session_present)
            self._connack_event.set()

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        self.disconnects.append(reason)
        self._connack_event.set()  # a broker that just closes the socket

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, reasons: list[ReasonCode], _p: Any) -> None:
        with self._suback_event:
            self._subacks[mid] = reasons
            self._suback_event.notify_all()

    def connect(self, timeout: float = 10.0) -> ReasonCode | None:
        """The CONNACK reason (None: the broker closed the connection without one)."""
        if self.protocol == mqtt.MQTTv5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            if self.persistent:
                props.SessionExpiryInterval = 3600
            self.client.connect(
                self.host, self.port, keepalive=30, clean_start=not self.persistent, properties=props
            )
        else:
            self.client.connect(self.host, self.port, keepalive=30)
        self.client.loop_start()
        assert self._connack_event.wait(timeout), "no CONNACK and no disconnect"
        return self.connack

    @property
    def connected(self) -> bool:
        return self.client.is_connected()

    def subscribe(self, topic_filter: str, qos: int = 1, timeout: float = 5.0) -> bool:
        """Whether the broker granted the subscription."""
        result, mid = self.client.subscribe(topic_filter, qos)
        assert result == mqtt.MQTT_ERR_SUCCESS
        with self._suback_event:
            assert self._suback_event.wait_for(lambda: mid in self._subacks, timeout), "no SUBACK"
            reasons = self._subacks[mid]
        return not any(r.is_failure for r in reasons)

    def publish(self, topic_name: str, payload: bytes, *, retain: bool = False, timeout: float = 5.0) -> None:
        info = self.client.publish(topic_name, payload, qos=1, retain=retain)
        info.wait_for_publish(timeout)

    def expect(self, topic_name: str, payload: bytes, timeout: float = 5.0) -> list[tuple[str, bytes]]:
        """Wait for one message; returns the other messages that arrived before it."""
        before: list[tuple[str, bytes]] = []
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                message = self.messages.get(timeout=max(remaining, 0.01))
            except queue.Empty:
                raise AssertionError(f"{payload!r} on {topic_name} did not arrive; got {before}") from None
            if message.topic == topic_name and message.payload == payload:
                return before
            before.append((message.topic, message.payload))

    def drain(self, quiet: float = QUIET) -> list[tuple[str, bytes]]:
        """Everything that arrives until ``quiet`` seconds pass."""
        got: list[tuple[str, bytes]] = []
        while True:
            try:
                message = self.messages.get(timeout=quiet)
            except queue.Empty:
                return got
            got.append((message.topic, message.payload))

    def drop(self) -> None:
        """Vanish without DISCONNECT (the broker then publishes the Last Will)."""
        self.client.loop_stop()
        sock = self.client.socket()
        if sock is not None:
            sock.close()

    def wait_disconnected(self, timeout: float) -> bool:
        """Whether the broker closed the connection within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not self.disconnects and time.monotonic() < deadline:
            time.sleep(0.02)
        return bool(self.disconnects)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# -- the two backends behind one interface ---------------------------------------------------------------------


@dataclass
class Backend:
    name: str
    host: str
    port: int
    protocol: int
    auth: BrokerAuth
    service_username: str
    service_password: str
    probes: list[Probe]

    def probe(self, username: str | None, password: str | None, **kwargs: Any) -> Probe:
        """A client; a device's client id is its device id unless ``client_id`` says otherwise."""
        if username is not None and username != self.service_username:
            kwargs.setdefault("client_id", username)
        p = Probe(self.host, self.port, username, password, protocol=self.protocol, **kwargs)
        self.probes.append(p)
        return p

    def device(self, device_id: str, password: str, **kwargs: Any) -> Probe:
        """A connected device client."""
        p = self.probe(device_id, password, **kwargs)
        reason = p.connect()
        assert reason is not None and not reason.is_failure, f"{device_id} could not connect: {reason}"
        return p

    def service(self, *filters: str) -> Probe:
        """A connected service client subscribed to ``filters``."""
        p = self.probe(self.service_username, self.service_password)
        reason = p.connect()
        assert reason is not None and not reason.is_failure, f"service could not connect: {reason}"
        for f in filters:
            assert p.subscribe(f), f"service may not subscribe to {f}"
        return p


def _refused(reason: ReasonCode | None) -> bool:
    return reason is None or reason.is_failure


@pytest.fixture(params=["mosquitto", "embedded"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    probes: list[Probe] = []
    auth: BrokerAuth
    if request.param == "mosquitto":
        mosq: MosquittoInstance = request.getfixturevalue("dynsec_mosquitto")
        auth = MosquittoDynsecAuth.from_url(mosq.url, timeout=5.0)
        auth.prepare()  # the control plane connects as the dynsec admin: give it the edgefleet service role
        b = Backend(
            "mosquitto",
            mosq.host,
            mosq.port,
            mqtt.MQTTv5,
            auth,
            mosq.admin_username,
            mosq.admin_password,
            probes,
        )
    else:
        emb: EmbeddedBrokerInstance = request.getfixturevalue("embedded_broker")
        auth = emb.auth
        b = Backend(
            "embedded",
            emb.host,
            emb.port,
            mqtt.MQTTv311,
            auth,
            emb.service_username,
            emb.service_password,
            probes,
        )
    try:
        yield b
    finally:
        for p in probes:
            p.close()
        auth.close()


# -- integration: both brokers ---------------------------------------------------------------------------------


@pytest.mark.integration
class TestDeviceAcl:
    def test_device_publishes_its_own_channels(self, backend: Backend) -> None:
        backend.auth.ensure_device("dev-a", "pw-a")
        service = backend.service("edgefleet/v1/devices/+/+")
        device = backend.device("dev-a", "pw-a")
        for channel in (Channel.TELEMETRY, Channel.STATE, Channel.ACK):
            device.publish(topic("dev-a", channel), channel.encode())
            assert service.expect(topic("dev-a", channel), channel.encode()) == []

    def test_device_cannot_publish_as_another_device(self, backend: Backend) -> None:
        backend.auth.ensure_device("dev-a", "pw-a")
        backend.auth.ensure_device("dev-b", "pw-b")
        service = backend.service("edgefleet/#")
        device = backend.device("dev-a", "pw-a")
        for forbidden in (
            topic("dev-b", Channel.TELEMETRY),
            topic("dev-b", Channel.STATE),
            topic("dev-b", Channel.ACK),
            topic("dev-a", Channel.CMD),  # its own cmd: only the control plane sends commands
            "edgefleet/v1/broadcast",
        ):
            device.publish(forbidden, b"forged")
        device.publish(topic("dev-a", Channel.TELEMETRY), b"sentinel")
        assert service.expect(topic("dev-a", Channel.TELEMETRY), b"sentinel") == []
        assert service.drain() == []

    def test_device_cannot_subscribe_to_another_devices_cmd(self, backend: Backend) -> None:
        backend.auth.ensure_device("dev-a", "pw-a")
        backend.auth.ensure_device("dev-b", "pw-b")
        device = backend.device("dev-a", "pw-a")
        assert not device.subscribe(topic("dev-b", Channel.CMD))
        assert not device.subscribe("edgefleet/v1/devices/+/cmd")
        assert not device.subscribe("edgefleet/#")
        assert not device.subscribe(topic("dev-b", Channel.TELEMETRY))
        assert device.subscribe(topic("dev-a", Channel.CMD))
        service = backend.service()
        service.publish(topic("dev-b", Channel.CMD), b"for-b")
        service.publish(topic("dev-a", Channel.CMD), b"for-a")
        assert device.expect(topic("dev-a", Channel.CMD), b"for-a") == []
        assert device.drain() == []

    def test_device_does_not_receive_other_devices_retained_state(self, backend: Backend) -> None:
        # amqtt 0.11.4 sends a connecting client the retained messages matching *anyone's* subscriptions,
        # unchecked; the embedded broker must not leak dev-b's state to dev-a.
        backend.auth.ensure_device("dev-a", "pw-a")
        backend.auth.ensure_device("dev-b", "pw-b")
        service = backend.service("edgefleet/v1/devices/+/state")
        other = backend.device("dev-b", "pw-b")
        other.publish(topic("dev-b", Channel.STATE), b"b-state", retain=True)
        service.expect(topic("dev-b", Channel.STATE), b"b-state")
        device = backend.device("dev-a", "pw-a")
        assert device.subscribe(topic("dev-a", Channel.CMD))
        service.publish(topic("dev-a", Channel.CMD), b"for-a")
        assert device.expect(topic("dev-a", Channel.CMD), b"for-a") == []
        assert device.drain() == []

    def test_service_may_do_everything_under_edgefleet(self, backend: Backend) -> None:
        backend.auth.ensure_device("dev-a", "pw-a")
        service = backend.service("edgefleet/#")
        service.publish(topic("dev-a", Channel.TELEMETRY), b"as-device")
        service.publish("edgefleet/v1/anything/else", b"free")
        assert service.expect("edgefleet/v1/anything/else", b"free") == [
            (topic("dev-a", Channel.TELEMETRY), b"as-device")
        ]

    @pytest.mark.slow
    def test_last_will_only_on_own_topics(self, backend: Backend) -> None:
        backend.auth.ensure_device("dev-a", "pw-a")
        backend.auth.ensure_device("dev-b", "pw-b")
        service = backend.service("edgefleet/v1/devices/+/state")
        # A forged will: refused at CONNECT (embedded) or dropped when published (mosquitto).
        forger = backend.probe("dev-a", "pw-a", will=(topic("dev-b", Channel.STATE), b"forged-will"))
        if not _refused(forger.connect()):
            forger.drop()
        honest = backend.device("dev-a", "pw-a", will=(topic("dev-a", Channel.STATE), b"offline"))
        honest.drop()
        assert service.expect(topic("dev-a", Channel.STATE), b"offline") == []
        assert service.drain() == []


@pytest.mark.integration
class TestAuthentication:
    def test_wrong_password_unknown_user_and_anonymous_are_refused(self, backend: Backend) -> None:
        backend.auth.ensure_device("dev-a", "pw-a")
        assert _refused(backend.probe("dev-a", "wrong").connect())
        assert _refused(backend.probe("dev-zz", "pw-a").connect())
        assert _refused(backend.probe(None, None).connect())
        assert _refused(backend.probe("dev-a", "").connect())
        assert not _refused(backend.probe("dev-a", "pw-a").connect())

    def test_ensure_device_is_idempotent_and_rotates_passwords(self, backend: Backend) -> None:
        backend.auth.ensure_device("dev-a", "pw-1")
        backend.auth.ensure_device("dev-a", "pw-1")
        assert not _refused(backend.probe("dev-a", "pw-1").connect())
        backend.auth.ensure_device("dev-a", "pw-2")
        assert _refused(backend.probe("dev-a", "pw-1").connect())
        assert not _refused(backend.probe("dev-a", "pw-2").connect())

    @pytest.mark.slow
    def test_removed_device_can_no_longer_connect_nor_publish(self, backend: Backend) -> None:
        backend.auth.ensure_device("dev-a", "pw-a")
        backend.auth.ensure_device("dev-b", "pw-b")
        service = backend.service("edgefleet/#")
        live = backend.device("dev-a", "pw-a")
        witness = backend.device("dev-b", "pw-b")
        backend.auth.remove_device("dev-a")
        backend.auth.remove_device("dev-a")  # idempotent
        assert _refused(backend.probe("dev-a", "pw-a").connect())
        # Its live connection loses access: mosquitto disconnects it, the embedded broker denies every action.
        time.sleep(1.2)  # the embedded broker re-reads the credentials at most every second for topic checks
        live.client.publish(topic("dev-a", Channel.TELEMETRY), b"after-removal", qos=1)
        witness.publish(topic("dev-b", Channel.TELEMETRY), b"sentinel")
        service.expect(topic("dev-b", Channel.TELEMETRY), b"sentinel")
        assert (topic("dev-a", Channel.TELEMETRY), b"after-removal") not in service.drain()
        # The account can come back.
        backend.auth.ensure_device("dev-a", "pw-a2")
        assert not _refused(backend.probe("dev-a", "pw-a2").connect())


DISCONNECT_WITHIN = 3.0  # seconds: how soon a revoked credential's live connection must be closed


@pytest.mark.integration
class TestIdentity:
    """A device account may only use its own device id as client id, and a changed credential ends the sessions
    (live and persistent) of the old one (issue 8, findings 2, 3 and 6)."""

    def _offline_session_with_a_queued_command(self, backend: Backend, device_id: str, password: str) -> Probe:
        """``device_id`` subscribes on a persistent session and goes away; the service queues a command."""
        device = backend.probe(device_id, password, persistent=True)
        assert not _refused(device.connect())
        assert device.subscribe(topic(device_id, Channel.CMD))
        device.close()
        service = backend.service()
        service.publish(topic(device_id, Channel.CMD), b"queued-for-" + device_id.encode())
        return service

    def test_device_cannot_take_another_devices_queued_commands(self, backend: Backend) -> None:
        # Prepare: dev-a has a persistent session with a queued command (a deploy_model with its token, say)
        backend.auth.ensure_device("dev-a", "pw-a")
        backend.auth.ensure_device("dev-b", "pw-b")
        self._offline_session_with_a_queued_command(backend, "dev-a", "pw-a")
        # Execute: dev-b connects with its own credentials but dev-a's client id, resuming the session
        thief = backend.probe("dev-b", "pw-b", client_id="dev-a", persistent=True)
        refused = _refused(thief.connect())
        stolen = thief.drain()
        # Assert: refused at CONNECT, nothing delivered, and dev-a still gets its command
        assert refused, "a device connected with another device's client id"
        assert stolen == []
        victim = backend.probe("dev-a", "pw-a", persistent=True)
        assert not _refused(victim.connect())
        assert victim.expect(topic("dev-a", Channel.CMD), b"queued-for-dev-a") == []

    def test_device_client_id_must_be_its_device_id(self, backend: Backend) -> None:
        backend.auth.ensure_device("dev-a", "pw-a")
        assert _refused(backend.probe("dev-a", "pw-a", client_id="dev-a-2").connect())
        assert _refused(backend.probe("dev-a", "pw-a", client_id="").connect())
        assert _refused(backend.probe("dev-a", "pw-a", client_id="DEV-A").connect())
        assert not _refused(backend.probe("dev-a", "pw-a").connect())

    @pytest.mark.parametrize("password", ["pw-b", "wrong"], ids=["own-credentials", "wrong-password"])
    def test_clean_connect_with_another_devices_id_leaves_its_subscription(
        self, backend: Backend, password: str
    ) -> None:
        # Prepare: dev-a is online and subscribed to its commands
        backend.auth.ensure_device("dev-a", "pw-a")
        backend.auth.ensure_device("dev-b", "pw-b")
        victim = backend.device("dev-a", "pw-a", persistent=True)
        assert victim.subscribe(topic("dev-a", Channel.CMD))
        # Execute: a short clean-session connection with dev-a's client id
        intruder = backend.probe("dev-b", password, client_id="dev-a")
        assert _refused(intruder.connect())
        intruder.close()
        # Assert: dev-a is still connected and still receives its commands
        service = backend.service()
        service.publish(topic("dev-a", Channel.CMD), b"still-there")
        assert victim.expect(topic("dev-a", Channel.CMD), b"still-there") == []
        assert victim.connected and victim.disconnects == []

    @pytest.mark.slow
    def test_rotation_ends_the_old_sessions(self, backend: Backend) -> None:
        # Prepare: a queued command for the old credential, and a live connection of it
        backend.auth.ensure_device("dev-a", "pw-old")
        self._offline_session_with_a_queued_command(backend, "dev-a", "pw-old")
        live = backend.probe("dev-a", "pw-old", persistent=True)
        assert not _refused(live.connect())
        live.client.reconnect_delay_set(30, 60)  # watch the broker close it; no quick reconnect
        assert live.expect(topic("dev-a", Channel.CMD), b"queued-for-dev-a") == []
        service = backend.service()
        service.publish(topic("dev-a", Channel.CMD), b"queued-again")  # delivered to live or queued
        # Execute
        backend.auth.ensure_device("dev-a", "pw-new")
        # Assert: the old connection is closed soon, and the new credential starts with an empty session
        assert live.wait_disconnected(DISCONNECT_WITHIN), "the old credential's connection stayed up"
        fresh = backend.probe("dev-a", "pw-new", persistent=True)
        assert not _refused(fresh.connect())
        assert not fresh.session_present
        assert fresh.subscribe(topic("dev-a", Channel.CMD))
        service.publish(topic("dev-a", Channel.CMD), b"for-new")
        assert fresh.expect(topic("dev-a", Channel.CMD), b"for-new") == []
        assert fresh.drain() == []

    @pytest.mark.slow
    def test_delete_and_reenrol_gives_nothing_to_the_stale_session(self, backend: Backend) -> None:
        # Prepare: the old device is connected (persistent, subscribed); a command is queued for it offline
        backend.auth.ensure_device("dev-a", "pw-old")
        stale = backend.device("dev-a", "pw-old", persistent=True)
        assert stale.subscribe(topic("dev-a", Channel.CMD))
        stale.client.reconnect_delay_set(30, 60)
        # Execute: delete, re-enrol the same id with a new password, send the new device a command
        backend.auth.remove_device("dev-a")
        backend.auth.ensure_device("dev-a", "pw-new")
        assert stale.wait_disconnected(DISCONNECT_WITHIN), "the deleted credential's connection stayed up"
        service = backend.service()
        service.publish(topic("dev-a", Channel.CMD), b"for-the-new-device")
        # Assert: the stale session never gets it; the re-enrolled device does, on a fresh session
        assert _refused(backend.probe("dev-a", "pw-old").connect())
        fresh = backend.probe("dev-a", "pw-new", persistent=True)
        assert not _refused(fresh.connect())
        assert not fresh.session_present
        assert fresh.drain() == []
        assert fresh.subscribe(topic("dev-a", Channel.CMD))
        service.publish(topic("dev-a", Channel.CMD), b"for-the-new-device-2")
        assert fresh.expect(topic("dev-a", Channel.CMD), b"for-the-new-device-2") == []
        assert [m for m in stale.drain(0.1) if m[1].startswith(b"for-the-new")] == []


# -- mosquitto dynsec specifics --------------------------------------------------------------------------------


@pytest.mark.integration
class TestMosquittoDynsec:
    def test_remove_device_disconnects_it(self, dynsec_mosquitto: MosquittoInstance) -> None:
        with MosquittoDynsecAuth.from_url(dynsec_mosquitto.url, timeout=5.0) as auth:
            auth.ensure_device("dev-a", "pw-a")
            probe = Probe(
                dynsec_mosquitto.host, dynsec_mosquitto.port, "dev-a", "pw-a", protocol=mqtt.MQTTv5, client_id="dev-a"
            )
            try:
                assert not _refused(probe.connect())
                auth.remove_device("dev-a")
                deadline = time.monotonic() + 5
                while not probe.disconnects and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert probe.disconnects, "mosquitto did not disconnect the removed device"
                assert str(probe.disconnects[0]) == "Administrative action"
            finally:
                probe.close()

    def test_prepare_binds_devices_enrolled_before_client_id_binding(
        self, dynsec_mosquitto: MosquittoInstance
    ) -> None:
        # Prepare: a device client as earlier versions created it (no clientid)
        with MosquittoDynsecAuth.from_url(dynsec_mosquitto.url, timeout=5.0) as auth:
            auth.ensure_device("dev-a", "pw-a")
            auth._execute_one({"command": "setClientId", "username": "dev-a"})  # no clientid: unbound
            unbound = auth._execute_one({"command": "getClient", "username": "dev-a"})
            assert "clientid" not in unbound["data"]["client"]
        other_id = Probe(
            dynsec_mosquitto.host, dynsec_mosquitto.port, "dev-a", "pw-a", protocol=mqtt.MQTTv5, client_id="x"
        )
        try:
            assert not _refused(other_id.connect())  # the hole this closes
        finally:
            other_id.close()
        # Execute: the control plane starts
        with MosquittoDynsecAuth.from_url(dynsec_mosquitto.url, timeout=5.0) as auth:
            auth.prepare()
            bound = auth._execute_one({"command": "getClient", "username": "dev-a"})
        # Assert
        assert bound["data"]["client"]["clientid"] == "dev-a"
        refused = Probe(
            dynsec_mosquitto.host, dynsec_mosquitto.port, "dev-a", "pw-a", protocol=mqtt.MQTTv5, client_id="x"
        )
        own = Probe(
            dynsec_mosquitto.host, dynsec_mosquitto.port, "dev-a", "pw-a", protocol=mqtt.MQTTv5, client_id="dev-a"
        )
        try:
            assert _refused(refused.connect())
            assert not _refused(own.connect())
        finally:
            refused.close()
            own.close()

    def test_roles_on_the_broker(self, dynsec_mosquitto: MosquittoInstance) -> None:
        with MosquittoDynsecAuth.from_url(dynsec_mosquitto.url, timeout=5.0) as auth:
            auth.ensure_device("dev-a", "pw-a")
            role = auth._execute_one({"command": "getRole", "rolename": "edgefleet-device-dev-a"})
            acls = role["data"]["role"]["acls"]
            key = sorted((a["acltype"], a["topic"], a["allow"]) for a in acls)
            assert key == sorted((a["acltype"], a["topic"], a["allow"]) for a in device_role_acls("dev-a"))
            admin = auth._execute_one({"command": "getClient", "username": dynsec_mosquitto.admin_username})
            assert {"admin", "edgefleet-service"} <= {r["rolename"] for r in admin["data"]["client"]["roles"]}
            auth.remove_device("dev-a")
            gone = auth._execute_one(
                {"command": "getRole", "rolename": "edgefleet-device-dev-a"}, ok_errors=("Role not found",)
            )
            assert gone["error"] == "Role not found"

    def test_a_second_instance_is_idempotent(self, dynsec_mosquitto: MosquittoInstance) -> None:
        for _ in range(2):
            with MosquittoDynsecAuth.from_url(dynsec_mosquitto.url, timeout=5.0) as auth:
                auth.ensure_device("dev-a", "pw-a")
        probe = Probe(
                dynsec_mosquitto.host, dynsec_mosquitto.port, "dev-a", "pw-a", protocol=mqtt.MQTTv5, client_id="dev-a"
            )
        try:
            assert not _refused(probe.connect())
        finally:
            probe.close()

    def test_wrong_admin_password_is_a_clear_error(self, dynsec_mosquitto: MosquittoInstance) -> None:
        auth = MosquittoDynsecAuth(
            dynsec_mosquitto.host,
            dynsec_mosquitto.port,
            dynsec_mosquitto.admin_username,
            "wrong",
            timeout=5.0,
        )
        with pytest.raises(BrokerAuthError, match="cannot connect to mosquitto .*(Not authorized|Bad user)"):
            auth.ensure_device("dev-a", "pw-a")
        auth.close()

    def test_no_dynsec_plugin_times_out_with_a_clear_error(self, tmp_path: Path) -> None:
        plain = start_mosquitto(tmp_path / "plain", dynsec=False)
        try:
            auth = MosquittoDynsecAuth(plain.host, plain.port, "edgefleet-admin", "x", timeout=1.0)
            with pytest.raises(
                BrokerAuthError, match="no reply to createRole 'edgefleet-service'.*dynamic-security"
            ):
                auth.ensure_device("dev-a", "pw-a")
            auth.close()
        finally:
            stop_process(plain.process)

    def test_unreachable_broker_is_a_clear_error(self) -> None:
        auth = MosquittoDynsecAuth("127.0.0.1", free_port(), "edgefleet-admin", "x", timeout=1.0)
        with pytest.raises(BrokerAuthError, match="cannot connect to mosquitto at 127.0.0.1"):
            auth.ensure_device("dev-a", "pw-a")
        auth.close()

    def test_refuses_to_touch_the_admin_account(self, dynsec_mosquitto: MosquittoInstance) -> None:
        with MosquittoDynsecAuth.from_url(dynsec_mosquitto.url, timeout=5.0) as auth:
            assert "admin/service account" in (auth.reserved(dynsec_mosquitto.admin_username) or "")
            assert auth.reserved("edgefleet-ingest-x-0") is not None and auth.reserved("dev-a") is None
            with pytest.raises(BrokerAuthError, match="reserved"):
                auth.ensure_device("edgefleet-ingest-x-0", "pw")
            with pytest.raises(BrokerAuthError, match="admin/service account"):
                auth.ensure_device(dynsec_mosquitto.admin_username, "pw")
            with pytest.raises(BrokerAuthError, match="admin/service account"):
                auth.remove_device(dynsec_mosquitto.admin_username)

    def test_deploy_config_runs(self, tmp_path: Path) -> None:
        """deploy/mosquitto/mosquitto.conf, with its paths and port pointed at tmp_path, works as documented."""
        mosquitto, ctrl, plugin = find_mosquitto()
        dynsec_file = tmp_path / "dynamic-security.json"
        password = secrets.token_urlsafe(12)
        subprocess.run(
            [ctrl, "dynsec", "init", str(dynsec_file), "edgefleet-admin", password],
            check=True,
            stdin=subprocess.DEVNULL,
            capture_output=True,
        )
        port = free_port()
        config = (REPO / "deploy" / "mosquitto" / "mosquitto.conf").read_text()
        # The TLS listeners get free ports on loopback and the fleet CA's files (tests/controlplane/test_tls.py
        # checks what they accept); this test is about the dynsec accounts behind them.
        from controlplane.pki import FleetPKI

        FleetPKI(tmp_path / "pki", server_names=["localhost", "127.0.0.1"]).ensure()
        for old, new in {
            "plugin /usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so": f"plugin {plugin}",
            "/var/lib/mosquitto/dynamic-security.json": str(dynsec_file),
            "persistence_location /var/lib/mosquitto/": f"persistence_location {tmp_path}/",
            "\nlistener 1883 127.0.0.1\n": f"\nlistener {port} 127.0.0.1\n",
            "\nlistener 8883\n": f"\nlistener {free_port()} 127.0.0.1\n",
            "\nlistener 8884\n": f"\nlistener {free_port()} 127.0.0.1\n",
            "/etc/mosquitto/certs/": f"{tmp_path}/pki/",
        }.items():
            assert old in config, old
            config = config.replace(old, new)
        if os.geteuid() == 0:
            config += "\nuser root\n"
        (tmp_path / "mosquitto.conf").write_text(config)
        with (tmp_path / "mosquitto.log").open("wb") as log:
            process = subprocess.Popen(
                [mosquitto, "-c", str(tmp_path / "mosquitto.conf")], stdout=log, stderr=log
            )
        try:
            assert wait_for_port("127.0.0.1", port, 10, process), (tmp_path / "mosquitto.log").read_text()
            with MosquittoDynsecAuth.from_url(f"mqtt://edgefleet-admin:{password}@127.0.0.1:{port}") as auth:
                auth.prepare()
                auth.ensure_device("dev-a", "pw-a")
            device = Probe("127.0.0.1", port, "dev-a", "pw-a", protocol=mqtt.MQTTv5, client_id="dev-a")
            anonymous = Probe("127.0.0.1", port, None, None)
            try:
                assert not _refused(device.connect())
                assert _refused(anonymous.connect())  # allow_anonymous false
            finally:
                device.close()
                anonymous.close()
        finally:
            stop_process(process)


# -- embedded broker specifics ---------------------------------------------------------------------------------


@pytest.mark.integration
class TestEmbeddedBroker:
    def test_mqtt5_client_gets_unsupported_protocol_version(
        self, embedded_broker: EmbeddedBrokerInstance
    ) -> None:
        embedded_broker.auth.ensure_device("dev-a", "pw-a")
        # With a password, stock amqtt 0.11.4 hangs on an MQTT 5 CONNECT until the client's keep-alive expires.
        probe = Probe(
            embedded_broker.host, embedded_broker.port, "dev-a", "pw-a", protocol=mqtt.MQTTv5, client_id="dev-a"
        )
        try:
            reason = probe.connect(timeout=5.0)
            assert reason is not None and reason.value == 132, reason  # Unsupported protocol version
        finally:
            probe.close()

    def test_wrong_password_gets_connack_not_authorised(
        self, embedded_broker: EmbeddedBrokerInstance
    ) -> None:
        embedded_broker.auth.ensure_device("dev-a", "pw-a")
        probe = Probe(embedded_broker.host, embedded_broker.port, "dev-a", "bad", client_id="dev-a")
        try:
            reason = probe.connect()
            assert reason is not None and str(reason) == "Not authorized"
        finally:
            probe.close()

    def test_service_account_cannot_be_removed_as_a_device(
        self, embedded_broker: EmbeddedBrokerInstance
    ) -> None:
        assert "service account" in (embedded_broker.auth.reserved(embedded_broker.service_username) or "")
        assert embedded_broker.auth.reserved("EdgeFleet-x") is not None
        assert embedded_broker.auth.reserved("dev-a") is None
        assert NoBrokerAuth().reserved("edgefleet-x") is not None and NoBrokerAuth().reserved("dev-a") is None
        with pytest.raises(BrokerAuthError, match="reserved"):
            embedded_broker.auth.ensure_device("edgefleet-ingest-x-0", "pw")
        with pytest.raises(BrokerAuthError, match="service account"):
            embedded_broker.auth.remove_device(embedded_broker.service_username)
        with pytest.raises(BrokerAuthError, match="service account"):
            embedded_broker.auth.ensure_device(embedded_broker.service_username, "x")

    def test_startup_failure_reports_the_broker_log(self, tmp_path: Path) -> None:
        blocker = EmbeddedBroker(tmp_path / "creds.json")
        with blocker:
            clash = EmbeddedBroker(tmp_path / "creds.json", port=blocker.port)
            with pytest.raises(RuntimeError, match=r"exited with code \d+:(.|\n)*(in use|Errno 98)"):
                clash.start()
        assert not blocker.running


# -- unit: passwords, ACL rule, credentials file ---------------------------------------------------------------


def test_hash_and_verify_password() -> None:
    secret = secrets.token_urlsafe(32)
    hashed = hash_password(secret)
    assert hashed.startswith("$hmac-sha256$")  # a generated secret: one salted HMAC
    assert verify_password(secret, hashed)
    assert not verify_password(secret + " ", hashed)
    assert hash_password(secret) != hashed  # random salt
    assert hash_password("s3cret").startswith("$pbkdf2-sha512$100000$")  # short: maybe a human's, kept slow
    assert verify_password("päss", hash_password_pbkdf2("päss", iterations=1000))
    with pytest.raises(ValueError, match="generated secret"):
        hash_secret("s3cret")
    legacy = hash_password_pbkdf2("s3cret")
    for malformed in (
        "",
        "s3cret",
        "$pbkdf2-sha512$x$y$z",
        "$pbkdf2-sha256$1000$AAAA$AAAA",
        "$hmac-sha256$AAAA$AAAA",
        "$hmac-sha256$$" + hashed.rsplit("$", 1)[1],
        legacy[:-1] + "!",
    ):
        assert not verify_password("s3cret", malformed)
    assert not verify_password(secret, hashed[:-1] + "!")


@pytest.mark.parametrize(
    ("role", "user", "action", "topic_name", "allowed"),
    [
        ("device", "d1", "publish", "edgefleet/v1/devices/d1/telemetry", True),
        ("device", "d1", "publish", "edgefleet/v1/devices/d1/state", True),
        ("device", "d1", "publish", "edgefleet/v1/devices/d1/ack", True),
        ("device", "d1", "publish", "edgefleet/v1/devices/d1/cmd", False),
        ("device", "d1", "publish", "edgefleet/v1/devices/d2/telemetry", False),
        ("device", "d1", "publish", "edgefleet/v1/devices/d1/telemetry/x", False),
        ("device", "d1", "subscribe", "edgefleet/v1/devices/d1/cmd", True),
        ("device", "d1", "subscribe", "edgefleet/v1/devices/+/cmd", False),
        ("device", "d1", "subscribe", "edgefleet/v1/devices/d1/#", False),
        ("device", "d1", "subscribe", "edgefleet/v1/devices/d2/cmd", False),
        ("device", "d1", "receive", "edgefleet/v1/devices/d1/cmd", True),
        ("device", "d1", "receive", "edgefleet/v1/devices/d1/state", False),
        ("device", "+", "subscribe", "edgefleet/v1/devices/+/cmd", False),
        ("service", "cp", "publish", "edgefleet/v1/devices/d1/cmd", True),
        ("service", "cp", "subscribe", "edgefleet/#", True),
        ("service", "cp", "subscribe", "#", False),
        ("service", "cp", "subscribe", "+/v1/devices/d1/cmd", False),
        ("service", "cp", "publish", "other/topic", False),
        ("admin", "cp", "publish", "edgefleet/x", False),
    ],
)
def test_acl_rule(role: str, user: str, action: str, topic_name: str, allowed: bool) -> None:
    assert acl_allows(role, user, action, topic_name) is allowed


def test_credentials_file(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "creds.json"
    creds = CredentialsFile(path)
    assert creds.load() == {}
    assert creds.ensure_user("dev-a", "pw", "device")
    assert not creds.ensure_user("dev-a", "pw", "device")  # unchanged: no write
    assert creds.ensure_user("cp", "pw2", "service")
    assert creds.get("dev-a") is not None and verify_password("pw", creds.get("dev-a").hash)  # type: ignore[union-attr]
    assert creds.database == tmp_path / "sub" / "creds.sqlite3"
    assert stat.S_IMODE(os.stat(creds.database).st_mode) == 0o600
    assert creds.remove_user("dev-a") and not creds.remove_user("dev-a")
    assert set(creds.load()) == {"cp"}
    with pytest.raises(BrokerAuthError, match="invalid broker username"):
        creds.ensure_user("a/b", "pw", "device")
    # A second process (another CredentialsFile) sees every change, and the log names what changed.
    seq = CredentialsFile(path).last_change()
    assert creds.add_user("dev-b", "pw-b", "device") is not None
    assert creds.add_user("dev-b", "pw-other", "device") is None  # add-only: never replaces
    changed = CredentialsFile(path).changes_since(seq)
    assert changed is not None and set(changed[1]) == {"dev-b"} and changed[0] == seq + 1
    creds.close()


def test_a_json_credentials_file_of_an_earlier_version_is_imported(tmp_path: Path) -> None:
    # Prepare: what earlier versions wrote (PBKDF2 hashes in a JSON file)
    path = tmp_path / "creds.json"
    legacy = {"users": {"dev-a": {"hash": hash_password_pbkdf2("pw-a"), "role": "device"},
                        "edgefleet-cp": {"hash": hash_password_pbkdf2("svc"), "role": "service"}}}
    path.write_text(json.dumps(legacy))
    # Execute
    users = CredentialsFile(path).load()
    # Assert: same users, same hashes; the JSON file is kept only as a backup, and a removal sticks
    assert {n: (e.role, e.hash) for n, e in users.items()} == {
        n: (e["role"], e["hash"]) for n, e in legacy["users"].items()}
    assert not path.exists() and (tmp_path / "creds.json.migrated").exists()
    creds = CredentialsFile(path)
    assert creds.remove_user("dev-a")
    assert set(CredentialsFile(path).load()) == {"edgefleet-cp"}


def test_a_malformed_json_credentials_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "creds.json"
    path.write_text("{not json")
    with pytest.raises(BrokerAuthError, match="malformed"):
        CredentialsFile(path).load()


def test_the_broker_and_its_plugin_name_the_certificate_attribute_alike() -> None:
    from controlplane.broker import _amqtt_plugin, _embedded

    assert _amqtt_plugin.CERT_CN_ATTR == _embedded.CERT_CN_ATTR


def test_embedded_auth_and_no_auth_satisfy_the_protocol(tmp_path: Path) -> None:
    backends: list[BrokerAuth] = [
        EmbeddedBrokerAuth(tmp_path / "c.json"),
        NoBrokerAuth(),
        MosquittoDynsecAuth("127.0.0.1"),
    ]
    for auth in backends:
        assert callable(auth.ensure_device) and callable(auth.remove_device) and callable(auth.close)
        auth.close()


def test_dynsec_from_url() -> None:
    auth = MosquittoDynsecAuth.from_url("mqtt://edgefleet-admin:p%40ss@broker.example:1884")
    assert (auth._host, auth._port, auth._username, auth._password) == (
        "broker.example",
        1884,
        "edgefleet-admin",
        "p@ss",
    )
    assert MosquittoDynsecAuth.from_url("mqtts://a:b@h")._port == 8883
    with pytest.raises(ValueError, match="admin's credentials"):
        MosquittoDynsecAuth.from_url("mqtt://broker:1883")
    with pytest.raises(ValueError, match=r"\*\*\*"):
        MosquittoDynsecAuth.from_url("http://a:secret@h")
