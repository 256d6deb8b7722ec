"""Schedules fire through the service that owns them: no module-level state links a stored job to a control plane,
so two schedule services in one process (two control planes, or a test beside a running one) never cross."""

from __future__ import annotations

from pathlib import Path

from controlplane.db import create_db_engine, migrate
from controlplane.rounds.schemas import RoundCreate
from controlplane.schedules import ScheduleCreate, ScheduleService
from tests._services import wait_for


def test_two_schedule_services_in_one_process_each_fire_their_own(tmp_path: Path) -> None:
    # Prepare: two control planes' databases, one schedule each, due every second
    fired: dict[str, list[tuple[str, RoundCreate]]] = {"a": [], "b": []}
    services = []
    for name in ("a", "b"):
        engine = create_db_engine(f"sqlite:///{tmp_path / name}.db")
        migrate(engine)
        service = ScheduleService(engine, on_fire=lambda sid, data, name=name: fired[name].append((sid, data)),
                                  validate=lambda data: None)
        rounds = 2 if name == "a" else 3
        service.create(ScheduleCreate(id=f"every-second-{name}", interval_s=1, round=RoundCreate(rounds=rounds)))
        services.append((service, engine))
    # Execute
    for service, _ in services:
        service.start()
    try:
        wait_for(lambda: fired["a"] and fired["b"], timeout=15, what="both schedules fired")
    finally:
        for service, engine in services:
            service.stop()
            engine.dispose()
    # Assert: each service started its own schedule's round, decoded from its own job store
    assert {sid for sid, _ in fired["a"]} == {"every-second-a"} and fired["a"][0][1].rounds == 2
    assert {sid for sid, _ in fired["b"]} == {"every-second-b"} and fired["b"][0][1].rounds == 3
