"""Enrolment at fleet scale (issue 10 §3), on the embedded broker and a real SQLite registry: enrolling stays as
fast for the 500th device as for the first, a repeated or racing enrolment never touches the enrolled device's
credentials, a failed registry insert leaves no account that works, and credentials of earlier versions (PBKDF2 in
a JSON file) still connect. Speed itself is measured by bench/enroll.py, not here."""

from __future__ import annotations

import json
import secrets
import sqlite3
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from controlplane._errors import Conflict, NotFound
from controlplane.broker import EmbeddedBroker, hash_password_pbkdf2
from controlplane.db import create_db_engine, migrate
from controlplane.devices.schemas import DeviceCreate
from controlplane.devices.service import DeviceService
from tests.conftest import EmbeddedBrokerInstance
from tests.controlplane.test_broker_auth import Probe, _refused

PROFILE = "raspberry-pi-5"
CUT_WITHIN = 2.0  # seconds: how soon a removed device's live connection must be closed


@pytest.fixture(name="engine")
def fx_engine(tmp_path: Path) -> Iterator[Engine]:
    engine = create_db_engine(f"sqlite:///{tmp_path / 'edgefleet.db'}")
    migrate(engine)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture(name="service")
def fx_service(engine: Engine, embedded_broker: EmbeddedBrokerInstance) -> DeviceService:
    return DeviceService(engine, embedded_broker.auth, embedded_broker.url, publisher=None)


@pytest.fixture(name="probes")
def fx_probes() -> Iterator[list[Probe]]:
    probes: list[Probe] = []
    try:
        yield probes
    finally:
        for probe in probes:
            probe.close()


def _connect(broker: EmbeddedBrokerInstance, probes: list[Probe], username: str, password: str) -> Probe:
    probe = Probe(broker.host, broker.port, username, password, client_id=username)
    probes.append(probe)
    probe.connect()
    return probe


def _enrol(service: DeviceService, device_id: str) -> str:
    return service.enroll(DeviceCreate(device_id=device_id, profile=PROFILE, tags=["scale"])).mqtt_password


@pytest.mark.integration
@pytest.mark.slow
def test_enrolling_the_500th_device_costs_what_the_first_did(
    service: DeviceService, embedded_broker: EmbeddedBrokerInstance, probes: list[Probe]
) -> None:
    # Execute: 500 enrolments, each timed
    passwords: dict[str, str] = {}
    times_ms: list[float] = []
    for i in range(500):
        t0 = time.perf_counter()
        passwords[f"dev-{i:03d}"] = _enrol(service, f"dev-{i:03d}")
        times_ms.append((time.perf_counter() - t0) * 1000)
    first, last = statistics.median(times_ms[:100]), statistics.median(times_ms[-100:])
    # Assert: no growth with the fleet (the JSON file rewritten per enrolment made the last ones slower), and no
    # slow KDF on the way (PBKDF2-SHA512 at 100k iterations alone took ~41 ms); the first and last devices connect
    assert last < 2 * first + 5, f"median ms per enrolment: first 100 {first:.1f}, last 100 {last:.1f}"
    assert last < 30, f"median ms per enrolment of the last 100: {last:.1f}"
    assert service.count() == 500
    for device_id in ("dev-000", "dev-499"):
        assert not _refused(_connect(embedded_broker, probes, device_id, passwords[device_id]).connack)
    assert len(passwords["dev-000"]) >= 43  # secrets.token_urlsafe(32): 256 bits


@pytest.mark.integration
def test_a_duplicate_enrolment_is_a_conflict_and_the_first_device_still_connects(
    service: DeviceService, embedded_broker: EmbeddedBrokerInstance, probes: list[Probe]
) -> None:
    # Prepare
    password = _enrol(service, "dev-a")
    # Execute
    with pytest.raises(Conflict, match="already enrolled"):
        _enrol(service, "dev-a")
    # Assert
    assert not _refused(_connect(embedded_broker, probes, "dev-a", password).connack)


@pytest.mark.integration
def test_racing_enrolments_of_one_id_make_one_device_whose_credentials_work(
    service: DeviceService, embedded_broker: EmbeddedBrokerInstance, probes: list[Probe]
) -> None:
    # Execute: 8 threads enrol the same id at once
    won: list[str] = []
    conflicts: list[Conflict] = []
    barrier = threading.Barrier(8)

    def racer() -> None:
        barrier.wait()
        try:
            won.append(_enrol(service, "dev-race"))
        except Conflict as exc:
            conflicts.append(exc)

    threads = [threading.Thread(target=racer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Assert: one winner, seven 409s, and the winner's password is the one the broker takes
    assert len(won) == 1 and len(conflicts) == 7
    assert not _refused(_connect(embedded_broker, probes, "dev-race", won[0]).connack)


@pytest.mark.integration
def test_a_failed_registry_insert_leaves_no_working_credentials(
    service: DeviceService, engine: Engine, embedded_broker: EmbeddedBrokerInstance
) -> None:
    # Prepare: the database refuses this insert, as it would when another control plane process enrolled the id
    # between our check and our insert
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TRIGGER refuse_racer BEFORE INSERT ON device WHEN NEW.device_id = 'dev-racer' "
            "BEGIN SELECT RAISE(ABORT, 'UNIQUE constraint failed: device.device_id'); END"
        )
    # Execute
    with pytest.raises(Conflict):
        _enrol(service, "dev-racer")
    # Assert: not in the registry, and no broker account was left behind
    with pytest.raises(NotFound):
        service.get("dev-racer")
    assert embedded_broker.auth.credentials.get("dev-racer") is None


@pytest.mark.integration
def test_an_orphan_account_from_a_crash_is_replaced_but_a_fresh_one_is_not(
    service: DeviceService, embedded_broker: EmbeddedBrokerInstance, probes: list[Probe]
) -> None:
    # Prepare: broker accounts without registry rows: one from a crash an hour ago, one just made (an enrolment
    # in flight in another process)
    auth = embedded_broker.auth
    auth.ensure_device("dev-orphan", "left-behind-" + secrets.token_urlsafe(16))
    auth.ensure_device("dev-inflight", "in-flight-" + secrets.token_urlsafe(16))
    with sqlite3.connect(auth.credentials.database) as db:
        db.execute("UPDATE users SET changed_at = changed_at - 3600 WHERE username = 'dev-orphan'")
    # Execute
    password = _enrol(service, "dev-orphan")
    with pytest.raises(Conflict):
        _enrol(service, "dev-inflight")
    # Assert
    assert not _refused(_connect(embedded_broker, probes, "dev-orphan", password).connack)


@pytest.mark.integration
def test_a_deleted_devices_live_connection_is_cut_within_2_s(
    service: DeviceService, embedded_broker: EmbeddedBrokerInstance, probes: list[Probe]
) -> None:
    # Prepare: two devices online
    gone = _connect(embedded_broker, probes, "dev-gone", _enrol(service, "dev-gone"))
    stays = _connect(embedded_broker, probes, "dev-stays", _enrol(service, "dev-stays"))
    gone.client.reconnect_delay_set(30, 60)  # watch the broker close it; no quick reconnect
    assert not _refused(gone.connack) and not _refused(stays.connack)
    # Execute
    service.delete("dev-gone")
    # Assert
    assert gone.wait_disconnected(CUT_WITHIN), "the deleted device's connection stayed up"
    assert stays.connected and stays.disconnects == []


@pytest.mark.integration
def test_rotated_credentials_cut_the_old_connection_and_the_new_ones_connect(
    service: DeviceService, embedded_broker: EmbeddedBrokerInstance, probes: list[Probe]
) -> None:
    # Prepare
    old = _connect(embedded_broker, probes, "dev-rot", _enrol(service, "dev-rot"))
    old.client.reconnect_delay_set(30, 60)
    # Execute
    new_password = service.rotate_credentials("dev-rot").mqtt_password
    # Assert
    assert old.wait_disconnected(CUT_WITHIN), "the old credential's connection stayed up"
    assert not _refused(_connect(embedded_broker, probes, "dev-rot", new_password).connack)
    with pytest.raises(NotFound):
        service.rotate_credentials("dev-never-enrolled")
    assert embedded_broker.auth.credentials.get("dev-never-enrolled") is None


@pytest.mark.integration
def test_pbkdf2_credentials_of_an_earlier_version_still_connect(tmp_path: Path) -> None:
    # Prepare: a data dir of an earlier version: PBKDF2-SHA512 hashes in a JSON credentials file
    password = secrets.token_urlsafe(24)
    path = tmp_path / "broker-credentials.json"
    path.write_text(json.dumps({"users": {"dev-old": {"hash": hash_password_pbkdf2(password), "role": "device"}}}))
    probes: list[Probe] = []
    # Execute
    with EmbeddedBroker(path) as broker:
        try:
            for attempt in (password, password, "wrong-" + password):  # the second is served from the cache
                probe = Probe(broker.host, broker.port, "dev-old", attempt, client_id="dev-old")
                probes.append(probe)
                probe.connect()
                probe.close()
        finally:
            for probe in probes:
                probe.close()
    # Assert
    assert [_refused(p.connack) for p in probes] == [False, False, True]
