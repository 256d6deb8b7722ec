"""The embedded broker's sessions without amqtt's per-session ``transitions.Machine`` (fix 5 of
``controlplane.broker._embedded._make_broker``): the light state holder must behave as the Machine did, for the
session lifecycle a device goes through against the real broker (connect, disconnect, persistent reconnect with
queued QoS 1 commands, Last Will on an abrupt disconnect, take-over of a live client id).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from amqtt.session import Session
from transitions import MachineError

from agent.protocol import Channel, topic
from controlplane.broker import _embedded
from controlplane.broker._amqtt_plugin import DenialLog
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


# -- keep-alive: a silent client is disconnected after 1.5 x its keep-alive (fix 7) ---------------------------------

RAW_KEEPALIVE = 2  # seconds: the broker must close a silent connection after 3


def _utf8(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return len(data).to_bytes(2, "big") + data


def _connect_packet(client_id: str, username: str, password: str, keepalive: int,
                    will: tuple[str, bytes] | None) -> bytes:
    """An MQTT 3.1.1 CONNECT: clean session, username and password, a retained QoS 1 Last Will if given."""
    flags = 0x80 | 0x40 | 0x02
    payload = _utf8(client_id)
    if will is not None:
        flags |= 0x04 | (1 << 3) | 0x20
        payload += _utf8(will[0]) + _utf8(will[1])
    payload += _utf8(username) + _utf8(password)
    body = _utf8("MQTT") + bytes([4, flags]) + keepalive.to_bytes(2, "big") + payload
    assert len(body) < 128  # one-byte remaining length
    return bytes([0x10, len(body)]) + body


class RawClient:
    """A bare socket speaking just enough MQTT: it can go silent without closing, as a cut-off device does."""

    def __init__(self, broker: EmbeddedBrokerInstance, device_id: str, password: str, *, keepalive: int,
                 will: tuple[str, bytes] | None = None) -> None:
        self.sock = socket.create_connection((broker.host, broker.port), timeout=5)
        self.sock.sendall(_connect_packet(device_id, device_id, password, keepalive, will))
        assert self._read(4) == b"\x20\x02\x00\x00", "CONNACK: accepted"

    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                break
            data += chunk
        return data

    def ping(self) -> bool:
        """PINGREQ; whether PINGRESP came back."""
        try:
            self.sock.sendall(b"\xc0\x00")
            return self._read(2) == b"\xd0\x00"
        except OSError:
            return False

    def closed_by_broker(self, timeout: float) -> bool:
        """Whether the broker closed the connection (EOF or reset) within ``timeout`` seconds."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(b"\xe0\x00")  # DISCONNECT: no will
        self.sock.close()


@pytest.fixture(name="raw_clients")
def fx_raw_clients() -> Iterator[list[RawClient]]:
    clients: list[RawClient] = []
    yield clients
    for c in clients:
        c.close()


@pytest.mark.integration
@pytest.mark.slow
def test_a_silent_client_is_disconnected_after_one_and_a_half_keepalives_and_its_will_published(
    embedded_broker: EmbeddedBrokerInstance, probes: list[Probe], raw_clients: list[RawClient]
) -> None:
    # Prepare: three devices, their state (where the agent's will says offline) watched by the control plane
    devices = ("dev-silent", "dev-pinging", "dev-no-keepalive")
    for device_id in devices:
        embedded_broker.auth.ensure_device(device_id, "pw-" + device_id)
    service = _service(embedded_broker, probes, *(topic(d, Channel.STATE) for d in devices))

    def raw(device_id: str, keepalive: int) -> RawClient:
        client = RawClient(embedded_broker, device_id, "pw-" + device_id, keepalive=keepalive,
                           will=(topic(device_id, Channel.STATE), b"offline"))
        raw_clients.append(client)
        return client

    # Execute: one goes silent with its socket open (a link down: no FIN, no RST), one pings twice a second, one
    # asked for no keep-alive and is silent too
    silent = raw("dev-silent", RAW_KEEPALIVE)
    started = time.monotonic()
    pinging, no_keepalive = raw("dev-pinging", RAW_KEEPALIVE), raw("dev-no-keepalive", 0)
    pings: list[bool] = []
    stop = threading.Event()

    def ping_loop() -> None:
        while not stop.wait(0.5):
            pings.append(pinging.ping())

    pinger = threading.Thread(target=ping_loop, daemon=True)
    pinger.start()
    try:
        early = service.expect(topic("dev-silent", Channel.STATE), b"offline", timeout=3 * RAW_KEEPALIVE)
        after = time.monotonic() - started
        time.sleep(RAW_KEEPALIVE)  # the pinging one lives past its own 1.5 keep-alives
    finally:
        stop.set()
        pinger.join()
    # Assert: the silent one's will was published after 1.5 keep-alives (not before, not much later), its socket
    # closed; nothing else was published
    assert early == []
    assert 1.5 * RAW_KEEPALIVE - 0.2 <= after <= 1.5 * RAW_KEEPALIVE + 1.5, after
    assert silent.closed_by_broker(0.5)
    assert service.drain(0.2) == []
    # ... the pinging one and the one without keep-alive are kept
    assert pings and all(pings), pings
    assert pinging.ping() and no_keepalive.ping()
    # ... the silent one's will is its retained state: a watcher that comes later still learns it is offline
    late = _service(embedded_broker, probes, topic("dev-silent", Channel.STATE))
    assert late.expect(topic("dev-silent", Channel.STATE), b"offline") == []


@pytest.mark.integration
@pytest.mark.slow
def test_a_silent_client_is_not_disconnected_before_one_and_a_half_keepalives(
    embedded_broker: EmbeddedBrokerInstance, probes: list[Probe], raw_clients: list[RawClient]
) -> None:
    embedded_broker.auth.ensure_device("dev-a", "pw-a")
    service = _service(embedded_broker, probes, topic("dev-a", Channel.STATE))
    client = RawClient(embedded_broker, "dev-a", "pw-a", keepalive=RAW_KEEPALIVE,
                       will=(topic("dev-a", Channel.STATE), b"offline"))
    raw_clients.append(client)
    started = time.monotonic()
    # Silent past one keep-alive (where amqtt's own read timeout fires) but under 1.5: still connected
    assert not client.closed_by_broker(RAW_KEEPALIVE * 1.25)
    assert client.ping()
    assert service.drain(0.1) == []
    assert time.monotonic() - started < RAW_KEEPALIVE * 1.5


# -- ACL denials: a warning naming who, what and where, rate-limited, and counted ---------------------------------


@pytest.fixture(name="quiet_broker")
def fx_quiet_broker(tmp_path: Path) -> Iterator[EmbeddedBrokerInstance]:
    """The embedded broker at the log level the control plane runs it at (WARNING)."""
    from controlplane.broker import EmbeddedBroker, EmbeddedBrokerAuth

    credentials = tmp_path / "embedded-broker" / "credentials.json"
    auth = EmbeddedBrokerAuth(credentials)
    service_password = secrets.token_urlsafe(12)
    auth.ensure_service("edgefleet-cp", service_password)
    with EmbeddedBroker(credentials, log_level="WARNING") as broker:
        yield EmbeddedBrokerInstance(broker, auth, "edgefleet-cp", service_password)


def _denial_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if "WARNING controlplane.broker.acl: ACL denied" in line]


@pytest.mark.integration
def test_a_publish_on_another_devices_topic_is_a_rate_limited_warning_and_counted(
    quiet_broker: EmbeddedBrokerInstance, probes: list[Probe]
) -> None:
    # Prepare: the control plane reads dev-b's telemetry; dev-a and dev-c are enrolled too
    for device_id in ("dev-a", "dev-b", "dev-c"):
        quiet_broker.auth.ensure_device(device_id, "pw-" + device_id)
    victim = topic("dev-b", Channel.TELEMETRY)
    service = _service(quiet_broker, probes, victim)
    hostile = _connected(_probe(quiet_broker, probes, "dev-a", "pw-dev-a"))
    # Execute: dev-a publishes on dev-b's telemetry five times; dev-c tries to subscribe to dev-b's commands
    for i in range(5):
        hostile.publish(victim, b'{"forged": %d}' % i)
    other = _connected(_probe(quiet_broker, probes, "dev-c", "pw-dev-c"))
    assert not other.subscribe(topic("dev-b", Channel.CMD))
    # Assert: nothing was delivered as dev-b's
    assert service.drain(0.3) == []
    # ... one warning line for dev-a's five publishes (rate-limited), one for dev-c's subscribe, each naming the
    # client, the user, the action and the topic
    lines = _denial_lines(quiet_broker.broker.stderr_tail())
    assert len(lines) == 2, lines
    assert f"ACL denied publish of {victim!r} to client 'dev-a' (user 'dev-a')" in lines[0]
    assert f"ACL denied subscribe of {topic('dev-b', Channel.CMD)!r} to client 'dev-c' (user 'dev-c')" in lines[1]
    # ... and counted: the broker's summary on shutdown
    quiet_broker.broker.stop()
    summaries = [line for line in quiet_broker.broker.stderr_tail().splitlines()
                 if "WARNING controlplane.broker.acl: ACL denials:" in line]
    assert len(summaries) == 1, summaries
    assert "ACL denials: 6 since start (publish 5, subscribe 1)" in summaries[0]
    assert "by user: 'dev-a' 5, 'dev-c' 1" in summaries[0]


def test_denial_log_is_one_line_per_client_per_interval_with_what_was_left_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = DenialLog(logging.getLogger("test.acl"), interval=0.3)
    with caplog.at_level(logging.WARNING, logger="test.acl"):
        for _ in range(100):  # a flood
            log.record("dev-a", "dev-a", "publish", "edgefleet/v1/devices/dev-b/telemetry")
        log.record("dev-c", "dev-c", "subscribe", "edgefleet/v1/devices/dev-b/cmd")  # another client: its own
        time.sleep(0.35)
        log.record("dev-a", "dev-a", "publish", "edgefleet/v1/devices/dev-b/telemetry")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert "to client 'dev-a'" in lines[0] and "left out" not in lines[0]
    assert "to client 'dev-c'" in lines[1]
    assert "(99 more denial(s) of this client left out since its last line)" in lines[2]
    assert log.total == 102 and log.by_user == {"dev-a": 101, "dev-c": 1}
    first = log.summary()
    assert first is not None and "102 since start (publish 101, subscribe 1), 102 since the last summary" in first
    assert log.summary() is None  # nothing new
    assert log.summary(force=True) is not None
