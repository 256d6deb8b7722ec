"""`edgefleet tasks`: the learning tasks this machine registers, and a check of one without a fleet."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from controlplane.cli._common import fail, register_tasks

app = typer.Typer(no_args_is_help=True, help="Learning tasks: list them, check one locally without a fleet.")

TaskOpt = Annotated[list[str] | None, typer.Option(
    "--task", help="Register a task first, NAME=package.module:Class (repeatable; as `controlplane serve --task`).")]


@app.command("list")
def tasks_list(task: TaskOpt = None,
               as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """The registered tasks (built-in, `edgefleet.tasks` entry points, EDGEFLEET_TASKS) and where each comes from."""
    from federated.tasks import TaskRegistry

    register_tasks(task or [])
    entries = list(TaskRegistry.from_env())
    if as_json:
        typer.echo(json.dumps([{"name": e.name, "target": e.target, "source": e.source} for e in entries], indent=2))
        return
    typer.echo(f"{'NAME':<24} {'SOURCE':<18} TARGET")
    for e in entries:
        typer.echo(f"{e.name:<24} {e.source:<18} {e.target}")


@app.command("check")
def tasks_check(
    name: Annotated[str, typer.Argument(help="The task's registered name.")],
    task: TaskOpt = None,
    epochs: Annotated[int, typer.Option(min=1, max=1000, help="Central training epochs before the build.")] = 10,
    devices: Annotated[int, typer.Option(min=1, max=1000, help="Device partitions to try.")] = 4,
    variant: Annotated[list[str] | None, typer.Option(
        "--variant", help="Build only these variants (repeatable; default: fp32, fp16, dynamic-int8, full-int8).")] = None,
    out: Annotated[Path | None, typer.Option(help="Keep the built, signed variants in this directory.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Load, validate, train, convert, quantise and gate a task on this machine, as a round and its build would.

    Exit status 0 when every step passes, 1 when one fails (the step says what is wrong)."""
    try:
        from federated.build import ALL_VARIANTS
        from federated.check import check_task
    except ImportError as exc:
        fail(f"checking a task needs `pip install 'edgefleet[train,build]'` ({exc})")
    known = [v.value for v in ALL_VARIANTS]
    unknown = sorted(set(variant or []) - set(known))
    if unknown:
        fail(f"unknown variant(s) {', '.join(unknown)}: choose from {', '.join(known)}")
    register_tasks(task or [])
    import contextlib
    import sys

    # Converters and quantisers print progress on stdout: keep stdout for the report (and --json parseable).
    with contextlib.redirect_stdout(sys.stderr):
        report = check_task(name, epochs=epochs, devices=devices, variants=variant or None, out_dir=out)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        for step in report.steps:
            mark = typer.style("ok  ", fg=typer.colors.GREEN) if step.ok else typer.style("FAIL", fg=typer.colors.RED)
            typer.echo(f"{mark} {step.name:<10} {step.detail}  ({step.seconds:.1f} s)")
        if report.variants:
            typer.echo(f"\n{'VARIANT':<14} {'SIZE':>9} {'ACCURACY':>9} {'DROP':>7}  GATE")
            for v in report.variants:
                accuracy = f"{v['accuracy']:.4f}" if v["accuracy"] is not None else "-"
                drop = f"{v['accuracy_drop']:+.4f}" if v["accuracy_drop"] is not None else "-"
                gate = "pass" if v["published"] else f"rejected: {v['reason']}"
                typer.echo(f"{v['variant']:<14} {v['size_bytes']:>9} {accuracy:>9} {drop:>7}  {gate}")
        typer.echo(f"\ntask {name}: " + ("ready for a fleet" if report.ok else "NOT ready (see FAIL above)"))
    if not report.ok:
        raise typer.Exit(1)
