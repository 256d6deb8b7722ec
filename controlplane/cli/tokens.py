"""`edgefleet tokens`: operator API tokens, in the control plane's database."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from controlplane.cli._common import RoleOption, fail, load_settings

app = typer.Typer(no_args_is_help=True, help="Operator API tokens.")

def _engine(database_url: str | None, data_dir: Path | None) -> Any:
    from agent.logsetup import configure_logging
    from controlplane._private import private_dir
    from controlplane.db import create_db_engine, migrate

    configure_logging("warning")  # on stderr: stdout carries what scripts read (a new token)
    settings = load_settings(database_url=database_url, data_dir=data_dir).resolved()
    private_dir(settings.data_dir)
    engine = create_db_engine(settings.database_url)
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
) -> None:
    """Create an API token and print it (shown once) — in the control plane's database."""
    from controlplane.auth import Role, create_token

    info, secret = create_token(_engine(database_url, data_dir), Role(role.value), name)
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
