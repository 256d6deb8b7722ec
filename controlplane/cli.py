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
jobs_app = typer.Typer(no_args_is_help=True, help="Burst training jobs (finetune / distill / qat) via the API.")
app.add_typer(profiles_app, name="profiles")
app.add_typer(cp_app, name="controlplane")
app.add_typer(tokens_app, name="tokens")
rounds_app = typer.Typer(no_args_is_help=True, help="Federated rounds via the API.")
schedules_app = typer.Typer(no_args_is_help=True, help="Recurring federated rounds via the API.")
app.add_typer(jobs_app, name="jobs")
app.add_typer(rounds_app, name="rounds")
app.add_typer(schedules_app, name="schedules")


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
    """The console script hands `edgefleet agent ...` straight to agent.cli (no typer in the device process);
    this entry serves the same parser when the typer app is driven directly (tests, `python -m controlplane.cli`)."""
    from agent.cli import main as agent_main

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
        help="mqtt://user@host:port [env EDGEFLEET_BROKER_URL, default: an embedded broker]; its password "
             "from --broker-password-file or EDGEFLEET_BROKER_PASSWORD, not the command line.")] = None,
    broker_password_file: Annotated[Path | None, typer.Option(
        help="File holding the broker account's password [env EDGEFLEET_BROKER_PASSWORD_FILE].")] = None,
    broker_auth: Annotated[BrokerAuthOption | None, typer.Option(
        help="How device credentials reach the broker [env EDGEFLEET_BROKER_AUTH].")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="[env EDGEFLEET_DATA_DIR]")] = None,
    embedded_broker_port: Annotated[int | None, typer.Option(help="Port of the embedded broker (1883).")] = None,
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
        from controlplane.settings import BrokerAuthMode
    except ImportError as exc:
        _fail(f"the control plane needs `pip install edgefleet[controlplane]` ({exc})")
    from agent.logsetup import configure_logging

    configure_logging(log_level)
    tasks = _register_tasks(task or [])
    if broker is not None and _url_has_password(broker):
        typer.secho("warning: --broker carries a password, which other users see in the process list; use "
                    "--broker-password-file or EDGEFLEET_BROKER_PASSWORD instead", err=True, fg=typer.colors.YELLOW)
    settings = _settings(
        host=host, port=port, database_url=database_url, broker_url=broker, data_dir=data_dir,
        broker_password_file=broker_password_file,
        broker_auth=BrokerAuthMode(broker_auth.value) if broker_auth else None,
        embedded_broker_port=embedded_broker_port, ingest_workers=ingest_workers,
    )
    from controlplane._errors import ControlPlaneError
    from controlplane.wiring import Fleet

    # Start the fleet (database, broker, ingest) before serving, so a bad setting is one clear line, not a trace.
    try:
        fleet = Fleet(settings).start()
    except (ControlPlaneError, OSError, ValueError) as exc:
        _fail(str(exc), 1)
    except Exception as exc:  # noqa: BLE001 - database drivers raise their own types
        _fail(f"cannot start the control plane: {type(exc).__name__}: {str(exc).splitlines()[0]}", 1)
    try:
        typer.secho(f"control plane on http://{settings.host}:{settings.port}  broker {fleet.broker.url}  "
                    f"tasks {', '.join(tasks)}  API docs /schema", err=True, fg=typer.colors.GREEN)
        uvicorn.run(create_app(fleet=fleet, stop_fleet=True), host=settings.host, port=settings.port,
                    log_level="warning")
    finally:
        fleet.stop()


def _register_tasks(extra: list[str]) -> list[str]:
    """Add the --task entries to EDGEFLEET_TASKS, which this process and its children (the Flower ServerApp, burst
    workers) resolve task names with, and load the whole registry now: a bad entry is one clear line at start."""
    from federated.tasks import TASKS_ENV, TaskRegistry

    if extra:
        os.environ[TASKS_ENV] = ",".join(v for v in (os.environ.get(TASKS_ENV, ""), *extra) if v.strip())
    names: list[str] = []
    try:
        names = TaskRegistry.from_env().names()
    except ValueError as exc:
        _fail(str(exc))
    return names


def _url_has_password(url: str) -> bool:
    from urllib.parse import urlsplit

    try:
        return bool(urlsplit(url).password)
    except ValueError:
        return False


# -- tokens --------------------------------------------------------------------------------------------------
def _engine(database_url: str | None, data_dir: Path | None) -> Any:
    from agent.logsetup import configure_logging
    from controlplane._private import private_dir
    from controlplane.db import create_db_engine, migrate

    configure_logging("warning")  # on stderr: stdout carries what scripts read (a new token)
    settings = _settings(database_url=database_url, data_dir=data_dir).resolved()
    private_dir(settings.data_dir)
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


# -- jobs ----------------------------------------------------------------------------------------------------
class JobKindOption(enum.StrEnum):
    finetune = "finetune"
    distill = "distill"
    qat = "qat"


class PlacementOption(enum.StrEnum):
    auto = "auto"
    burst = "burst"
    local = "local"


UrlOpt = Annotated[str, typer.Option("--url", envvar="EDGEFLEET_URL", help="Control-plane URL.")]
TokenOpt = Annotated[str, typer.Option("--token", envvar="EDGEFLEET_TOKEN", help="API token (operator to submit).")]


def _api(url: str, token: str) -> Any:
    import httpx

    if not token:
        _fail("an API token is needed: --token or EDGEFLEET_TOKEN (edgefleet tokens create --role operator)")
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60)


def _call(response: Any) -> Any:
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail")
        except ValueError:
            detail = response.text
        _fail(f"{response.status_code}: {detail}", 1)
    return response.json()


def _job_line(job: dict[str, Any]) -> str:
    progress = job.get("progress") or {}
    where = f"{job['placement']}" + (f" ({job['backend_job_id']})" if job.get("backend_job_id") else "")
    step = f" epoch {progress.get('epoch')} loss {progress.get('loss')}" if progress else ""
    accuracy = (job.get("metrics") or {}).get("accuracy")
    result = f" accuracy {accuracy:.4f}" if isinstance(accuracy, float) else ""
    of_round = f" (round {job['round_id']})" if job.get("round_id") is not None else ""
    return (f"#{job['id']:<4} {job['kind']:<9} {job['status']:<10} {where:<40} model {job.get('model_version')}"
            f"{result}{step}{of_round}")


@jobs_app.command("submit")
def jobs_submit(
    kind: Annotated[JobKindOption, typer.Argument(help="finetune | distill | qat")],
    task: Annotated[str, typer.Option(help="A task the control plane registers by name.")] = "digits",
    base_model: Annotated[str | None, typer.Option(help="Start from this model version.")] = None,
    gpus: Annotated[float, typer.Option(help="GPUs to ask for.")] = 0.0,
    tpus: Annotated[float, typer.Option(help="TPUs to ask for.")] = 0.0,
    cpus: Annotated[float, typer.Option(help="CPUs to ask for.")] = 1.0,
    memory_gb: Annotated[float, typer.Option(help="Memory to ask for.")] = 1.0,
    epochs: Annotated[int, typer.Option()] = 20,
    time_budget: Annotated[float, typer.Option(help="Seconds.")] = 600.0,
    placement: Annotated[PlacementOption, typer.Option()] = PlacementOption.auto,
    deploy: Annotated[bool, typer.Option(help="Roll the resulting model out.")] = False,
    wait: Annotated[bool, typer.Option(help="Follow the job with a progress bar until it ends.")] = True,
    url: UrlOpt = "http://127.0.0.1:8080",
    token: TokenOpt = "",
) -> None:
    """Submit a burst job; prints the placement decision and follows it."""
    api = _api(url, token)
    job = _call(api.post("/api/v1/jobs", json={
        "kind": kind.value, "task": task, "base_model_version": base_model, "epochs": epochs,
        "resources": {"gpus": gpus, "tpus": tpus, "cpus": cpus, "memory_gb": memory_gb},
        "time_budget_s": time_budget, "placement": placement.value, "deploy": deploy}))
    typer.echo(f"job #{job['id']}: {job['placement']} — {job['placement_reason']}")
    if wait:
        _follow(api, job["id"], epochs)


def _follow(api: Any, job_id: int, epochs: int) -> None:
    import time

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} epochs"),
                  TimeElapsedColumn()) as bar:
        handle = bar.add_task(f"job #{job_id}", total=epochs)
        while True:
            job = _call(api.get(f"/api/v1/jobs/{job_id}"))
            progress = job.get("progress") or {}
            bar.update(handle, completed=int(progress.get("epoch", 0)),
                       description=f"job #{job_id} {job['status']} loss {progress.get('loss', '-')}")
            if job["status"] not in ("queued", "running"):
                break
            time.sleep(1)
    typer.echo(_job_line(job))
    if job.get("reason"):
        typer.echo(f"reason: {job['reason']}")
    if job["status"] != "succeeded":
        raise typer.Exit(1)


@jobs_app.command("list")
def jobs_list(url: UrlOpt = "http://127.0.0.1:8080", token: TokenOpt = "") -> None:
    """List burst jobs."""
    for job in _call(_api(url, token).get("/api/v1/jobs")):
        typer.echo(_job_line(job))


@jobs_app.command("show")
def jobs_show(job_id: int, url: UrlOpt = "http://127.0.0.1:8080", token: TokenOpt = "") -> None:
    """One job in full (JSON), including its logs tail."""
    typer.echo(json.dumps(_call(_api(url, token).get(f"/api/v1/jobs/{job_id}")), indent=2))


@jobs_app.command("cancel")
def jobs_cancel(job_id: int, url: UrlOpt = "http://127.0.0.1:8080", token: TokenOpt = "") -> None:
    """Cancel a queued or running job."""
    typer.echo(_job_line(_call(_api(url, token).post(f"/api/v1/jobs/{job_id}/cancel"))))


# -- rounds and schedules ------------------------------------------------------------------------------------
def _round_body(task: str, strategy: StrategyOption, rounds: int, min_clients: int, max_clients: int | None,
                local_epochs: int, eligibility: str | None, burst: JobKindOption | None, build: bool,
                deploy: bool, initial_model: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"task": task, "strategy": strategy.value, "rounds": rounds, "min_clients": min_clients,
                            "max_clients": max_clients, "local_epochs": local_epochs, "build": build, "deploy": deploy}
    if initial_model is not None:
        body["initial_model"] = initial_model
    if eligibility is not None:
        try:
            body["eligibility"] = json.loads(eligibility)
        except ValueError as exc:
            _fail(f"--eligibility is not JSON: {exc}")
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
StrategyOpt = Annotated[StrategyOption, typer.Option(help="Flower strategy.")]
EligibilityOpt = Annotated[str | None, typer.Option(
    help='Eligibility rule as JSON, e.g. \'{"min_battery_percent": 30, "allow_metered": false}\'.')]
BurstOpt = Annotated[JobKindOption | None, typer.Option(help="A burst job on the round's result before the build.")]
InitialModelOpt = Annotated[str | None, typer.Option(
    help="Start from this model version's weights (warm start). A schedule's default: the task's latest released "
         "model.")]


@rounds_app.command("start")
def rounds_start(
    task: TaskOpt = "digits", strategy: StrategyOpt = StrategyOption.fedavg,
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

    api = _api(url, token)
    r = _call(api.post("/api/v1/rounds", json=_round_body(task, strategy, rounds, min_clients, max_clients,
                                                           local_epochs, eligibility, burst, build, deploy,
                                                           initial_model)))
    typer.echo(f"round #{r['id']}: invited {', '.join(r['invited']) or 'nobody'}")
    for device_id, why in sorted(r["skipped"].items()):
        typer.echo(f"  not invited {device_id}: {why}")
    while wait and r["status"] in ("pending", "running"):
        time.sleep(2)
        r = _call(api.get(f"/api/v1/rounds/{r['id']}"))
    typer.echo(_round_line(r))
    if r["status"] == "failed":
        raise typer.Exit(1)


@rounds_app.command("list")
def rounds_list(url: UrlOpt = "http://127.0.0.1:8080", token: TokenOpt = "") -> None:
    """List rounds, newest first."""
    for r in _call(_api(url, token).get("/api/v1/rounds")):
        typer.echo(_round_line(r))


@rounds_app.command("show")
def rounds_show(round_id: int, url: UrlOpt = "http://127.0.0.1:8080", token: TokenOpt = "") -> None:
    """One round in full (JSON): invited, skipped and why, per-round metrics, model version."""
    typer.echo(json.dumps(_call(_api(url, token).get(f"/api/v1/rounds/{round_id}")), indent=2))


@schedules_app.command("create")
def schedules_create(
    schedule_id: Annotated[str, typer.Argument(help="Name of the schedule.")],
    cron: Annotated[str | None, typer.Option(help='Crontab in UTC, e.g. "0 2 * * *".')] = None,
    interval: Annotated[float | None, typer.Option(help="Or every this many seconds.")] = None,
    max_runs: Annotated[int | None, typer.Option(help="Stop after this many firings.")] = None,
    task: TaskOpt = "digits", strategy: StrategyOpt = StrategyOption.fedavg,
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
    s = _call(_api(url, token).post("/api/v1/schedules", json=body))
    typer.echo(f"schedule {s['id']}: next run {s['next_run_time']}")


@schedules_app.command("list")
def schedules_list(url: UrlOpt = "http://127.0.0.1:8080", token: TokenOpt = "") -> None:
    """List schedules with their next run."""
    for s in _call(_api(url, token).get("/api/v1/schedules")):
        when = s["cron"] if s["cron"] is not None else f"every {s['interval_s']:g} s"
        typer.echo(f"{s['id']:<24} {when:<16} runs {s['runs']}/{s['max_runs'] or '-'}  next {s['next_run_time']}")


@schedules_app.command("delete")
def schedules_delete(schedule_id: str, url: UrlOpt = "http://127.0.0.1:8080", token: TokenOpt = "") -> None:
    """Delete a schedule (rounds it started are kept)."""
    response = _api(url, token).delete(f"/api/v1/schedules/{schedule_id}")
    if response.status_code >= 400:
        _call(response)
    typer.echo(f"schedule {schedule_id} deleted")


# -- demo ----------------------------------------------------------------------------------------------------
@app.command("demo")
def demo(
    agents: Annotated[int, typer.Option(help="Number of simulated devices.")] = 4,
    duration: Annotated[float, typer.Option(help="Seconds of on-device inference at the end.")] = 20.0,
    rounds: Annotated[int, typer.Option(help="Federated rounds the schedule runs.")] = 3,
    strategy: Annotated[StrategyOption, typer.Option(help="Flower strategy.")] = StrategyOption.fedavg,
    alpha: Annotated[float, typer.Option(help="Dirichlet alpha of the devices' non-IID data.")] = 0.5,
    learn: Annotated[bool, typer.Option(help="Run the learning loop (needs edgefleet[train,build]).")] = True,
    burst: Annotated[JobKindOption | None, typer.Option(
        help="Attach this burst job to the round: it runs on the federated result before the build.")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the summary as JSON.")] = None,
    broker: Annotated[str | None, typer.Option(help="Use this broker instead of the embedded one.")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Demo state (default: a temporary directory).")] = None,
) -> None:
    """The whole loop on this machine: control plane, broker, N agents, scheduled federated rounds, build, signed
    rollout, on-device inference; prints the summary."""
    from agent.logsetup import configure_logging
    from controlplane.demo import run_demo

    configure_logging("warning")
    summary = run_demo(agents=agents, duration_s=duration, broker_url=broker, data_dir=data_dir, rounds=rounds,
                       alpha=alpha, strategy=strategy.value, learn=None if learn else False,
                       burst=None if burst is None else burst.value)
    if json_path is not None:
        json_path.write_text(json.dumps(summary, indent=2))
        typer.echo(f"summary written to {json_path}")


def main() -> None:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    app()


if __name__ == "__main__":
    main()
