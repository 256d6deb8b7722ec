"""The embedded broker's sessions without amqtt's per-session ``transitions.Machine`` (fix 5 of
``controlplane.broker._embedded._make_broker``): the light state holder must behave as the Machine did, for the
session lifecycle a device goes through against the real broker (connect, disconnect, persistent reconnect with
queued QoS 1 commands, Last Will on an abrupt disconnect, take-over of a live client id).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
from amqtt.session import Session
from transitions import MachineError

from agent.protocol import Channel, topic
from controlplane.broker import _embedded
from tests.conftest import EmbeddedBrokerInstance
from tests.controlplane.test_broker_auth import Probe

TAKEOVER_WITHIN = 5.0  # seconds: how soon a taken-over connection must be closed


@pytest.fixture(name="probes")
def fx_probes() -> Iterator[list[Probe]]:
    probes: list[Probe] = []
    yield probes
    for p in probes:
        p.close()


def _probe(broker: EmbeddedBrokerInstance, probes: list[Probe], username: str, password: str,
           **kwargs: object) -> Probe:
    kwargs.setdefault("client_id", username)
    p = Probe(broker.host, broker.port, username, password, **kwargs)  # type: ignore[arg-type]
    probes.append(p)
    return p


def _connected(p: Probe) -> Probe:
    reason = p.connect()
    assert reason is not None and not reason.is_failure, f"could not connect: {reason}"
    return p


def _service(broker: EmbeddedBrokerInstance, probes: list[Probe], *filters: str) -> Probe:
    service = _connected(_probe(broker, probes, broker.service_username, broker.service_password,
                                client_id=None))
    for f in filters:
        assert service.subscribe(f)
    return service


# -- unit: the state holder against transitions' Machine ---------------------------------------------------------


def _outcome(session: object, trigger: str) -> str:
    try:
        getattr(session.transitions, trigger)()  # type: ignore[attr-defined]
    except MachineError as exc:
        return f"MachineError: {exc.value}"
    return "ok"


def _stamps(session: object) -> tuple[bool, bool]:
    return (session.last_connect_time is not None,  # type: ignore[attr-defined]
            session.last_disconnect_time is not None)  # type: ignore[attr-defined]


@pytest.mark.parametrize("sequence", list(itertools.product(["connect", "disconnect"], repeat=5)),
                         ids=lambda seq: "-".join(s[0] for s in seq))
def test_state_holder_follows_amqtts_machine(sequence: tuple[str, ...]) -> None:
    # Prepare: amqtt 0.11.4's own session (transitions.Machine) and ours
    stock, light = Session(), _embedded._session_class()()
    assert type(light.transitions) is _embedded._SessionState
    assert stock.transitions.state == light.transitions.state == "new"
    for trigger in sequence:
        # Execute: the same trigger on both
        expected, got = _outcome(stock, trigger), _outcome(light, trigger)
        # Assert: same result (MachineError and its message included), state, queries and enter-hook stamps
        assert got == expected, (sequence, trigger)
        assert light.transitions.state == stock.transitions.state
        for query in ("is_new", "is_connected", "is_disconnected"):
            assert getattr(light.transitions, query)() == getattr(stock.transitions, query)()
        assert _stamps(light) == _stamps(stock)


def test_disconnect_from_disconnected_runs_the_enter_hook_again() -> None:
    # transitions runs on_enter of a reflexive transition again; the expiry monitor reads the stamp it sets.
    light = _embedded._session_class()()
    light.transitions.disconnect()
    light.last_disconnect_time = 1
    light.transitions.disconnect()
    assert light.last_disconnect_time != 1


def test_make_broker_gives_the_connect_path_light_sessions(tmp_path: Path) -> None:
    from amqtt.mqtt.protocol import broker_handler

    async def build() -> object:
        config = _embedded.broker_config("127.0.0.1", _embedded.free_port(), tmp_path / "creds.json")
        broker = _embedded._make_broker(config)
        return broker.create_offline_session("dev-a")[1]

    offline = asyncio.run(build())
    assert isinstance(broker_handler.Session().transitions, _embedded._SessionState)
    assert isinstance(offline.transitions, _embedded._SessionState)  # type: ignore[attr-defined]
    assert offline.transitions.state == "disconnected"  # type: ignore[attr-defined]
    assert isinstance(offline, Session)


# -- integration: the session lifecycle against the real embedded broker ---------------------------------------


@pytest.mark.integration
class TestSessionLifecycle:
    def test_persistent_session_gets_commands_queued_while_offline(
        self, embedded_broker: EmbeddedBrokerInstance, probes: list[Probe]
    ) -> None:
        embedded_broker.auth.ensure_device("dev-a", "pw-a")
        cmd = topic("dev-a", Channel.CMD)
        first = _connected(_probe(embedded_broker, probes, "dev-a", "pw-a", persistent=True))
        assert not first.session_present
        assert first.subscribe(cmd)
        first.close()
        service = _service(embedded_broker, probes)
        # Two offline periods: new -> connected -> disconnected -> connected -> disconnected -> connected
        for round_ in (b"1", b"2"):
            service.publish(cmd, b"queued-" + round_)
            again = _connected(_probe(embedded_broker, probes, "dev-a", "pw-a", persistent=True))
            assert again.session_present
            assert again.expect(cmd, b"queued-" + round_) == []
            service.publish(cmd, b"live-" + round_)  # connected again: delivered at once, not queued
            assert again.expect(cmd, b"live-" + round_) == []
            again.close()
        assert service.drain(0.1) == []

    def test_clean_session_starts_empty(
        self, embedded_broker: EmbeddedBrokerInstance, probes: list[Probe]
    ) -> None:
        embedded_broker.auth.ensure_device("dev-a", "pw-a")
        cmd = topic("dev-a", Channel.CMD)
        persistent = _connected(_probe(embedded_broker, probes, "dev-a", "pw-a", persistent=True))
        assert persistent.subscribe(cmd)
        persistent.close()
        _service(embedded_broker, probes).publish(cmd, b"for-the-old-session")
        clean = _connected(_probe(embedded_broker, probes, "dev-a", "pw-a"))
        assert not clean.session_present
        assert clean.drain() == []

    def test_abrupt_disconnect_publishes_the_last_will(
        self, embedded_broker: EmbeddedBrokerInstance, probes: list[Probe]
    ) -> None:
        embedded_broker.auth.ensure_device("dev-a", "pw-a")
        state = topic("dev-a", Channel.STATE)
        service = _service(embedded_broker, probes, state)
        device = _connected(_probe(embedded_broker, probes, "dev-a", "pw-a", persistent=True,
                                   will=(state, b"offline")))
        device.publish(state, b"online")
        assert service.expect(state, b"online") == []
        device.drop()
        assert service.expect(state, b"offline") == []
        # The session outlives the connection: the device comes back to it, and a clean DISCONNECT sends no will.
        back = _connected(_probe(embedded_broker, probes, "dev-a", "pw-a", persistent=True,
                                 will=(state, b"offline")))
        assert back.session_present
        back.client.disconnect()
        assert service.drain() == []

    @pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "clean"])
    def test_same_client_id_takes_the_session_over(
        self, embedded_broker: EmbeddedBrokerInstance, probes: list[Probe], persistent: bool
    ) -> None:
        # Prepare: dev-a is connected and subscribed to its commands
        embedded_broker.auth.ensure_device("dev-a", "pw-a")
        cmd, state = topic("dev-a", Channel.CMD), topic("dev-a", Channel.STATE)
        watcher = _service(embedded_broker, probes, state)
        old = _connected(_probe(embedded_broker, probes, "dev-a", "pw-a", persistent=True,
                                will=(state, b"offline")))
        assert old.subscribe(cmd)
        old.client.reconnect_delay_set(30, 60)  # watch the broker close it; no reconnect to take it back
        # Execute: the same device connects again (a reboot whose old TCP connection is not yet dead)
        new = _connected(_probe(embedded_broker, probes, "dev-a", "pw-a", persistent=persistent))
        # Assert: the old connection is closed; the new one has the session (persistent) or a fresh one (clean)
        assert old.wait_disconnected(TAKEOVER_WITHIN), "the taken-over connection stayed up"
        assert new.session_present is persistent
        if not persistent:
            assert new.subscribe(cmd)
        service = _service(embedded_broker, probes)
        service.publish(cmd, b"after-takeover")
        assert new.expect(cmd, b"after-takeover") == []
        assert new.connected and new.disconnects == []
        assert [m for m in old.drain(0.1) if m[1] == b"after-takeover"] == []
        assert watcher.drain(0.1) == []  # the client is back: its old connection's will would say it is offline
