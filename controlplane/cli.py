"""The `edgefleet` command line. Heavy imports happen inside commands so the agent side stays light."""

from __future__ import annotations

import enum
import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False, help="EdgeFleet: ML on fleets of edge devices.")
profiles_app = typer.Typer(no_args_is_help=True, help="Firmware profiles (device classes).")
cp_app = typer.Typer(no_args_is_help=True, help="The control plane.")
tokens_app = typer.Typer(no_args_is_help=True, help="Operator API tokens.")
app.add_typer(profiles_app, name="profiles")
app.add_typer(cp_app, name="controlplane")
app.add_typer(tokens_app, name="tokens")


class RoleOption(enum.StrEnum):  # typer 0.15 rejects Literal options: use enums
    admin = "admin"
    operator = "operator"
    viewer = "viewer"


class StrategyOption(enum.StrEnum):
    fedavg = "fedavg"
    fedprox = "fedprox"
    fedadam = "fedadam"


class BrokerAuthOption(enum.StrEnum):
    embedded = "embedded"
    dynsec = "dynsec"
    none = "none"


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


# -- profiles ------------------------------------------------------------------------------------------------
@profiles_app.command("list")
def profiles_list(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """List the shipped firmware profiles."""
    from firmware_profiles import ProfileError, load_profiles

    try:
        profiles = load_profiles()
    except ProfileError as exc:
        _fail(str(exc))
    if as_json:
        import msgspec

        typer.echo(msgspec.json.encode(list(profiles.values())).decode())
        return
    header = f"{'NAME':<22} {'ARCH':<8} {'RAM MB':>7} {'RUNTIME':<22} {'TRAIN':<6} VARIANTS"
    typer.echo(header)
    for p in profiles.values():
        runtime = f"{p.runtime.name} {p.runtime.version}"
        train = "yes" if p.training.allowed else "no"
        typer.echo(f"{p.name:<22} {p.hardware.cpu_arch:<8} {p.hardware.ram_mb:>7} {runtime:<22} {train:<6} "
                   f"{','.join(p.variants)}")


@profiles_app.command("show")
def profiles_show(name: str) -> None:
    """Show one profile in full (JSON)."""
    import msgspec

    from firmware_profiles import ProfileError, get_profile

    try:
        profile = get_profile(name)
    except ProfileError as exc:
        _fail(str(exc))
    typer.echo(msgspec.json.format(msgspec.json.encode(profile), indent=2).decode())


# -- agent ---------------------------------------------------------------------------------------------------
@app.command(
    "agent",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    help="The device agent: `edgefleet agent run --help`.",
)
def agent_cmd(ctx: typer.Context) -> None:
    """The console script hands `edgefleet agent ...` straight to agent._cli (no typer in the device process);
    this entry serves the same parser when the typer app is driven directly (tests, `python -m controlplane.cli`)."""
    from agent._cli import main as agent_main

    raise typer.Exit(agent_main(list(ctx.args)))


# -- control plane -------------------------------------------------------------------------------------------
def _settings(**overrides: Any) -> Any:
    from controlplane.settings import Settings

    try:
        return Settings.from_env(**overrides)
    except ValueError as exc:
        _fail(str(exc))


@cp_app.command("serve")
def controlplane_serve(
    host: Annotated[str | None, typer.Option(help="Bind address [env EDGEFLEET_HOST, default 127.0.0.1].")] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port [env EDGEFLEET_PORT, default 8080].")] = None,
    database_url: Annotated[str | None, typer.Option(
        help="SQLAlchemy URL [env EDGEFLEET_DATABASE_URL, default SQLite in the data dir].")] = None,
    broker: Annotated[str | None, typer.Option(
        help="mqtt://user:pass@host:port [env EDGEFLEET_BROKER_URL, default: an embedded broker].")] = None,
    broker_auth: Annotated[BrokerAuthOption | None, typer.Option(
        help="How device credentials reach the broker [env EDGEFLEET_BROKER_AUTH].")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="[env EDGEFLEET_DATA_DIR]")] = None,
    embedded_broker_port: Annotated[int | None, typer.Option(help="Port of the embedded broker (1883).")] = None,
    ingest_workers: Annotated[int | None, typer.Option(help="Ingest workers in this process (1).")] = None,
    log_level: Annotated[str, typer.Option(envvar="EDGEFLEET_LOG_LEVEL")] = "info",
) -> None:
    """Run the control plane (API, ingest, embedded broker unless --broker is given)."""
    try:
        import uvicorn

        from controlplane.app import create_app
        from controlplane.settings import BrokerAuthMode
    except ImportError as exc:
        _fail(f"the control plane needs `pip install edgefleet[controlplane]` ({exc})")
    from agent._logging import configure_logging

    configure_logging(log_level)
    settings = _settings(
        host=host, port=port, database_url=database_url, broker_url=broker, data_dir=data_dir,
        broker_auth=BrokerAuthMode(broker_auth.value) if broker_auth else None,
        embedded_broker_port=embedded_broker_port, ingest_workers=ingest_workers,
    )
    from controlplane._errors import ControlPlaneError
    from controlplane._fleet import Fleet

    # Start the fleet (database, broker, ingest) before serving, so a bad setting is one clear line, not a trace.
    try:
        fleet = Fleet(settings).start()
    except (ControlPlaneError, OSError, ValueError) as exc:
        _fail(str(exc), 1)
    except Exception as exc:  # noqa: BLE001 - database drivers raise their own types
        _fail(f"cannot start the control plane: {type(exc).__name__}: {str(exc).splitlines()[0]}", 1)
    try:
        typer.secho(f"control plane on http://{settings.host}:{settings.port}  broker {fleet.broker.url}  "
                    f"API docs /schema", err=True, fg=typer.colors.GREEN)
        uvicorn.run(create_app(fleet=fleet), host=settings.host, port=settings.port, log_level="warning")
    finally:
        fleet.stop()


# -- tokens --------------------------------------------------------------------------------------------------
def _engine(database_url: str | None, data_dir: Path | None) -> Any:
    from controlplane.db import create_db_engine, migrate

    settings = _settings(database_url=database_url, data_dir=data_dir).resolved()
    engine = create_db_engine(settings.database_url)
    migrate(engine)
    return engine


DatabaseOpt = Annotated[str | None, typer.Option(help="[env EDGEFLEET_DATABASE_URL]")]
DataDirOpt = Annotated[Path | None, typer.Option(help="[env EDGEFLEET_DATA_DIR]")]


@tokens_app.command("create")
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


@tokens_app.command("list")
def tokens_list(database_url: DatabaseOpt = None, data_dir: DataDirOpt = None) -> None:
    """List API tokens (never their secrets)."""
    from controlplane.auth import list_tokens

    typer.echo(f"{'ID':>4} {'ROLE':<9} {'REVOKED':<8} {'CREATED':<26} NAME")
    for t in list_tokens(_engine(database_url, data_dir)):
        typer.echo(f"{t.id:>4} {t.role:<9} {'yes' if t.revoked else 'no':<8} {t.created_at.isoformat():<26} {t.name}")


@tokens_app.command("revoke")
def tokens_revoke(token_id: int, database_url: DatabaseOpt = None, data_dir: DataDirOpt = None) -> None:
    """Revoke an API token by id."""
    from controlplane.auth import revoke_token

    if not revoke_token(_engine(database_url, data_dir), token_id):
        _fail(f"no token #{token_id}", 1)
    typer.echo(f"token #{token_id} revoked")


# -- demo ----------------------------------------------------------------------------------------------------
@app.command("demo")
def demo(
    agents: Annotated[int, typer.Option(help="Number of simulated devices.")] = 4,
    duration: Annotated[float, typer.Option(help="Seconds of on-device inference at the end.")] = 20.0,
    rounds: Annotated[int, typer.Option(help="Federated rounds the schedule runs.")] = 3,
    strategy: Annotated[StrategyOption, typer.Option(help="Flower strategy.")] = StrategyOption.fedavg,
    alpha: Annotated[float, typer.Option(help="Dirichlet alpha of the devices' non-IID data.")] = 0.5,
    learn: Annotated[bool, typer.Option(help="Run the learning loop (needs edgefleet[train,build]).")] = True,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the summary as JSON.")] = None,
    broker: Annotated[str | None, typer.Option(help="Use this broker instead of the embedded one.")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Demo state (default: a temporary directory).")] = None,
) -> None:
    """The whole loop on this machine: control plane, broker, N agents, scheduled federated rounds, build, signed
    rollout, on-device inference; prints the summary."""
    from agent._logging import configure_logging
    from controlplane.demo import run_demo

    configure_logging("warning")
    summary = run_demo(agents=agents, duration_s=duration, broker_url=broker, data_dir=data_dir, rounds=rounds,
                       alpha=alpha, strategy=strategy.value, learn=None if learn else False)
    if json_path is not None:
        json_path.write_text(json.dumps(summary, indent=2))
        typer.echo(f"summary written to {json_path}")


def main() -> None:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    app()


if __name__ == "__main__":
    main()
