"""`edgefleet models`: the model registry over the API — versions, their variants and gate verdicts."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from controlplane.cli._common import TokenOpt, UrlOpt, api, call

app = typer.Typer(no_args_is_help=True, help="Model versions and their variants via the API.")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the API's JSON instead of a table.")]
_URL = "http://127.0.0.1:8080"


def _size(n: Any) -> str:
    if not isinstance(n, int):
        return "-"
    return f"{n / 1024:.1f} KiB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.2f} MiB"


def _accuracy(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "-"


def _verdict(v: dict[str, Any]) -> str:
    """The gate's verdict on a variant: published, or refused and why."""
    return "published" if v["published"] else f"refused: {v.get('reason') or 'no reason given'}"


def _line(m: dict[str, Any]) -> str:
    published = [v["variant"] for v in m["variants"] if v["published"]]
    return (f"{m['version']:<28} release {m['release']:<4} {m['task']:<12} {m['status']:<9} "
            f"{m['source_kind']} {m['source_id']:<12} variants {','.join(published) or '-'}")


_HEADER = f"{'VERSION':<28} {'RELEASE':<12} {'TASK':<12} {'STATUS':<9} SOURCE / PUBLISHED VARIANTS"


def _table(m: dict[str, Any]) -> str:
    lines = [f"version:  {m['version']}",
             f"release:  {m['release']}",
             f"task:     {m['task']}",
             f"status:   {m['status']}" + (f" ({m['reason']})" if m.get("reason") else ""),
             f"source:   {m['source_kind']} {m['source_id']}",
             f"created:  {str(m['created_at'])[:19].replace('T', ' ')}"]
    if m.get("metrics"):
        lines.append(f"metrics:  {json.dumps(m['metrics'], sort_keys=True)}")
    lines.append(f"{'VARIANT':<14} {'SIZE':>11} {'ACCURACY':>9}  VERDICT")
    for v in m["variants"]:
        lines.append(f"{v['variant']:<14} {_size(v.get('size_bytes')):>11} {_accuracy(v.get('accuracy')):>9}  "
                     f"{_verdict(v)}")
    return "\n".join(lines)


@app.command("list")
def models_list(as_json: JsonOpt = False, url: UrlOpt = _URL, token: TokenOpt = "") -> None:
    """Every model version with its release, task, status, source and published variants."""
    models = call(api(url, token).get("/api/v1/models"))
    if as_json:
        typer.echo(json.dumps(models, indent=2))
        return
    typer.echo(_HEADER)
    for m in models:
        typer.echo(_line(m))


@app.command("show")
def models_show(version: str, as_json: JsonOpt = False, url: UrlOpt = _URL, token: TokenOpt = "") -> None:
    """One model version: each variant's size, accuracy and gate verdict."""
    model = call(api(url, token).get(f"/api/v1/models/{version}"))
    if as_json:
        typer.echo(json.dumps(model, indent=2))
    else:
        typer.echo(_table(model))
