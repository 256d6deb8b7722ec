"""`edgefleet provisioning`: tokens devices enrol themselves with (`edgefleet agent enroll`), over the API."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any

import typer

from controlplane.cli._common import TokenOpt, UrlOpt, api, call, fail

app = typer.Typer(no_args_is_help=True, help="Provisioning tokens for `edgefleet agent enroll` (admin token).")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the API's JSON instead of text.")]
_URL = "http://127.0.0.1:8080"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """Seconds from `90`, `90s`, `30m`, `24h` or `7d`."""
    match = re.fullmatch(r"\s*(\d{1,9})\s*([smhd]?)\s*", text.lower())
    if match is None:
        fail(f"--expires {text!r}: expected a number with s, m, h or d (e.g. 24h)")
        raise AssertionError  # fail() exits; this satisfies the type checker
    return int(match.group(1)) * _UNITS[match.group(2) or "s"]


def _line(t: dict[str, Any]) -> str:
    uses = f"{t['uses']}/{t['max_uses']}"
    return (f"{t['id']:>4} {t['state']:<8} {uses:<13} {t['expires_at'][:19]:<20} {t['profile']:<18} "
            f"{','.join(t['tags']) or '-':<20} {t['created_by']}")


@app.command("create")
def provisioning_create(
    profile: Annotated[str, typer.Option(help="The firmware profile the devices enrol as.")],
    tags: Annotated[str, typer.Option(help="Comma-separated tags the devices get.")] = "",
    max_uses: Annotated[int, typer.Option(help="How many devices may enrol with it (1..100000).")] = 1,
    expires: Annotated[str, typer.Option(help="Lifetime: 30m, 24h, 7d (at most 30d).")] = "24h",
    ca_out: Annotated[Path | None, typer.Option(
        help="Write the fleet CA here, for the devices' --ca-file.")] = None,
    as_json: JsonOpt = False,
    url: UrlOpt = _URL,
    token: TokenOpt = "",
) -> None:
    """Create a provisioning token and print it (shown once) with a command that enrols a device with it."""
    body = {"profile": profile, "tags": [t.strip() for t in tags.split(",") if t.strip()], "max_uses": max_uses,
            "expires_in_s": parse_duration(expires)}
    created = call(api(url, token).post("/api/v1/provisioning-tokens", json=body))
    if ca_out is not None:
        ca_out.write_text(created["ca_bundle_pem"], encoding="ascii")
    if as_json:
        typer.echo(json.dumps(created, indent=2))
        return
    typer.echo(created["token"])
    info = created["provisioning_token"]
    ca = f" --ca-file {ca_out.name}" if ca_out is not None else " --ca-file ca.pem"
    typer.secho(
        f"provisioning token #{info['id']}: profile {info['profile']}, up to {info['max_uses']} device(s), expires "
        f"{info['expires_at']}\nfleet CA sha256 {created['ca_sha256']}"
        + (f" (written to {ca_out})" if ca_out is not None else
           " (--ca-out FILE writes it; on the control plane: $DATA_DIR/pki/ca-bundle.pem)")
        + f"\non a device (copy the CA there first):\n  EDGEFLEET_PROVISIONING_TOKEN={created['token']} "
          f"edgefleet agent enroll --controlplane {url.rstrip('/')}{ca} --data-dir /var/lib/edgefleet-agent",
        err=True, fg=typer.colors.GREEN)


@app.command("list")
def provisioning_list(as_json: JsonOpt = False, url: UrlOpt = _URL, token: TokenOpt = "") -> None:
    """Provisioning tokens (never their secrets): uses, expiry and state."""
    tokens = call(api(url, token).get("/api/v1/provisioning-tokens"))
    if as_json:
        typer.echo(json.dumps(tokens, indent=2))
        return
    typer.echo(f"{'ID':>4} {'STATE':<8} {'USES':<13} {'EXPIRES (UTC)':<20} {'PROFILE':<18} {'TAGS':<20} CREATED BY")
    for t in tokens:
        typer.echo(_line(t))


@app.command("revoke")
def provisioning_revoke(token_id: int, url: UrlOpt = _URL, token: TokenOpt = "") -> None:
    """Revoke a provisioning token: no device can enrol with it any more (enrolled devices stay)."""
    response = api(url, token).delete(f"/api/v1/provisioning-tokens/{token_id}")
    if response.status_code != 204:
        call(response)
    typer.echo(f"provisioning token #{token_id} revoked")
