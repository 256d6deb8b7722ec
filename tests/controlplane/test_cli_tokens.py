"""`edgefleet tokens` never makes a database by mistake: pointed at a data dir without the control plane's database
(a typo, another machine's path) it refuses and names the database, instead of creating an empty one whose token
the running control plane then rejects; `--create` makes one on purpose; every command says which database it used."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from typer.testing import CliRunner

from controlplane.auth import Role, create_token, verify_token
from controlplane.cli import app
from controlplane.db import create_db_engine, migrate

runner = CliRunner(mix_stderr=False)  # stdout is the token alone; stderr names the database


def a_control_planes_database(data_dir: Path) -> str:
    """The database `edgefleet controlplane serve --data-dir` leaves behind (same file, same schema)."""
    url = f"sqlite:///{data_dir / 'edgefleet.db'}"
    migrate(create_db_engine(url))
    return url


def test_a_data_dir_without_a_database_is_refused_and_named(tmp_path: Path) -> None:
    # Prepare: a data dir the control plane never ran in
    data_dir = tmp_path / "elsewhere"
    # Execute
    result = runner.invoke(app, ["tokens", "create", "--role", "admin", "--data-dir", str(data_dir)])
    listed = runner.invoke(app, ["tokens", "list", "--data-dir", str(data_dir)])
    # Assert: one clear line naming the file; nothing was created
    database = data_dir.resolve() / "edgefleet.db"
    assert result.exit_code == 1, result.stderr
    assert f"error: no database at {database}" in result.stderr and "--create" in result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr
    assert listed.exit_code == 1 and f"no database at {database}" in listed.stderr
    assert not database.exists()


def test_an_empty_database_file_is_refused(tmp_path: Path) -> None:
    # Prepare: a SQLite file without tables (what a token command used to leave behind is at least as empty)
    database = tmp_path / "edgefleet.db"
    sqlite3.connect(database).close()
    # Execute
    result = runner.invoke(app, ["tokens", "create", "--role", "viewer", "--database-url", f"sqlite:///{database}"])
    # Assert
    assert result.exit_code == 1, result.stderr
    assert f"the database {database} has no tables" in result.stderr
    with sqlite3.connect(database) as db:
        assert db.execute("select count(*) from sqlite_master").fetchone() == (0,)


def test_create_makes_the_database_on_purpose(tmp_path: Path) -> None:
    # Prepare
    data_dir = tmp_path / "fresh"
    # Execute
    result = runner.invoke(app, ["tokens", "create", "--role", "operator", "--data-dir", str(data_dir), "--create"])
    # Assert: a working token in a new, migrated database, and stderr says which one
    assert result.exit_code == 0, result.stderr
    database = data_dir.resolve() / "edgefleet.db"
    assert f"database: {database} (created)" in result.stderr
    secret = result.stdout.strip()
    info = verify_token(create_db_engine(f"sqlite:///{database}"), secret)
    assert info is not None and info.role is Role.OPERATOR


def test_an_existing_database_is_used_and_named(tmp_path: Path) -> None:
    # Prepare: the control plane's database with one token already
    url = a_control_planes_database(tmp_path)
    create_token(create_db_engine(url), Role.ADMIN, "first")
    # Execute
    created = runner.invoke(app, ["tokens", "create", "--role", "viewer", "--name", "second", "--data-dir",
                                  str(tmp_path)])
    listed = runner.invoke(app, ["tokens", "list", "--database-url", url])
    revoked = runner.invoke(app, ["tokens", "revoke", "1", "--database-url", url])
    # Assert: stdout is the token alone (scripts read it); the database is named on stderr every time
    database = tmp_path.resolve() / "edgefleet.db"
    assert created.exit_code == 0, created.stderr
    assert f"database: {database}\n" in created.stderr and "(created)" not in created.stderr
    assert verify_token(create_db_engine(url), created.stdout.strip()) is not None
    assert listed.exit_code == 0 and "first" in listed.stdout and "second" in listed.stdout
    assert f"database: {database}" in listed.stderr
    assert revoked.exit_code == 0 and f"database: {database}" in revoked.stderr
