"""Fixtures for the real services the tests run against: PostgreSQL, SQLite, mosquitto.

Locally a missing service skips the tests that need it; in CI (CI=true) it fails them.
"""

from __future__ import annotations

import getpass
import os
import subprocess
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.processes import free_port, mosquitto_binary, port_open, stop_process, wait_for_port

__all__ = [
    "MOSQUITTO_HOST",
    "MOSQUITTO_PORT",
    "PG_HOST",
    "PG_PORT",
    "PrivateMosquitto",
    "clear_retained",
    "fleet_settings",
    "free_port",
    "fx_database_url",
    "fx_fleet",
    "fx_mosquitto_url",
    "fx_pg_url",
    "fx_private_mosquitto",
    "in_ci",
    "mosquitto_binary",
    "port_open",
    "purge_retained",
    "service_missing",
    "stop_process",
    "wait_for",
    "wait_for_port",
]

PG_HOST = os.environ.get("EDGEFLEET_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("EDGEFLEET_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("EDGEFLEET_TEST_PG_USER", "postgres")
PG_ADMIN_DB = os.environ.get("EDGEFLEET_TEST_PG_DB", "test")
MOSQUITTO_HOST = "127.0.0.1"
MOSQUITTO_PORT = int(os.environ.get("EDGEFLEET_TEST_MOSQUITTO_PORT", "1883"))


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def service_missing(what: str) -> None:
    """Skip locally, fail in CI: there a missing service is a broken CI image, not a reason to skip."""
    if in_ci():
        pytest.fail(f"{what} is required in CI but is not available", pytrace=False)
    pytest.skip(f"{what} not available")


def fleet_settings(broker_url: str, data_dir: Path, database_url: str | None = None, **overrides: Any) -> Any:
    """Control-plane settings for a test on a shared broker: its own share group and client ids, so tests on
    the same mosquitto never consume each other's messages, and short broker sessions."""
    from controlplane.settings import BrokerAuthMode, Settings

    return Settings(data_dir=data_dir, database_url=database_url, broker_url=broker_url,
                    broker_auth=BrokerAuthMode.NONE, ingest_group=f"test-{uuid.uuid4().hex[:8]}",
                    instance_name=uuid.uuid4().hex[:8], ingest_session_expiry_s=30, **overrides)


@pytest.fixture(name="engine")
def fx_engine(database_url: str) -> Iterator[Any]:
    """A migrated engine on each of the two databases (import it where a test module wants this one)."""
    from controlplane.db import create_db_engine, migrate

    engine = create_db_engine(database_url)
    migrate(engine)
    yield engine
    engine.dispose()


@pytest.fixture(name="fleet")
def fx_fleet(mosquitto_url: str, database_url: str, tmp_path: Path) -> Iterator[Any]:
    """A started control plane on the machine's mosquitto and each of the two databases (import it where a test
    module wants this one)."""
    from controlplane.wiring import Fleet

    fleet = Fleet(fleet_settings(mosquitto_url, tmp_path / "cp", database_url)).start()
    yield fleet
    device_ids = [d.device_id for d in fleet.devices.find(limit=100_000)]
    fleet.stop()
    clear_retained(mosquitto_url, device_ids)


def clear_retained(broker_url: str, device_ids: Iterable[str]) -> None:
    """Remove what these devices left retained on a shared broker (their agents' state and last will): a later
    test's ingest subscribes to every device's topics and would otherwise receive it as foreign traffic."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from agent import protocol as wire

    url = urlsplit(broker_url)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"test-cleanup-{uuid.uuid4().hex[:8]}")
    client.connect(url.hostname or "127.0.0.1", url.port or 1883)
    client.loop_start()
    try:
        for device_id in device_ids:
            for channel in wire.Channel:
                client.publish(wire.topic(device_id, channel), b"", qos=1, retain=True).wait_for_publish(5)
    finally:
        client.disconnect()
        client.loop_stop()


def wait_for(predicate: Callable[[], object], timeout: float = 30.0, what: str = "condition") -> None:
    """Poll until `predicate()` is true; fail the test naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(name="pg_url")
def fx_pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test."""
    if not port_open(PG_HOST, PG_PORT):
        service_missing(f"PostgreSQL on {PG_HOST}:{PG_PORT}")
    import psycopg

    name = f"edgefleet_test_{uuid.uuid4().hex[:10]}"
    admin = f"host={PG_HOST} port={PG_PORT} user={PG_USER} dbname={PG_ADMIN_DB}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql+psycopg://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(name="database_url", params=["sqlite", "postgresql"])
def fx_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test that uses it runs on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'edgefleet.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture(name="mosquitto_url")
def fx_mosquitto_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """The machine's mosquitto (anonymous, as in CI), with nothing retained under ``edgefleet/`` before the test
    and after it: a control plane's ingest subscribes to every device's topics, so what one test leaves retained
    (an agent's state or last will) would reach the next test as foreign traffic. A leak is named as a warning."""
    if not port_open(MOSQUITTO_HOST, MOSQUITTO_PORT):
        service_missing(f"mosquitto on {MOSQUITTO_HOST}:{MOSQUITTO_PORT}")
    url = f"mqtt://{MOSQUITTO_HOST}:{MOSQUITTO_PORT}"
    purge_retained(url)
    yield url
    leaked = purge_retained(url)
    if leaked:
        warnings.warn(f"{request.node.nodeid} left {len(leaked)} retained message(s) on the shared broker: "
                      f"{sorted(leaked)[:5]}", stacklevel=1)


def purge_retained(broker_url: str, prefix: str = "edgefleet/") -> list[str]:
    """Clear every retained message under ``prefix`` on a shared broker; the topics cleared. Deterministic, not
    a sleep: the broker sends a subscription's retained messages before anything published after the SUBACK, so
    once a marker published after it comes back, every retained message has arrived."""
    import threading

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    url = urlsplit(broker_url)
    marker = f"edgefleet-test/purge/{uuid.uuid4().hex}"
    retained: list[str] = []
    subscribed, done = threading.Event(), threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"test-purge-{uuid.uuid4().hex[:8]}")
    client.on_subscribe = lambda *_: subscribed.set()

    def on_message(_c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == marker:
            done.set()
        elif msg.retain and msg.payload:
            retained.append(msg.topic)

    client.on_message = on_message
    client.connect(url.hostname or "127.0.0.1", url.port or 1883)
    client.loop_start()
    try:
        client.subscribe([(f"{prefix}#", 1), (marker, 1)])
        if not subscribed.wait(5):
            raise RuntimeError(f"{broker_url}: no SUBACK within 5 s")
        client.publish(marker, b"", qos=1)
        if not done.wait(5):
            raise RuntimeError(f"{broker_url}: the purge marker did not come back within 5 s")
        client.unsubscribe(f"{prefix}#")
        for topic in retained:
            client.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
    finally:
        client.disconnect()
        client.loop_stop()
    return retained


@dataclass
class PrivateMosquitto:
    """A mosquitto process of our own (e.g. to take it down and bring it back in an outage test)."""

    port: int
    config: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        binary = mosquitto_binary()
        if binary is None:
            raise RuntimeError("mosquitto is not installed")
        self.proc = subprocess.Popen([binary, "-c", str(self.config)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        if not wait_for_port("127.0.0.1", self.port, 10.0, self.proc):
            exited = self.proc.poll() is not None
            err = self.proc.stderr.read().decode() if self.proc.stderr and exited else ""
            stop_process(self.proc)
            raise RuntimeError(f"mosquitto did not start on {self.port}: {err}")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        self.proc = None


@pytest.fixture(name="private_mosquitto")
def fx_private_mosquitto(tmp_path: Path) -> Iterator[PrivateMosquitto]:
    """An anonymous mosquitto on a free port that a test may stop and restart."""
    if mosquitto_binary() is None:
        service_missing("the mosquitto binary")
    port = free_port()
    config = tmp_path / "mosquitto.conf"
    config.write_text(
        # `user`: as root, mosquitto would drop to the `mosquitto` user and could not write its persistence here.
        f"user {getpass.getuser()}\nlistener {port} 127.0.0.1\nallow_anonymous true\n"
        # Persistence: QoS 1 messages the broker accepted survive its restart (as in production).
        f"persistence true\npersistence_location {tmp_path}/\n"
        "max_queued_messages 100000\nmax_inflight_messages 1000\n"
    )
    broker = PrivateMosquitto(port, config)
    broker.start()
    yield broker
    broker.stop()
