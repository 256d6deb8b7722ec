"""`edgefleet keys`: the model-signing keys and their rotation, and the fleet CA's renewal, over the API."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from controlplane.cli._common import TokenOpt, UrlOpt, api, call

app = typer.Typer(no_args_is_help=True, help="Model-signing keys (status, rotation) and the fleet CA (renewal) via the API.")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the API's JSON instead of text.")]
_URL = "http://127.0.0.1:8080"


def _text(data: dict[str, Any]) -> str:
    lines = [f"active key: {data['active_key_id']}"]
    for key in data["keys"]:
        lines.append(f"  {key['key_id']}  rotation {key['rotation']:<3} {key['state']:<8} {key['public_key']}")
    rotation = data.get("rotation")
    if rotation is None:
        lines.append("no rotation yet")
        return "\n".join(lines)
    lines.append(f"rotation {rotation['number']}: {rotation['status']}, {rotation['old_key_id']} -> "
                 f"{rotation['new_key_id']} (issued {rotation['issued_at']}"
                 + (f", completed {rotation['completed_at']})" if rotation.get("completed_at") else ")"))
    lines.append(f"devices: {rotation['devices']}, acknowledged the new key: {rotation['acknowledged']}, "
                 f"retired the old key: {rotation['retired']}")
    pending = rotation["pending"]
    if pending:
        lines.append(f"{'DEVICE':<24} {'ONLINE':<7} {'STEP':<7} {'STATUS':<8} REASON")
        for d in pending:
            lines.append(f"{d['device_id']:<24} {'yes' if d['online'] else 'no':<7} {d['step']:<7} "
                         f"{d.get('status') or '-':<8} {d.get('reason') or ''}")
    return "\n".join(lines)


def _print(data: Any, as_json: bool) -> None:
    typer.echo(json.dumps(data, indent=2) if as_json else _text(data))


@app.command("status")
def keys_status(
    limit: Annotated[int, typer.Option(help="List at most this many devices that have not acknowledged.")] = 20,
    as_json: JsonOpt = False,
    url: UrlOpt = _URL,
    token: TokenOpt = "",
) -> None:
    """The signing keys, the latest rotation and the devices that have not acknowledged it."""
    _print(call(api(url, token).get("/api/v1/keys", params={"limit": limit})), as_json)


@app.command("rotate")
def keys_rotate(
    complete: Annotated[bool, typer.Option(
        "--complete", help="Switch signing to the new key and retire the old one on the devices.")] = False,
    force: Annotated[bool, typer.Option(
        help="With --complete: even though devices have not acknowledged the new key.")] = False,
    as_json: JsonOpt = False,
    url: UrlOpt = _URL,
    token: TokenOpt = "",
) -> None:
    """Begin a rotation (a new key, announced to every device signed by the current one), or --complete it.

    An admin token is needed. Completing is refused while devices have not acknowledged the new key (they would
    refuse every release it signs) unless --force.
    """
    client = api(url, token)
    if complete:
        _print(call(client.post("/api/v1/keys/rotate/complete", json={"force": force})), as_json)
    else:
        if force:
            typer.secho("--force only applies with --complete", err=True)
        _print(call(client.post("/api/v1/keys/rotate")), as_json)


def _ca_text(data: dict[str, Any]) -> str:
    lines = [(f"fleet CA bundle version {data['bundle_version']} (the listeners loaded version "
             f"{data.get('listeners_bundle_version')} at start); issuing CA: {data.get('active')}")]
    for ca in data["trusted"]:
        lines.append(f"  CA {ca['number']}  {ca['fingerprint'][:16]}  {ca['subject']}  until {ca['not_after']}")
    renewal = data.get("renewal")
    if renewal is None:
        lines.append("no CA renewal yet")
    else:
        lines.append(f"renewal {renewal['number']}: {renewal['status']}, CA {renewal['old_fingerprint'][:16]} -> "
                     f"{renewal['new_fingerprint'][:16]} (issued {renewal['issued_at']})")
        lines.append(f"devices: {renewal['devices']}, hold the new CA: {renewal['trust_new_ca']}, certificates "
                     f"renewed: {renewal['certificates_renewed']}, with a step left: {renewal['pending_devices']}")
        if renewal["pending"]:
            lines.append(f"{'DEVICE':<24} {'ONLINE':<7} {'STEP':<20} {'STATUS':<8} REASON")
            for d in renewal["pending"]:
                lines.append(f"{d['device_id']:<24} {'yes' if d['online'] else 'no':<7} {d['step']:<20} "
                             f"{d.get('status') or '-':<8} {d.get('reason') or ''}")
    if data.get("note"):
        lines.append(f"NOTE: {data['note']}")
    return "\n".join(lines)


@app.command("renew-ca")
def keys_renew_ca(
    complete: Annotated[bool, typer.Option(
        "--complete", help="Issue from the new CA and re-issue the server certificate under it.")] = False,
    retire_old: Annotated[bool, typer.Option(
        "--retire-old", help="Drop the old CA from the bundle: its certificates are refused from then on.")] = False,
    status: Annotated[bool, typer.Option("--status", help="Only show the CA and the renewal's progress.")] = False,
    force: Annotated[bool, typer.Option(
        help="With --complete / --retire-old: even though devices have not acknowledged what it needs.")] = False,
    limit: Annotated[int, typer.Option(help="List at most this many devices with a step left.")] = 20,
    as_json: JsonOpt = False,
    url: UrlOpt = _URL,
    token: TokenOpt = "",
) -> None:
    """Renew the fleet CA with the fleet online: a new CA beside the old, its bundle (old + new) sent to every
    device signed by the model-signing key, and new client certificates of the new CA; then --complete, then
    --retire-old.

    An admin token is needed. --complete is refused while devices do not hold the new CA, --retire-old while
    devices still need the old one, unless --force.
    """
    if sum((complete, retire_old, status)) > 1:
        typer.secho("choose one of --complete, --retire-old, --status", err=True)
        raise typer.Exit(2)
    if force and not (complete or retire_old):
        typer.secho("--force only applies with --complete or --retire-old", err=True)
    client = api(url, token)
    if status:
        data = call(client.get("/api/v1/keys/ca", params={"limit": limit}))
    elif complete:
        data = call(client.post("/api/v1/keys/ca/complete", json={"force": force}))
    elif retire_old:
        data = call(client.post("/api/v1/keys/ca/retire-old", json={"force": force}))
    else:
        data = call(client.post("/api/v1/keys/ca/renew"))
    typer.echo(json.dumps(data, indent=2) if as_json else _ca_text(data))
