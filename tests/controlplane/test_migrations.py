"""The alembic migrations build exactly the schema the SQLModel tables declare, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlmodel import SQLModel

import controlplane.db  # noqa: F401 - registers every table on SQLModel.metadata
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
