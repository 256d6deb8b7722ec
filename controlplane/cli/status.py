"""`edgefleet status`: the fleet at a glance over the API — devices by profile and state, the last round, active
rollouts, jobs by status."""

from __future__ import annotations

import json
from collections import Counter
from typing import Annotated, Any

import typer

from controlplane.cli._common import TokenOpt, UrlOpt, api, call
from controlplane.output import deployment_progress
from controlplane.statuses import DeploymentStatus, JobStatus

_DEVICE_PAGE = 5000  # the API's largest page
_JOBS = 1000  # the API's largest list of jobs: counts cover the newest this many


def collect(client: Any) -> dict[str, Any]:
    """The figures `edgefleet status` shows, read from the API (every device, paged; the newest round; every
    deployment; the newest jobs)."""
    by_profile: dict[str, Counter[str]] = {}
    offset = 0
    while True:
        page = call(client.get("/api/v1/devices", params={"limit": _DEVICE_PAGE, "offset": offset}))
        for d in page:
            by_profile.setdefault(d["profile"], Counter())["online" if d["online"] else "offline"] += 1
        if len(page) < _DEVICE_PAGE:
            break
        offset += _DEVICE_PAGE
    online = sum(c["online"] for c in by_profile.values())
    offline = sum(c["offline"] for c in by_profile.values())
    rounds = call(client.get("/api/v1/rounds", params={"limit": 1}))
    last_round = None
    if rounds:
        r = rounds[0]
        flower = [m for m in r.get("metrics") or [] if m.get("round", 0) > 0]
        last_round = {"id": r["id"], "status": r["status"], "task": r["task"], "strategy": r["strategy"],
                      "reason": r.get("reason"), "invited": len(r["invited"]), "participants": len(r["participants"]),
                      "skipped": len(r["skipped"]), "accuracy": flower[-1].get("accuracy") if flower else None,
                      "model_version": r.get("model_version"), "created_at": r.get("created_at"),
                      "finished_at": r.get("finished_at")}
    deployments = call(client.get("/api/v1/deployments"))
    active = [{"id": d["id"], "status": d["status"], "model_version": d["model_version"],
               "current_wave": d["current_wave"], "waves": d["waves"], "counts": d["counts"],
               "progress": deployment_progress(d)}
              for d in deployments if DeploymentStatus(d["status"]).active]
    jobs = call(client.get("/api/v1/jobs", params={"limit": _JOBS}))
    return {
        "devices": {"total": online + offline, "online": online, "offline": offline,
                    "by_profile": {p: {"online": c["online"], "offline": c["offline"]}
                                   for p, c in sorted(by_profile.items())}},
        "last_round": last_round,
        "deployments": {"total": len(deployments), "active": active},
        "jobs": {"counted": len(jobs), "by_status": dict(sorted(Counter(j["status"] for j in jobs).items())),
                 "active": [{"id": j["id"], "kind": j["kind"], "status": j["status"], "placement": j["placement"],
                             "progress": j.get("progress") or {}}
                            for j in jobs if not JobStatus(j["status"]).finished]},
    }


def render(status: dict[str, Any]) -> list[str]:
    """The terminal view of :func:`collect`'s figures."""
    devices = status["devices"]
    lines = [f"DEVICES      {devices['total']}  (online {devices['online']}, offline {devices['offline']})"]
    if devices["by_profile"]:
        width = max(len("PROFILE"), *(len(p) for p in devices["by_profile"]))
        lines.append(f"  {'PROFILE':<{width}}  {'ONLINE':>6}  {'OFFLINE':>7}  {'TOTAL':>6}")
        for profile, c in devices["by_profile"].items():
            lines.append(f"  {profile:<{width}}  {c['online']:>6}  {c['offline']:>7}  {c['online'] + c['offline']:>6}")
    r = status["last_round"]
    if r is None:
        lines.append("LAST ROUND   none yet")
    else:
        accuracy = f"  accuracy {r['accuracy']:.4f}" if isinstance(r["accuracy"], float) else ""
        when = str(r["finished_at"] or r["created_at"] or "")[:19].replace("T", " ")
        lines.append(f"LAST ROUND   #{r['id']} {r['status']}  {r['task']}/{r['strategy']}  took part "
                     f"{r['participants']}/{r['invited']} invited{accuracy}  model {r['model_version'] or '-'}"
                     + (f"  ({when})" if when else ""))
        if r.get("reason"):
            lines.append(f"  reason: {r['reason']}")
    active = status["deployments"]["active"]
    lines.append(f"DEPLOYMENTS  {len(active)} active of {status['deployments']['total']}")
    for d in active:
        lines.append(f"  #{d['id']:<4} {d['model_version']:<24} {d['progress']}")
    jobs = status["jobs"]
    counts = ", ".join(f"{s} {n}" for s, n in jobs["by_status"].items()) or "none"
    lines.append(f"JOBS         {counts}")
    for j in jobs["active"]:
        progress = j["progress"]
        step = f"  epoch {progress.get('epoch')}" if progress.get("epoch") is not None else ""
        lines.append(f"  #{j['id']:<4} {j['kind']:<9} {j['status']:<8} on {j['placement']}{step}")
    return lines


def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON instead of a table.")] = False,
    url: UrlOpt = "http://127.0.0.1:8080",
    token: TokenOpt = "",
) -> None:
    """The fleet at a glance: devices by profile and online/offline, the last round, active rollouts with their
    progress, jobs by status (a viewer token is enough)."""
    figures = collect(api(url, token))
    if as_json:
        typer.echo(json.dumps(figures, indent=2))
        return
    for line in render(figures):
        typer.echo(line)
