"""The `edgefleet` command line, one module per command group. Heavy imports happen inside commands so the agent
side stays light (the console script hands `edgefleet agent ...` to agent.cli before any of this is imported)."""

from __future__ import annotations

import os

import typer

from controlplane.cli import (
    demo,
    deployments,
    devices,
    jobs,
    keys,
    models,
    profiles,
    provisioning,
    rounds,
    serve,
    status,
    tasks,
    tokens,
)

__all__ = ["app", "main"]

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False,
                  help="EdgeFleet: ML on fleets of edge devices.")
app.add_typer(profiles.app, name="profiles")
app.add_typer(serve.app, name="controlplane")
app.add_typer(tokens.app, name="tokens")
app.add_typer(provisioning.app, name="provisioning")
app.add_typer(jobs.app, name="jobs")
app.add_typer(rounds.app, name="rounds")
app.add_typer(rounds.schedules_app, name="schedules")
app.add_typer(deployments.app, name="deployments")
app.add_typer(devices.app, name="devices")
app.add_typer(models.app, name="models")
app.add_typer(keys.app, name="keys")
app.add_typer(tasks.app, name="tasks")
app.command("agent", context_settings=serve.AGENT_CONTEXT, help="The device agent: `edgefleet agent run --help`.")(
    serve.agent_cmd)
app.command("demo")(demo.demo)
app.command("status")(status.status)


def main() -> None:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    app()
