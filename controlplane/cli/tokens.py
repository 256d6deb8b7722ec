"""`edgefleet tokens`: operator API tokens, in the control plane's database."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from controlplane.cli._common import RoleOption, fail, load_settings

app = typer.Typer(no_args_is_help=True, help="Operator API tokens.")


def _engine(database_url: str | None, data_dir: Path | None, *, create: bool = False) -> Any:
    """The control plane's database, brought to the newest schema. A token command never makes a new database by
    mistake (one pointed at the wrong data dir would hand out a token the running control plane does not know):
    a missing or empty one is refused unless `create`. Says on stderr which database it used."""
    from sqlalchemy import inspect
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from agent.logsetup import configure_logging
    from controlplane._private import private_dir
    from controlplane.db import create_db_engine, migrate

    configure_logging("warning")  # on stderr: stdout carries what scripts read (a new token)
    settings = load_settings(database_url=database_url, data_dir=data_dir).resolved()
    url = make_url(settings.database_url)
    shown = url.render_as_string(hide_password=True)
    sqlite_file = url.database if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:") \
        else None
    where = str(Path(sqlite_file).resolve()) if sqlite_file is not None else shown
    hint = ("start the control plane with this data dir first (edgefleet controlplane serve), point --data-dir / "
            "--database-url (EDGEFLEET_DATA_DIR / EDGEFLEET_DATABASE_URL) at its database, or make a new one with "
            "`tokens create --create`")
    if not create and sqlite_file is not None and not Path(sqlite_file).is_file():
        fail(f"no database at {where}: {hint}", 1)
    private_dir(settings.data_dir)
    engine = create_db_engine(settings.database_url)
    try:
        empty = not inspect(engine).get_table_names()
    except SQLAlchemyError as exc:
        fail(f"cannot open the database {where}: {getattr(exc, 'orig', None) or exc}", 1)
    if empty and not create:
        fail(f"the database {where} has no tables (not a control plane's database): {hint}", 1)
    typer.secho(f"database: {where}" + (" (created)" if empty else ""), err=True)
    migrate(engine)
    return engine


DatabaseOpt = Annotated[str | None, typer.Option(help="[env EDGEFLEET_DATABASE_URL]")]
DataDirOpt = Annotated[Path | None, typer.Option(help="[env EDGEFLEET_DATA_DIR]")]


@app.command("create")
def tokens_create(
    role: Annotated[RoleOption, typer.Option(help="admin | operator | viewer")],
    name: Annotated[str, typer.Option(help="A label for the token.")] = "",
    database_url: DatabaseOpt = None,
    data_dir: DataDirOpt = None,
    create: Annotated[bool, typer.Option(
        "--create", help="Make the database if it does not exist yet (a fresh data dir).")] = False,
) -> None:
    """Create an API token and print it (shown once) — in the control plane's existing database."""
    from controlplane.auth import Role, create_token

    info, secret = create_token(_engine(database_url, data_dir, create=create), Role(role.value), name)
    typer.echo(secret)
    typer.secho(f"token #{info.id} '{info.name}' role={info.role}", err=True, fg=typer.colors.GREEN)


@app.command("list")
def tokens_list(database_url: DatabaseOpt = None, data_dir: DataDirOpt = None) -> None:
    """List API tokens (never their secrets)."""
    from controlplane.auth import list_tokens

    typer.echo(f"{'ID':>4} {'ROLE':<9} {'REVOKED':<8} {'CREATED':<26} NAME")
    for t in list_tokens(_engine(database_url, data_dir)):
        typer.echo(f"{t.id:>4} {t.role:<9} {'yes' if t.revoked else 'no':<8} {t.created_at.isoformat():<26} {t.name}")


@app.command("revoke")
def tokens_revoke(token_id: int, database_url: DatabaseOpt = None, data_dir: DataDirOpt = None) -> None:
    """Revoke an API token by id."""
    from controlplane.auth import revoke_token

    if not revoke_token(_engine(database_url, data_dir), token_id):
        fail(f"no token #{token_id}", 1)
    typer.echo(f"token #{token_id} revoked")
