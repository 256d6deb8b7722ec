"""`edgefleet deployments`: rollouts of a model version over the API, and the operator's actions on them."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from controlplane.cli._common import TokenOpt, UrlOpt, api, call, fail
from controlplane.output import Progress, deployment_progress
from controlplane.statuses import DeploymentStatus

app = typer.Typer(no_args_is_help=True, help="Rollouts of model versions to devices via the API.")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the API's JSON instead of a table.")]
_URL = "http://127.0.0.1:8080"


def _line(d: dict[str, Any]) -> str:
    counts = " ".join(f"{status} {n}" for status, n in sorted((d.get("counts") or {}).items()))
    flags = (" rollback" if d.get("rollback") else "") + (
        f" (of #{d['rollback_of']})" if d.get("rollback_of") is not None else "")
    return f"#{d['id']:<4} {d['status']:<10} {d['model_version']:<24} release {d['release']:<4}{flags}  {counts}"


def _table(d: dict[str, Any]) -> str:
    lines = [_line(d)]
    if d.get("deadline"):
        lines.append(f"deadline: {d['deadline']}")
    lines.append(f"waves: {', '.join(f'{w:g}%' for w in d['waves'])} (current {d['current_wave'] + 1}), "
                 f"failure threshold {d['failure_threshold']:.0%}")
    if d.get("reason"):
        lines.append(f"reason: {d['reason']}")
    lines.append(f"{'DEVICE':<24} {'WAVE':<5} {'VARIANT':<13} {'STATUS':<11} REASON")
    for t in d["targets"]:
        lines.append(f"{t['device_id']:<24} {t['wave'] + 1:<5} {t.get('variant') or '-':<13} {t['status']:<11} "
                     f"{t.get('reason') or ''}")
    return "\n".join(lines)


def _print(data: Any, as_json: bool, full: bool = False) -> None:
    if as_json:
        typer.echo(json.dumps(data, indent=2))
    elif isinstance(data, list):
        for item in data:
            typer.echo(_table(item) if full else _line(item))
    else:
        typer.echo(_table(data) if full else _line(data))


@app.command("create")
def deployments_create(
    model_version: Annotated[str, typer.Argument(help="A ready model version.")],
    device: Annotated[list[str] | None, typer.Option(help="A device id (repeatable).")] = None,
    tag: Annotated[list[str] | None, typer.Option(help="Devices with this tag (repeatable).")] = None,
    profile: Annotated[list[str] | None, typer.Option(help="Devices of this profile (repeatable).")] = None,
    all_devices: Annotated[bool, typer.Option("--all", help="Every enrolled device.")] = False,
    waves: Annotated[str, typer.Option(help="Cumulative percentages per wave, e.g. 10,50,100.")] = "100",
    failure_threshold: Annotated[float, typer.Option(help="Fraction of answering devices that may fail.")] = 0.0,
    wave_timeout: Annotated[float, typer.Option(help="Seconds an online device may take to answer.")] = 600.0,
    deadline: Annotated[float | None, typer.Option(
        help="Seconds from now; devices that have not answered by then become timed_out.")] = None,
    rollback: Annotated[bool, typer.Option(help="Allow a lower release (signed as a rollback).")] = False,
    wait: Annotated[bool, typer.Option(help="Follow the rollout with a progress line until it is no longer "
                                            "running.")] = False,
    as_json: JsonOpt = False,
    url: UrlOpt = _URL,
    token: TokenOpt = "",
) -> None:
    """Roll a model version out to the devices selected (offline ones get it when they come back)."""
    try:
        percentages = [float(w) for w in waves.split(",")]
    except ValueError:
        fail(f"--waves must be comma-separated numbers, got {waves!r}")
    if not (device or tag or profile or all_devices):
        fail("say which devices: --device, --tag, --profile or --all")
    body: dict[str, Any] = {
        "model_version": model_version, "waves": percentages, "failure_threshold": failure_threshold,
        "wave_timeout_s": wave_timeout, "rollback": rollback,
        "targets": {"device_ids": device or [], "tags": tag or [], "profiles": profile or [], "all": all_devices}}
    if deadline is not None:
        body["deadline_s"] = deadline
    client = api(url, token)
    created = call(client.post("/api/v1/deployments", json=body))
    if wait:
        created = _follow(client, created, as_json)
    _print(created, as_json, full=True)
    if wait and created["status"] != DeploymentStatus.SUCCEEDED:
        raise typer.Exit(1)


def _follow(client: Any, d: dict[str, Any], as_json: bool) -> dict[str, Any]:
    """Poll the rollout until it is no longer running (paused, succeeded, failed, ...); progress on stderr when
    --json keeps stdout for the document."""
    import sys
    import time

    progress = Progress(f"deployment #{d['id']}", stream=sys.stderr if as_json else None)
    while d["status"] == DeploymentStatus.RUNNING:
        progress.update(deployment_progress(d))
        time.sleep(2)
        d = call(client.get(f"/api/v1/deployments/{d['id']}"))
    progress.done(deployment_progress(d))
    return d


@app.command("list")
def deployments_list(as_json: JsonOpt = False, url: UrlOpt = _URL, token: TokenOpt = "") -> None:
    """Every deployment, newest first, with its targets counted by status."""
    _print(call(api(url, token).get("/api/v1/deployments")), as_json)


@app.command("show")
def deployments_show(deployment_id: int, as_json: JsonOpt = False, url: UrlOpt = _URL, token: TokenOpt = "") -> None:
    """One deployment and each device's status and reason."""
    _print(call(api(url, token).get(f"/api/v1/deployments/{deployment_id}")), as_json, full=True)


def _action(action: str, deployment_id: int, as_json: bool, url: str, token: str) -> None:
    _print(call(api(url, token).post(f"/api/v1/deployments/{deployment_id}/{action}")), as_json, full=True)


@app.command("pause")
def deployments_pause(deployment_id: int, as_json: JsonOpt = False, url: UrlOpt = _URL, token: TokenOpt = "") -> None:
    """Send nothing new (devices already sent to may finish)."""
    _action("pause", deployment_id, as_json, url, token)


@app.command("resume")
def deployments_resume(deployment_id: int, as_json: JsonOpt = False, url: UrlOpt = _URL,
                       token: TokenOpt = "") -> None:
    """Go on with a paused deployment."""
    _action("resume", deployment_id, as_json, url, token)


@app.command("cancel")
def deployments_cancel(deployment_id: int, as_json: JsonOpt = False, url: UrlOpt = _URL,
                       token: TokenOpt = "") -> None:
    """Cancel unfinished devices and close the download tokens (a queued command can no longer install)."""
    _action("cancel", deployment_id, as_json, url, token)


@app.command("rollback")
def deployments_rollback(deployment_id: int, as_json: JsonOpt = False, url: UrlOpt = _URL,
                         token: TokenOpt = "") -> None:
    """Re-deploy to the devices that installed it the model each ran before, signed as a rollback."""
    _action("rollback", deployment_id, as_json, url, token)
