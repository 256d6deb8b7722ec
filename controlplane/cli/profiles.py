"""`edgefleet profiles`: the shipped firmware profiles (device classes)."""

from __future__ import annotations

from typing import Annotated

import typer

from controlplane.cli._common import fail

app = typer.Typer(no_args_is_help=True, help="Firmware profiles (device classes).")

@app.command("list")
def profiles_list(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """List the shipped firmware profiles."""
    from firmware_profiles import ProfileError, load_profiles

    try:
        profiles = load_profiles()
    except ProfileError as exc:
        fail(str(exc))
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


@app.command("show")
def profiles_show(name: str) -> None:
    """Show one profile in full (JSON)."""
    import msgspec

    from firmware_profiles import ProfileError, get_profile

    try:
        profile = get_profile(name)
    except ProfileError as exc:
        fail(str(exc))
    typer.echo(msgspec.json.format(msgspec.json.encode(profile), indent=2).decode())
