"""`edgefleet jobs`: burst training jobs over the API."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from controlplane.burst.placement import Placement
from controlplane.cli._common import TokenOpt, UrlOpt, api, call
from controlplane.output import Progress
from controlplane.statuses import JobStatus
from federated.burst.spec import JobKind

app = typer.Typer(no_args_is_help=True, help="Burst training jobs (finetune / distill / qat) via the API.")

def _job_line(job: dict[str, Any]) -> str:
    progress = job.get("progress") or {}
    where = f"{job['placement']}" + (f" ({job['backend_job_id']})" if job.get("backend_job_id") else "")
    step = f" epoch {progress.get('epoch')} loss {progress.get('loss')}" if progress else ""
    accuracy = (job.get("metrics") or {}).get("accuracy")
    result = f" accuracy {accuracy:.4f}" if isinstance(accuracy, float) else ""
    of_round = f" (round {job['round_id']})" if job.get("round_id") is not None else ""
    return (f"#{job['id']:<4} {job['kind']:<9} {job['status']:<10} {where:<40} model {job.get('model_version')}"
            f"{result}{step}{of_round}")


@app.command("submit")
def jobs_submit(
    kind: Annotated[JobKind, typer.Argument(help="finetune | distill | qat")],
    task: Annotated[str, typer.Option(help="A task the control plane registers by name.")] = "digits",
    base_model: Annotated[str | None, typer.Option(help="Start from this model version.")] = None,
    gpus: Annotated[float, typer.Option(help="GPUs to ask for.")] = 0.0,
    tpus: Annotated[float, typer.Option(help="TPUs to ask for.")] = 0.0,
    cpus: Annotated[float, typer.Option(help="CPUs to ask for.")] = 1.0,
    memory_gb: Annotated[float, typer.Option(help="Memory to ask for.")] = 1.0,
    epochs: Annotated[int, typer.Option()] = 20,
    time_budget: Annotated[float, typer.Option(help="Seconds.")] = 600.0,
    placement: Annotated[Placement, typer.Option()] = Placement.AUTO,
    deploy: Annotated[bool, typer.Option(help="Roll the resulting model out.")] = False,
    wait: Annotated[bool, typer.Option(help="Follow the job with a progress line until it ends.")] = True,
    url: UrlOpt = "http://127.0.0.1:8080",
    token: TokenOpt = "",
) -> None:
    """Submit a burst job; prints the placement decision and follows it."""
    client = api(url, token)
    job = call(client.post("/api/v1/jobs", json={
        "kind": kind.value, "task": task, "base_model_version": base_model, "epochs": epochs,
        "resources": {"gpus": gpus, "tpus": tpus, "cpus": cpus, "memory_gb": memory_gb},
        "time_budget_s": time_budget, "placement": placement.value, "deploy": deploy}))
    typer.echo(f"job #{job['id']}: {job['placement']} — {job['placement_reason']}")
    if wait:
        _follow(client, job["id"], epochs)


def job_progress(job: dict[str, Any], epochs: int) -> str:
    """A job's status as the API reports it: status, epoch of epochs, loss."""
    progress = job.get("progress") or {}
    text = f"{job['status']} on {job['placement']}"
    if progress:
        text += f", epoch {progress.get('epoch', 0)}/{epochs}"
        if isinstance(progress.get("loss"), int | float):
            text += f", loss {progress['loss']:.4f}"
    return text


def _follow(client: Any, job_id: int, epochs: int) -> None:
    import time

    progress = Progress(f"job #{job_id}")
    while True:
        job = call(client.get(f"/api/v1/jobs/{job_id}"))
        if JobStatus(job["status"]).finished:
            break
        progress.update(job_progress(job, epochs))
        time.sleep(1)
    progress.done(job_progress(job, epochs))
    typer.echo(_job_line(job))
    if job.get("reason"):
        typer.echo(f"reason: {job['reason']}")
    if job["status"] != JobStatus.SUCCEEDED:
        raise typer.Exit(1)


@app.command("list")
def jobs_list(url: UrlOpt = "http://127.0.0.1:8080", token: TokenOpt = "") -> None:
    """List burst jobs."""
    for job in call(api(url, token).get("/api/v1/jobs")):
        typer.echo(_job_line(job))


@app.command("show")
def jobs_show(job_id: int, url: UrlOpt = "http://127.0.0.1:8080", token: TokenOpt = "") -> None:
    """One job in full (JSON), including its logs tail."""
    typer.echo(json.dumps(call(api(url, token).get(f"/api/v1/jobs/{job_id}")), indent=2))


@app.command("cancel")
def jobs_cancel(job_id: int, url: UrlOpt = "http://127.0.0.1:8080", token: TokenOpt = "") -> None:
    """Cancel a queued or running job."""
    typer.echo(_job_line(call(api(url, token).post(f"/api/v1/jobs/{job_id}/cancel"))))
