"""`edgefleet controlplane serve` and `edgefleet agent ...` (handed to agent.cli)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from controlplane.cli._common import BrokerAuthOption, TlsOption, fail, load_settings, register_tasks

app = typer.Typer(no_args_is_help=True, help="The control plane.")

@app.command("serve")
def controlplane_serve(
    host: Annotated[str | None, typer.Option(help="Bind address [env EDGEFLEET_HOST, default 127.0.0.1].")] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port [env EDGEFLEET_PORT, default 8080].")] = None,
    database_url: Annotated[str | None, typer.Option(
        help="SQLAlchemy URL [env EDGEFLEET_DATABASE_URL, default SQLite in the data dir].")] = None,
    broker: Annotated[str | None, typer.Option(
        help="mqtt://user@host:port [env EDGEFLEET_BROKER_URL, default: an embedded broker]; its password "
             "from --broker-password-file or EDGEFLEET_BROKER_PASSWORD, not the command line.")] = None,
    broker_password_file: Annotated[Path | None, typer.Option(
        help="File holding the broker account's password [env EDGEFLEET_BROKER_PASSWORD_FILE].")] = None,
    broker_auth: Annotated[BrokerAuthOption | None, typer.Option(
        help="How device credentials reach the broker [env EDGEFLEET_BROKER_AUTH].")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="[env EDGEFLEET_DATA_DIR]")] = None,
    embedded_broker_port: Annotated[int | None, typer.Option(
        help="Port of the embedded broker [default 8883 with TLS (MQTTS), else 1883].")] = None,
    tls: Annotated[TlsOption | None, typer.Option(
        help="TLS on every listener: auto = when --host is not loopback; off is refused beyond loopback "
             "[env EDGEFLEET_TLS, default auto].")] = None,
    tls_name: Annotated[list[str] | None, typer.Option(
        "--tls-name", help="A DNS name or address the server certificate covers and devices are told "
                           "(repeatable; the first is the one devices get) [env EDGEFLEET_TLS_NAMES=a,b].")] = None,
    tls_cert_file: Annotated[Path | None, typer.Option(
        help="Bring your own server certificate (with --tls-key-file and --tls-ca-file) "
             "[env EDGEFLEET_TLS_CERT_FILE; default: issued by the fleet CA in DATA_DIR/pki].")] = None,
    tls_key_file: Annotated[Path | None, typer.Option(help="[env EDGEFLEET_TLS_KEY_FILE]")] = None,
    tls_ca_file: Annotated[Path | None, typer.Option(
        help="The CA (bundle) devices verify the server with [env EDGEFLEET_TLS_CA_FILE].")] = None,
    tls_ca_key_file: Annotated[Path | None, typer.Option(
        help="The bring-your-own CA's key, to issue device certificates [env EDGEFLEET_TLS_CA_KEY_FILE].")] = None,
    ingest_workers: Annotated[int | None, typer.Option(help="Ingest workers in this process (1).")] = None,
    log_level: Annotated[str, typer.Option(envvar="EDGEFLEET_LOG_LEVEL")] = "info",
    task: Annotated[list[str] | None, typer.Option(
        "--task", help="Register a learning task, NAME=package.module:Class (repeatable; added to EDGEFLEET_TASKS). "
                       "Requests select tasks by name only.")] = None,
) -> None:
    """Run the control plane (API, ingest, embedded broker unless --broker is given)."""
    try:
        import uvicorn

        from controlplane.app import create_app
        from controlplane.settings import BrokerAuthMode, TlsMode
    except ImportError as exc:
        fail(f"the control plane needs `pip install edgefleet[controlplane]` ({exc})")
    from agent.logsetup import configure_logging

    configure_logging(log_level)
    tasks = register_tasks(task or [])
    if broker is not None and _url_has_password(broker):
        typer.secho("warning: --broker carries a password, which other users see in the process list; use "
                    "--broker-password-file or EDGEFLEET_BROKER_PASSWORD instead", err=True, fg=typer.colors.YELLOW)
    settings = load_settings(
        host=host, port=port, database_url=database_url, broker_url=broker, data_dir=data_dir,
        broker_password_file=broker_password_file,
        broker_auth=BrokerAuthMode(broker_auth.value) if broker_auth else None,
        embedded_broker_port=embedded_broker_port, ingest_workers=ingest_workers,
        tls=TlsMode(tls.value) if tls else None, tls_names=tuple(tls_name) if tls_name else None,
        tls_cert_file=tls_cert_file, tls_key_file=tls_key_file, tls_ca_file=tls_ca_file,
        tls_ca_key_file=tls_ca_key_file,
    )
    from controlplane._errors import ControlPlaneError
    from controlplane.wiring import Fleet

    # Start the fleet (database, broker, ingest) before serving, so a bad setting is one clear line, not a trace.
    try:
        fleet = Fleet(settings).start()
    except (ControlPlaneError, OSError, ValueError) as exc:
        fail(str(exc), 1)
    except Exception as exc:  # noqa: BLE001 - database drivers raise their own types
        fail(f"cannot start the control plane: {type(exc).__name__}: {str(exc).splitlines()[0]}", 1)
    tls_files: dict[str, str] = {}
    scheme, trust = "http", ""
    if fleet.settings.tls_enabled:
        # Beyond loopback uvicorn speaks HTTPS only: a plaintext request gets no HTTP answer.
        server = fleet.pki.server
        tls_files = {"ssl_certfile": str(server.cert_file), "ssl_keyfile": str(server.key_file)}
        scheme, trust = "https", f"  CA {server.ca_file}"
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    try:
        typer.secho(f"control plane on {scheme}://{host}:{settings.port}  broker {fleet.device_broker_url}{trust}  "
                    f"tasks {', '.join(tasks)}  API docs /schema", err=True, fg=typer.colors.GREEN)
        # log_config=None: uvicorn's own warnings go through the root handler (JSON lines when not a TTY), not
        # through plain-text handlers of its own
        uvicorn.run(create_app(fleet=fleet, stop_fleet=True), host=settings.host, port=settings.port,
                    log_level="warning", log_config=None, **tls_files)  # type: ignore[arg-type]
    finally:
        fleet.stop()


def _url_has_password(url: str) -> bool:
    from urllib.parse import urlsplit

    try:
        return bool(urlsplit(url).password)
    except ValueError:
        return False




AGENT_CONTEXT = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


def agent_cmd(ctx: typer.Context) -> None:
    """The console script hands `edgefleet agent ...` straight to agent.cli (no typer in the device process);
    this entry serves the same parser when the typer app is driven directly (tests, `python -m controlplane.cli`).
    Registered on the top-level app by controlplane.cli."""
    from agent.cli import main as agent_main

    raise typer.Exit(agent_main(list(ctx.args)))
