"""`edgefleet rounds` and `edgefleet schedules`: federated rounds over the API."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from controlplane.cli._common import TokenOpt, UrlOpt, api, call, fail
from controlplane.output import Progress, round_progress, summarize_ids, summarize_skipped
from controlplane.statuses import RoundStatus
from federated.burst.spec import JobKind
from federated.flower.config import Strategy

app = typer.Typer(no_args_is_help=True, help="Federated rounds via the API.")
schedules_app = typer.Typer(no_args_is_help=True, help="Recurring federated rounds via the API.")

def _round_body(task: str, strategy: Strategy, rounds: int, min_clients: int, max_clients: int | None,
                local_epochs: int, eligibility: str | None, burst: JobKind | None, build: bool,
                deploy: bool, initial_model: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"task": task, "strategy": strategy.value, "rounds": rounds, "min_clients": min_clients,
                            "max_clients": max_clients, "local_epochs": local_epochs, "build": build, "deploy": deploy}
    if initial_model is not None:
        body["initial_model"] = initial_model
    if eligibility is not None:
        try:
            body["eligibility"] = json.loads(eligibility)
        except ValueError as exc:
            fail(f"--eligibility is not JSON: {exc}")
    if burst is not None:
        body["burst"] = {"kind": burst.value}
    return body


def _round_line(r: dict[str, Any]) -> str:
    last = (r.get("metrics") or [{}])[-1]
    accuracy = f" accuracy {last['accuracy']:.4f}" if isinstance(last.get("accuracy"), float) else ""
    job = f" job #{r['job_id']}" if r.get("job_id") is not None else ""
    return (f"#{r['id']:<4} {r['status']:<10} {r['strategy']:<8} invited {len(r['invited'])} "
            f"took part {len(r['participants'])}{accuracy}{job} model {r.get('model_version')}"
            + (f"  ({r['reason']})" if r.get("reason") else ""))


TaskOpt = Annotated[str, typer.Option(help="A task the control plane registers by name.")]
StrategyOpt = Annotated[Strategy, typer.Option(help="Flower strategy.")]
EligibilityOpt = Annotated[str | None, typer.Option(
    help='Eligibility rule as JSON, e.g. \'{"min_battery_percent": 30, "allow_metered": false}\'.')]
BurstOpt = Annotated[JobKind | None, typer.Option(help="A burst job on the round's result before the build.")]
InitialModelOpt = Annotated[str | None, typer.Option(
    help="Start from this model version's weights (warm start). A schedule's default: the task's latest released "
         "model.")]


@app.command("start")
def rounds_start(
    task: TaskOpt = "digits", strategy: StrategyOpt = Strategy.FEDAVG,
    rounds: Annotated[int, typer.Option(help="Flower rounds in this run.")] = 3,
    min_clients: Annotated[int, typer.Option()] = 2, max_clients: Annotated[int | None, typer.Option()] = None,
    local_epochs: Annotated[int, typer.Option()] = 2, eligibility: EligibilityOpt = None, burst: BurstOpt = None,
    build: Annotated[bool, typer.Option(help="Build, gate and sign the result.")] = True,
    deploy: Annotated[bool, typer.Option(help="Roll the result out.")] = False,
    initial_model: InitialModelOpt = None,
    wait: Annotated[bool, typer.Option(help="Follow the round until it ends.")] = False,
    url: UrlOpt = "http://127.0.0.1:8080", token: TokenOpt = "",
) -> None:
    """Start a round now among the devices eligible now; prints who was invited and why the others were not."""
    import time

    client = api(url, token)
    r = call(client.post("/api/v1/rounds", json=_round_body(task, strategy, rounds, min_clients, max_clients,
                                                           local_epochs, eligibility, burst, build, deploy,
                                                           initial_model)))
    typer.echo(f"round #{r['id']}: invited {summarize_ids(r['invited'])}")
    if r["skipped"]:
        typer.echo(f"not invited: {len(r['skipped'])}, by reason:")
        for line in summarize_skipped(r["skipped"]):
            typer.echo(line)
    if wait:
        progress = Progress(f"round #{r['id']}")
        while not RoundStatus(r["status"]).finished:
            progress.update(round_progress(r))
            time.sleep(2)
            r = call(client.get(f"/api/v1/rounds/{r['id']}"))
        progress.done(round_progress(r))
    typer.echo(_round_line(r))
    if r["status"] == RoundStatus.FAILED:
        raise typer.Exit(1)


@app.command("list")
def rounds_list(url: UrlOpt = "http://127.0.0.1:8080", token: TokenOpt = "") -> None:
    """List rounds, newest first."""
    for r in call(api(url, token).get("/api/v1/rounds")):
        typer.echo(_round_line(r))


@app.command("show")
def rounds_show(round_id: int, url: UrlOpt = "http://127.0.0.1:8080", token: TokenOpt = "") -> None:
    """One round in full (JSON): invited, skipped and why, per-round metrics, model version."""
    typer.echo(json.dumps(call(api(url, token).get(f"/api/v1/rounds/{round_id}")), indent=2))


@schedules_app.command("create")
def schedules_create(
    schedule_id: Annotated[str, typer.Argument(help="Name of the schedule.")],
    cron: Annotated[str | None, typer.Option(help='Crontab in UTC, e.g. "0 2 * * *".')] = None,
    interval: Annotated[float | None, typer.Option(help="Or every this many seconds.")] = None,
    max_runs: Annotated[int | None, typer.Option(help="Stop after this many firings.")] = None,
    task: TaskOpt = "digits", strategy: StrategyOpt = Strategy.FEDAVG,
    rounds: Annotated[int, typer.Option(help="Flower rounds per firing.")] = 3,
    min_clients: Annotated[int, typer.Option()] = 2, max_clients: Annotated[int | None, typer.Option()] = None,
    local_epochs: Annotated[int, typer.Option()] = 2, eligibility: EligibilityOpt = None, burst: BurstOpt = None,
    build: Annotated[bool, typer.Option(help="Build, gate and sign each result.")] = True,
    deploy: Annotated[bool, typer.Option(help="Roll each result out.")] = False,
    initial_model: InitialModelOpt = None,
    url: UrlOpt = "http://127.0.0.1:8080", token: TokenOpt = "",
) -> None:
    """A recurring round (exactly one of --cron or --interval); survives control-plane restarts."""
    body = {"id": schedule_id, "cron": cron, "interval_s": interval, "max_runs": max_runs,
            "round": _round_body(task, strategy, rounds, min_clients, max_clients, local_epochs, eligibility, burst,
                                 build, deploy, initial_model)}
    s = call(api(url, token).post("/api/v1/schedules", json=body))
    typer.echo(f"schedule {s['id']}: next run {s['next_run_time']}")


@schedules_app.command("list")
def schedules_list(url: UrlOpt = "http://127.0.0.1:8080", token: TokenOpt = "") -> None:
    """List schedules with their next run."""
    for s in call(api(url, token).get("/api/v1/schedules")):
        when = s["cron"] if s["cron"] is not None else f"every {s['interval_s']:g} s"
        typer.echo(f"{s['id']:<24} {when:<16} runs {s['runs']}/{s['max_runs'] or '-'}  next {s['next_run_time']}")


@schedules_app.command("delete")
def schedules_delete(schedule_id: str, url: UrlOpt = "http://127.0.0.1:8080", token: TokenOpt = "") -> None:
    """Delete a schedule (rounds it started are kept)."""
    response = api(url, token).delete(f"/api/v1/schedules/{schedule_id}")
    if response.status_code >= 400:
        call(response)
    typer.echo(f"schedule {schedule_id} deleted")
