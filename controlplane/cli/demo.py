"""`edgefleet demo`: the whole loop on this machine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from federated.burst.spec import JobKind
from federated.flower.config import Strategy


def demo(
    agents: Annotated[int, typer.Option(help="Number of simulated devices.")] = 4,
    duration: Annotated[float, typer.Option(help="Seconds of on-device inference at the end.")] = 20.0,
    rounds: Annotated[int, typer.Option(help="Federated rounds the schedule runs.")] = 3,
    strategy: Annotated[Strategy, typer.Option(help="Flower strategy.")] = Strategy.FEDAVG,
    alpha: Annotated[float, typer.Option(help="Dirichlet alpha of the devices' non-IID data.")] = 0.5,
    learn: Annotated[bool, typer.Option(help="Run the learning loop (needs edgefleet[train,build]).")] = True,
    burst: Annotated[JobKind | None, typer.Option(
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
