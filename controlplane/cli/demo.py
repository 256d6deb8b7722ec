"""`edgefleet demo`: the whole loop on this machine."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from controlplane.output import stderr_to
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
    serve: Annotated[bool, typer.Option(
        help="After the summary, keep the control plane, its web console and the agents up until Ctrl-C.")] = False,
    port: Annotated[int, typer.Option(help="HTTP port of the API and console (0: a free port).", min=0,
                                      max=65535)] = 0,
    log_file: Annotated[Path | None, typer.Option(
        help="Where the logs go: the control plane's JSON events and the ML libraries' output "
             "(default: DATA_DIR/demo.log, or a new edgefleet-demo-*.log in the temporary directory).")] = None,
) -> None:
    """The whole loop on this machine: control plane, broker, N agents, scheduled federated rounds, build, signed
    rollout, on-device inference; prints the summary and the console's URL (--serve: keeps serving it)."""
    # Before anything imports TensorFlow, LiteRT, torch or absl (here and in the processes the demo starts): their
    # C++ logging reads these at load time.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("ABSL_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    if log_file is None:
        if data_dir is not None:
            data_dir.mkdir(parents=True, exist_ok=True)
            log_file = data_dir / "demo.log"
        else:  # outlives the temporary data dir, so it can be read after the demo
            fd, name = tempfile.mkstemp(prefix="edgefleet-demo-", suffix=".log")
            os.close(fd)
            log_file = Path(name)
    with stderr_to(log_file):
        from agent.logsetup import configure_logging
        from controlplane.demo import run_demo

        # stderr is the log file now: JSON lines, one per event, the control plane's at info and up
        configure_logging("info", json=True)
        summary = run_demo(agents=agents, duration_s=duration, broker_url=broker, data_dir=data_dir, rounds=rounds,
                           alpha=alpha, strategy=strategy.value, learn=None if learn else False,
                           burst=None if burst is None else burst.value, port=port, serve=serve, log_path=log_file)
    if json_path is not None:
        json_path.write_text(json.dumps(summary, indent=2))
        typer.echo(f"summary written to {json_path}")
