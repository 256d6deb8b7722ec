"""`edgefleet devices`: the fleet registry over the API — devices, their telemetry, commands to them."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from agent import protocol as wire
from controlplane.cli._common import TokenOpt, UrlOpt, api, call, fail
from controlplane.statuses import CommandStatus

app = typer.Typer(no_args_is_help=True, help="Enrolled devices, their telemetry and commands via the API.")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the API's JSON instead of a table.")]
_URL = "http://127.0.0.1:8080"


def _echo_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2))


def _num(value: Any, fmt: str = ".1f") -> str:
    return format(value, fmt) if isinstance(value, int | float) and not isinstance(value, bool) else "-"


def _when(ts: Any) -> str:
    """A telemetry timestamp (UNIX seconds, device clock) as UTC ISO time to the second."""
    if not isinstance(ts, int | float):
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _seen(value: Any) -> str:
    return str(value)[:19].replace("T", " ") if value else "never"


def _device_line(d: dict[str, Any]) -> str:
    state = d.get("reported_state") or {}
    model = state.get("active_model") or "-"
    if state.get("active_variant"):
        model += f" ({state['active_variant']})"
    return (f"{d['device_id']:<24} {d['profile']:<18} {'online' if d['online'] else 'offline':<8} "
            f"{_seen(d.get('last_seen')):<20} {model:<28} {','.join(d.get('tags') or [])}")


_DEVICE_HEADER = f"{'DEVICE':<24} {'PROFILE':<18} {'STATUS':<8} {'LAST SEEN':<20} {'MODEL':<28} TAGS"


def _summary(payload: dict[str, Any]) -> list[str]:
    """The figures an operator looks at first, from one telemetry record (agent.protocol.Telemetry)."""
    system, power = payload.get("system") or {}, payload.get("power") or {}
    inference = payload.get("inference") or {}
    lines = [f"  seq {payload.get('seq', '-')} at {_when(payload.get('ts'))}",
             (f"  cpu {_num(system.get('cpu_percent'))}%  mem {_num(system.get('mem_used_mb'), '.0f')}/"
              f"{_num(system.get('mem_total_mb'), '.0f')} MB  disk {_num(system.get('disk_used_percent'))}%  "
              f"temperature {_num(system.get('temperature_c'))} C"),
             f"  power {power.get('power_source', '-')}  battery {_num(power.get('battery_percent'), '.0f')}%"
             + ("  charging" if power.get("charging") else "")]
    if inference:
        accuracy = (f"  on-device accuracy {inference['correct'] / inference['labelled']:.3f}"
                    if inference.get("labelled") else "")
        lines.append(f"  inference {inference.get('count', 0)} on {inference.get('model_version') or '-'}  "
                     f"p50 {_num(inference.get('latency_p50_ms'), '.2f')} ms  "
                     f"p95 {_num(inference.get('latency_p95_ms'), '.2f')} ms  "
                     f"errors {inference.get('errors', 0)}{accuracy}")
    return lines


def _device_table(d: dict[str, Any]) -> str:
    lines = [f"device:       {d['device_id']}",
             f"profile:      {d['profile']}",
             f"tags:         {', '.join(d.get('tags') or []) or '-'}",
             f"status:       {'online' if d['online'] else 'offline'} (last seen {_seen(d.get('last_seen'))})",
             f"enrolled:     {_seen(d.get('created_at'))}",
             f"agent:        {d.get('agent_version') or '-'}"]
    state = d.get("reported_state")
    if state:
        lines.append("reported state:")
        lines += [f"  {key}: {json.dumps(value) if isinstance(value, dict | list) else value}"
                  for key, value in sorted(state.items()) if value is not None and value != {}]
    else:
        lines.append("reported state: none yet")
    telemetry = d.get("last_telemetry")
    if telemetry:
        lines.append("last telemetry:")
        lines += _summary(telemetry)
    else:
        lines.append("last telemetry: none yet")
    return "\n".join(lines)


def _telemetry_line(r: dict[str, Any]) -> str:
    p = r.get("payload") or {}
    system, power, inference = p.get("system") or {}, p.get("power") or {}, p.get("inference") or {}
    mem = system.get("mem_used_mb")
    return (f"{r['seq']:>8} {_when(r.get('ts')):<20} {_num(system.get('cpu_percent')):>6} {_num(mem, '.0f'):>8} "
            f"{_num(system.get('temperature_c')):>6} {_num(power.get('battery_percent'), '.0f'):>7} "
            f"{_num(inference.get('latency_p50_ms'), '.2f'):>8} {_num(inference.get('latency_p95_ms'), '.2f'):>8}")


_TELEMETRY_HEADER = (f"{'SEQ':>8} {'TS (UTC)':<20} {'CPU%':>6} {'MEM MB':>8} {'TEMP C':>6} {'BATT%':>7} "
                     f"{'P50 ms':>8} {'P95 ms':>8}")


def _command_table(c: dict[str, Any]) -> str:
    lines = [f"command {c['command_id']} {c['kind']} to {c['device_id']}: {c['status']}"]
    if c.get("reason"):
        lines.append(f"reason: {c['reason']}")
    if c.get("result"):
        lines.append(f"result: {json.dumps(c['result'])}")
    if c.get("acked_at"):
        lines.append(f"acked at: {c['acked_at']}")
    return "\n".join(lines)


@app.command("list")
def devices_list(
    profile: Annotated[str | None, typer.Option(help="Only devices of this profile.")] = None,
    tag: Annotated[str | None, typer.Option(help="Only devices with this tag.")] = None,
    online: Annotated[bool | None, typer.Option("--online/--offline", help="Only online / offline devices.",
                                                show_default=False)] = None,
    limit: Annotated[int, typer.Option(help="At most this many (the API allows 1..5000).")] = 500,
    offset: Annotated[int, typer.Option(help="Skip this many first.")] = 0,
    as_json: JsonOpt = False,
    url: UrlOpt = _URL,
    token: TokenOpt = "",
) -> None:
    """Enrolled devices with profile, presence, last seen, active model and tags."""
    params: dict[str, Any] = {"limit": limit, "offset": offset}
    if profile is not None:
        params["profile"] = profile
    if tag is not None:
        params["tag"] = tag
    if online is not None:
        params["online"] = "true" if online else "false"
    devices = call(api(url, token).get("/api/v1/devices", params=params))
    if as_json:
        _echo_json(devices)
        return
    typer.echo(_DEVICE_HEADER)
    for d in devices:
        typer.echo(_device_line(d))
    typer.secho(f"{len(devices)} device(s)", err=True)


@app.command("show")
def devices_show(device_id: str, as_json: JsonOpt = False, url: UrlOpt = _URL, token: TokenOpt = "") -> None:
    """One device: its reported state and a summary of its last telemetry."""
    device = call(api(url, token).get(f"/api/v1/devices/{device_id}"))
    if as_json:
        _echo_json(device)
    else:
        typer.echo(_device_table(device))


@app.command("telemetry")
def devices_telemetry(
    device_id: str,
    last: Annotated[int, typer.Option("--last", "-n", help="The newest N records (the API allows 1..10000).")] = 20,
    since: Annotated[str | None, typer.Option(help="Device time, inclusive: UNIX seconds or ISO 8601.")] = None,
    until: Annotated[str | None, typer.Option(help="Device time, exclusive: UNIX seconds or ISO 8601.")] = None,
    as_json: JsonOpt = False,
    url: UrlOpt = _URL,
    token: TokenOpt = "",
) -> None:
    """A device's newest telemetry records, oldest first."""
    params: dict[str, Any] = {"limit": last}
    if since is not None:
        params["since"] = since
    if until is not None:
        params["until"] = until
    records = call(api(url, token).get(f"/api/v1/devices/{device_id}/telemetry", params=params))
    if as_json:
        _echo_json(records)
        return
    typer.echo(_TELEMETRY_HEADER)
    for r in records:
        typer.echo(_telemetry_line(r))


@app.command("command")
def devices_command(
    device_id: str,
    kind: Annotated[str, typer.Argument(help="The command kind, e.g. set_config.")],
    args: Annotated[str, typer.Option("--args", help="The command's arguments as a JSON object.")] = "{}",
    wait: Annotated[float, typer.Option(help="Seconds to wait for the ack (0..60; 0 returns at once).")] = 10.0,
    as_json: JsonOpt = False,
    url: UrlOpt = _URL,
    token: TokenOpt = "",
) -> None:
    """Send a command to a device and print its ack (or `pending` when none came within --wait); exit 1 when the
    device answered with an error."""
    try:
        arguments = json.loads(args)
    except ValueError as exc:
        fail(f"--args must be a JSON object: {exc}")
    if not isinstance(arguments, dict):
        fail(f"--args must be a JSON object, got {args!r}")
    command = call(api(url, token).post(f"/api/v1/devices/{device_id}/commands",
                                        json={"kind": kind, "args": arguments, "wait_s": wait}))
    if as_json:
        _echo_json(command)
    else:
        typer.echo(_command_table(command))
    if command["status"] == CommandStatus.ERROR:
        raise typer.Exit(1)  # the device refused or failed it: a script can tell


# Log lines come from the device: a hostile or broken one must not drive the operator's terminal (escape sequences).
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0)) if c not in (0x09, 0x0A)}


def _printable(text: str) -> str:
    return text.translate(_CONTROL)


@app.command("logs")
def devices_logs(
    device_id: str,
    lines: Annotated[int, typer.Option("--lines", "-n", min=1, max=wire.LOGS_MAX_LINES,
                                       help=f"The newest N log entries (1..{wire.LOGS_MAX_LINES}).")
                     ] = wire.LOGS_DEFAULT_LINES,
    wait: Annotated[float, typer.Option(help="Seconds to wait for the device's answer (0..60).")] = 10.0,
    as_json: JsonOpt = False,
    url: UrlOpt = _URL,
    token: TokenOpt = "",
) -> None:
    """A device agent's newest log entries, oldest first, as the agent keeps them in memory (credentials redacted,
    entries cut at 2048 characters, one answer at most ~60 KiB: older entries left out say so). Operator role.
    Exit 1 when the device refused or did not answer within --wait."""
    command = call(api(url, token).post(f"/api/v1/devices/{device_id}/commands",
                                        json={"kind": wire.CommandKind.LOGS, "args": {"lines": lines},
                                              "wait_s": wait}))
    if as_json:
        _echo_json(command)
    status, result = command["status"], command.get("result") or {}
    if status == CommandStatus.PENDING:
        typer.secho(f"{device_id} did not answer within {wait:g} s (offline?); command {command['command_id']}",
                    err=True)
        raise typer.Exit(1)
    if status != CommandStatus.OK:
        typer.secho(f"error: {device_id} answered: {command.get('reason')}", err=True)
        raise typer.Exit(1)
    if as_json:
        return
    shown = result.get("lines") or []
    if not shown:
        typer.secho(f"({device_id} has logged nothing at its log level since its agent started)", err=True)
    for line in shown:
        typer.echo(_printable(str(line)))
    if result.get("truncated"):
        typer.secho(f"({len(shown)} of the {min(lines, result.get('available', lines))} entries asked for fit in "
                    "one answer; older ones were left out)", err=True)


@app.command("restart")
def devices_restart(
    device_id: str,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    wait: Annotated[float, typer.Option(help="Seconds to wait for the device's ack (0..60).")] = 10.0,
    as_json: JsonOpt = False,
    url: UrlOpt = _URL,
    token: TokenOpt = "",
) -> None:
    """Restart a device's agent: it acks, stops cleanly and comes back (under systemd it exits with code 75 and
    Restart=on-failure starts it again after RestartSec; run by hand it re-executes itself). The device refuses a
    restart that reaches it more than 60 s after it was sent (never one queued through an outage) or within 15 s of
    its last restart, and runs each restart command once. Operator role. Exit 1 when refused or not acked."""
    client = api(url, token)
    device = call(client.get(f"/api/v1/devices/{device_id}"))  # an unknown device fails here, before the question
    if not device.get("online"):
        typer.secho(f"{device_id} is offline: a restart it receives more than 60 s from now is refused", err=True)
    if not yes:
        typer.confirm(f"restart the agent on {device_id}?", abort=True)
    command = call(client.post(f"/api/v1/devices/{device_id}/commands",
                               json={"kind": wire.CommandKind.RESTART, "args": {}, "wait_s": wait}))
    if as_json:
        _echo_json(command)
    status, result = command["status"], command.get("result") or {}
    if status == CommandStatus.PENDING:
        typer.secho(f"{device_id} did not ack within {wait:g} s; it restarts if the command reaches it within 60 s "
                    f"of sending, else refuses it (command {command['command_id']})", err=True)
        raise typer.Exit(1)
    if status != CommandStatus.OK:
        if not as_json:
            typer.secho(f"restart of {device_id} refused: {command.get('reason')}", err=True)
        raise typer.Exit(1)
    if not as_json:
        how = ("exits (code 75) for its supervisor to start it again" if result.get("mode") == "exit"
               else "re-executes itself")
        typer.echo(f"restart of {device_id} acknowledged: the agent (pid {result.get('pid', '?')}) {how}")


@app.command("delete")
def devices_delete(
    device_id: str,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    url: UrlOpt = _URL,
    token: TokenOpt = "",
) -> None:
    """Remove a device from the fleet: its registry entry, telemetry and broker account (admin)."""
    client = api(url, token)
    call(client.get(f"/api/v1/devices/{device_id}"))  # an unknown device fails here, before the question
    if not yes:
        typer.confirm(f"delete device {device_id}, its telemetry and its broker account?", abort=True)
    response = client.delete(f"/api/v1/devices/{device_id}")
    if response.status_code != 204:
        call(response)
    typer.echo(f"device {device_id} deleted")
