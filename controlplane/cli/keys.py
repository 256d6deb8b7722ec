"""`edgefleet keys`: the model-signing keys and their rotation, over the API."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from controlplane.cli._common import TokenOpt, UrlOpt, api, call

app = typer.Typer(no_args_is_help=True, help="Model-signing keys: status and rotation via the API.")

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
