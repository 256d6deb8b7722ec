"""The alembic migrations build exactly the schema the SQLModel tables declare, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlmodel import SQLModel

import controlplane.db  # registers every table on SQLModel.metadata
from controlplane.db import create_db_engine, migrate

pytestmark = pytest.mark.integration


def test_migrations_match_the_models(database_url: str) -> None:
    # Prepare
    engine = create_db_engine(database_url)
    # Execute
    migrate(engine)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
    engine.dispose()
    # Assert: APScheduler's own table is not ours to declare
    diff = [d for d in diff if not (d[0] == "remove_table" and d[1].name.startswith("apscheduler"))]
    assert diff == []


def test_0008_adds_provisioning_tokens_and_downgrades_cleanly(database_url: str) -> None:
    from pathlib import Path

    from alembic import command
    from alembic.config import Config
    from sqlalchemy import inspect

    # Prepare: a database at 0007 with a device in it
    engine = create_db_engine(database_url)
    config = Config()
    config.set_main_option("script_location", str(Path(controlplane.db.__file__).parent / "migrations"))

    def to(revision: str, down: bool = False) -> None:
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            (command.downgrade if down else command.upgrade)(config, revision)

    to("0007")
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO device (device_id, profile, created_at, online) "
                             "VALUES ('pi-1', 'raspberry-pi-4', '2026-11-26 00:00:00', false)")
    # Execute
    to("0008")
    after_upgrade = inspect(engine)
    tables, device_columns = after_upgrade.get_table_names(), {c["name"] for c in after_upgrade.get_columns("device")}
    to("0007", down=True)
    after_downgrade = inspect(engine)
    # Assert: the device survived both ways; 0008's table and column come and go
    assert "provisioning_token" in tables
    assert "flower_public_key" in device_columns
    assert "provisioning_token" not in after_downgrade.get_table_names()
    assert "flower_public_key" not in {c["name"] for c in after_downgrade.get_columns("device")}
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT device_id FROM device").scalars().all() == ["pi-1"]
    engine.dispose()
