"""Console pages: logging in and out, the fleet, a device.

* ``/console/`` — the fleet: counts by profile and presence, filters (profile, tag, online), 50 devices a page
  with their latest telemetry; the live part (``/console/fleet/live``) is re-fetched by htmx every 5 s.
* ``/console/devices/{id}`` — one device: facts, telemetry charts over a window (``telemetry.json``, drawn with
  uPlot by ``static/console-device.js``), commands and their acks, model history; operators send ping, logs
  and restart from it (CSRF-protected forms, htmx posts).

Everything shown is read through :class:`~controlplane.devices.DeviceService` or the read-only queries in
``_queries_fleet``: the console keeps no state of its own.
"""

from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Final
from urllib.parse import urlencode

import msgspec
from litestar import Request, get, post
from litestar.enums import RequestEncodingType
from litestar.exceptions import NotFoundException, ValidationException
from litestar.params import Body, Parameter
from litestar.response import Redirect, Template

from agent import protocol as wire
from controlplane._bounds import NAME_PATTERN, NameParam
from controlplane._errors import ControlPlaneError, NotFound
from controlplane.auth import Role
from controlplane.console import _queries_fleet as q
from controlplane.console._auth import COOKIE, PREFIX, console_requires, console_user, safe_next
from controlplane.devices.schemas import OPERATOR_RESULT_KINDS, TAG_PATTERN, CommandCreate, DeviceRead
from controlplane.devices.service import DeviceService
from controlplane.statuses import CommandStatus

__all__ = ["HANDLERS", "PAGE_SIZE", "WINDOWS"]

_SESSION_S: Final = 12 * 3600
PAGE_SIZE: Final = 50
MAX_PAGE: Final = 1_000_000
WINDOWS: Final = {"1h": 3600, "6h": 6 * 3600, "24h": 24 * 3600, "7d": 7 * 86400}
# The operator actions on the device page: command kind -> (arguments, how long to wait for the ack).
ACTIONS: Final[dict[str, tuple[dict[str, Any], float]]] = {
    wire.CommandKind.PING: ({}, 5.0),
    wire.CommandKind.LOGS: ({"lines": wire.LOGS_MAX_LINES}, 10.0),
    wire.CommandKind.RESTART: ({}, 5.0),
}
_LISTED_RESULT_CHARS: Final = 4000  # a result in the command list (re-fetched every 5 s); the action shows it whole


def _optional(name_pattern: str) -> str:
    """The pattern, or empty: an unset select in a GET form sends ``name=``."""
    return f"^$|{name_pattern}"


ProfileQuery = Annotated[str, Parameter(pattern=_optional(NAME_PATTERN), max_length=64)]
TagQuery = Annotated[str, Parameter(pattern=_optional(TAG_PATTERN), max_length=64)]
OnlineQuery = Annotated[str, Parameter(pattern=r"^(|online|offline)$", max_length=8)]
PageQuery = Annotated[int, Parameter(ge=1, le=MAX_PAGE)]
WindowQuery = Annotated[str, Parameter(pattern=r"^(1h|6h|24h|7d)$", max_length=3)]
ActionParam = Annotated[str, Parameter(pattern=r"^[a-z_]{1,32}$", max_length=32)]


# -- login ---------------------------------------------------------------------------------------------------
class LoginForm(msgspec.Struct):
    token: str = ""
    next: str = ""


@get("/login", sync_to_thread=True)
def login_page(request: Request[Any, Any, Any],
               next: Annotated[str, Parameter(max_length=500)] = "") -> Template:
    return Template(template_name="login.html",
                    context={"next": safe_next(next), "error": None, "user": console_user(request)})


@post("/login", sync_to_thread=True, status_code=303)
def login(request: Request[Any, Any, Any],
          data: Annotated[LoginForm, Body(media_type=RequestEncodingType.URL_ENCODED)]) -> Template | Redirect:
    from controlplane.auth import verify_token

    secret = data.token.strip()
    info = verify_token(request.app.state.engine, secret) if 0 < len(secret) <= 200 else None
    if info is None:
        return Template(template_name="login.html", status_code=401,
                        context={"next": safe_next(data.next), "error": "invalid or revoked API token",
                                 "user": None})
    response = Redirect(safe_next(data.next), status_code=303)
    response.set_cookie(COOKIE, secret, path=PREFIX, httponly=True, samesite="strict", max_age=_SESSION_S,
                        secure=request.url.scheme == "https")
    return response


@post("/logout", sync_to_thread=False, status_code=303)
def logout() -> Redirect:
    response = Redirect(f"{PREFIX}/login", status_code=303)
    response.delete_cookie(COOKIE, path=PREFIX)
    return response


# -- helpers -------------------------------------------------------------------------------------------------
def _devices(request: Request[Any, Any, Any]) -> DeviceService:
    return request.app.state.fleet.devices  # type: ignore[no-any-return]


def ago(when: datetime | None, now: float | None = None) -> str:
    """``12 s ago``, ``3 min ago``, ``5 h ago``, ``2 d ago``; ``never``."""
    if when is None:
        return "never"
    seconds = max(0.0, (now if now is not None else time.time()) - when.timestamp())
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit} ago"
    return f"{int(seconds)} s ago"


def utc(when: datetime | None) -> str:
    return "" if when is None else when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) \
        else None


def _get(mapping: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(mapping, dict):
            return None
        mapping = mapping.get(key)
    return mapping


@dataclass(frozen=True)
class DeviceView:
    """What the fleet table and the device page show of a device (strings and numbers only: the templates escape
    every one of them)."""

    device_id: str
    profile: str
    tags: list[str]
    online: bool
    last_seen: str
    last_seen_utc: str
    agent_version: str | None
    runtime: str | None
    active_model: str | None
    active_variant: str | None
    cpu: float | None
    mem_used_mb: float | None
    temperature: float | None
    battery: float | None
    accuracy: float | None  # on-device, over the last telemetry window with labelled data
    telemetry_at: str

    @classmethod
    def of(cls, device: DeviceRead, now: float) -> DeviceView:
        state, telemetry = device.reported_state or {}, device.last_telemetry or {}
        labelled = _number(_get(telemetry, "inference", "labelled")) or 0
        correct = _number(_get(telemetry, "inference", "correct"))
        ts = _number(telemetry.get("ts"))
        return cls(
            device_id=device.device_id, profile=device.profile, tags=device.tags, online=device.online,
            last_seen=ago(device.last_seen, now), last_seen_utc=utc(device.last_seen),
            agent_version=device.agent_version, runtime=_str(state.get("runtime")),
            active_model=_str(state.get("active_model")), active_variant=_str(state.get("active_variant")),
            cpu=_number(_get(telemetry, "system", "cpu_percent")),
            mem_used_mb=_number(_get(telemetry, "system", "mem_used_mb")),
            temperature=_number(_get(telemetry, "system", "temperature_c")),
            battery=_number(_get(telemetry, "power", "battery_percent")),
            accuracy=(correct / labelled) if labelled > 0 and correct is not None else None,
            telemetry_at=utc(datetime.fromtimestamp(ts, UTC)) if ts is not None and 0 <= ts < 1e11 else "",
        )


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


@functools.cache
def _enrollable_profiles() -> tuple[str, ...]:
    """The shipped profiles a device can enrol with (the profile filter offers them before any device has)."""
    from firmware_profiles import load_profiles

    return tuple(name for name, profile in load_profiles().items() if profile.runtime.python_agent)


@dataclass(frozen=True)
class FleetQuery:
    profile: str
    tag: str
    online: str
    page: int

    @property
    def filter(self) -> q.FleetFilter:
        return q.FleetFilter(profile=self.profile or None, tag=self.tag or None,
                             online=None if not self.online else self.online == "online")

    def query_string(self, **changes: Any) -> str:
        values = {"profile": self.profile, "tag": self.tag, "online": self.online, "page": self.page, **changes}
        return urlencode({k: v for k, v in values.items() if v and not (k == "page" and v == 1)})


def _cache(request: Request[Any, Any, Any]) -> q.ReadCache:
    state = request.app.state
    cache = state.get("console_read_cache")
    if cache is None:
        cache = state.console_read_cache = q.ReadCache()
    return cache


def _fleet_context(request: Request[Any, Any, Any], query: FleetQuery) -> dict[str, Any]:
    engine = request.app.state.engine
    cache = _cache(request)
    fleet_filter = query.filter
    offset = (query.page - 1) * PAGE_SIZE
    devices = _devices(request).find(profile=fleet_filter.profile, tag=fleet_filter.tag, online=fleet_filter.online,
                                     limit=PAGE_SIZE, offset=offset)
    counts = cache.get("counts", lambda: q.fleet_counts(engine))
    total = counts.matching(fleet_filter)
    if total is None:
        total = cache.get(("total", fleet_filter), lambda: q.filtered_total(engine, fleet_filter))
    if devices:  # the counts may be a moment old: never say fewer than the page shows
        total = max(total, offset + len(devices))
    now = time.time()
    pages = max(1, math.ceil(total / PAGE_SIZE))
    return {
        "user": request.scope.get("user"), "query": query, "counts": counts,
        "devices": [DeviceView.of(d, now) for d in devices], "total": total, "first": offset + 1 if devices else 0,
        "last": offset + len(devices), "pages": pages,
        "prev_qs": query.query_string(page=query.page - 1) if query.page > 1 else None,
        "next_qs": query.query_string(page=query.page + 1) if query.page < pages else None,
        "live_qs": query.query_string(), "updated": utc(datetime.now(UTC)),
    }


# -- the fleet -----------------------------------------------------------------------------------------------
@get("/", guards=[console_requires(Role.VIEWER)], sync_to_thread=True)
def fleet_page(request: Request[Any, Any, Any], profile: ProfileQuery = "", tag: TagQuery = "",
               online: OnlineQuery = "", page: PageQuery = 1) -> Template:
    query = FleetQuery(profile, tag, online, page)
    context = _fleet_context(request, query)
    engine = request.app.state.engine
    context["tags"] = _cache(request).get("tags", lambda: q.tags_in_use(engine))
    context["profiles"] = sorted(set(_enrollable_profiles()) | {p for p, _, _ in context["counts"].by_profile})
    return Template(template_name="fleet.html", context=context)


@get("/fleet/live", guards=[console_requires(Role.VIEWER)], sync_to_thread=True)
def fleet_live(request: Request[Any, Any, Any], profile: ProfileQuery = "", tag: TagQuery = "",
               online: OnlineQuery = "", page: PageQuery = 1) -> Template:
    """The live part of the fleet page (counts, table, pager), for htmx to swap in."""
    return Template(template_name="_fleet_live.html", context=_fleet_context(request, FleetQuery(profile, tag,
                                                                                                    online, page)))


# -- a device ------------------------------------------------------------------------------------------------
def _device(request: Request[Any, Any, Any], device_id: str) -> DeviceRead:
    try:
        return _devices(request).get(device_id)
    except NotFound as exc:
        raise NotFoundException(str(exc)) from None


def _can_operate(request: Request[Any, Any, Any]) -> bool:
    user = request.scope.get("user")
    return user is not None and user.role.allows(Role.OPERATOR)


def _commands_context(request: Request[Any, Any, Any], device_id: str) -> dict[str, Any]:
    rows = q.command_rows(request.app.state.engine, device_id)
    operator = _can_operate(request)

    def result(kind: str, value: dict[str, Any] | None) -> str:
        if value and kind in OPERATOR_RESULT_KINDS and not operator:  # as the API's GET .../commands/{id}
            return "(shown to operators only)"
        return _clip(_result_text(value))

    return {"device_id": device_id, "commands": [
        {"kind": r.kind, "status": r.status, "reason": r.reason, "created": utc(r.created_at),
         "acked": utc(r.acked_at), "result": result(r.kind, r.result), "command_id": r.command_id}
        for r in rows]}


def _clip(text: str) -> str:
    if len(text) <= _LISTED_RESULT_CHARS:
        return text
    return f"{text[:_LISTED_RESULT_CHARS]}\n… ({len(text) - _LISTED_RESULT_CHARS} more characters)"


def _result_text(result: dict[str, Any] | None) -> str:
    """An ack's result as text: log lines as lines, anything else as JSON (shown escaped, never as markup)."""
    if not result:
        return ""
    lines = result.get("lines")
    if isinstance(lines, list) and all(isinstance(line, str) for line in lines):
        note = "\n(older entries did not fit in one answer)" if result.get("truncated") is True else ""
        return "\n".join(lines) + note
    return json.dumps(result, indent=1, sort_keys=True, default=str)[:20_000]


@get("/devices/{device_id:str}", guards=[console_requires(Role.VIEWER)], sync_to_thread=True)
def device_page(request: Request[Any, Any, Any], device_id: NameParam, window: WindowQuery = "1h") -> Template:
    device = _device(request, device_id)
    engine = request.app.state.engine
    history = q.model_history(engine, device_id)
    return Template(template_name="device.html", context={
        "user": request.scope.get("user"), "device": DeviceView.of(device, time.time()), "window": window,
        "windows": list(WINDOWS), "can_operate": _can_operate(request), "actions": list(ACTIONS),
        "history": [{"deployment_id": h.deployment_id, "model": h.model_version, "variant": h.variant,
                     "rollback": h.rollback, "status": h.status, "reason": h.reason, "previous": h.previous_model,
                     "created": utc(h.created_at), "finished": utc(h.finished_at)} for h in history],
        **_commands_context(request, device_id),
    })


@get("/devices/{device_id:str}/commands", guards=[console_requires(Role.VIEWER)], sync_to_thread=True)
def device_commands(request: Request[Any, Any, Any], device_id: NameParam) -> Template:
    """The device's commands and acks (the device page re-fetches them every 5 s)."""
    _device(request, device_id)
    return Template(template_name="_device_commands.html", context=_commands_context(request, device_id))


def _series(rows: list[tuple[float, dict[str, Any]]], *path: str) -> list[float | None]:
    return [_number(_get(payload, *path)) for _, payload in rows]


@get("/devices/{device_id:str}/telemetry.json", guards=[console_requires(Role.VIEWER)], sync_to_thread=True)
def device_telemetry(request: Request[Any, Any, Any], device_id: NameParam,
                     window: WindowQuery = "1h") -> dict[str, Any]:
    """The window's telemetry as columns for uPlot (at most ``MAX_POINTS`` records: thinned beyond that), and the
    class histogram summed over the records drawn."""
    _device(request, device_id)
    since = time.time() - WINDOWS[window]
    series = q.telemetry_series(request.app.state.engine, device_id, since)
    rows = series.rows
    histogram: dict[str, float] = {}
    for _, payload in rows:
        counts = _get(payload, "inference", "class_histogram")
        if isinstance(counts, dict):
            for label, n in counts.items():
                value = _number(n)
                if value is not None:
                    histogram[str(label)] = histogram.get(str(label), 0.0) + value
    top = sorted(histogram.items(), key=lambda item: (-item[1], item[0]))[:50]
    return {
        "device_id": device_id, "window": window, "since": since, "records": series.records,
        "every": series.every,
        "ts": [ts for ts, _ in rows],
        "cpu_percent": _series(rows, "system", "cpu_percent"),
        "mem_used_mb": _series(rows, "system", "mem_used_mb"),
        "mem_total_mb": _series(rows, "system", "mem_total_mb"),
        "temperature_c": _series(rows, "system", "temperature_c"),
        "battery_percent": _series(rows, "power", "battery_percent"),
        "latency_p50_ms": _series(rows, "inference", "latency_p50_ms"),
        "latency_p95_ms": _series(rows, "inference", "latency_p95_ms"),
        "mean_confidence": _series(rows, "inference", "mean_confidence"),
        "class_histogram": [{"label": label, "count": n} for label, n in top],
    }


@post("/devices/{device_id:str}/actions/{action:str}", guards=[console_requires(Role.OPERATOR)],
      sync_to_thread=True, status_code=200)
def device_action(request: Request[Any, Any, Any], device_id: NameParam, action: ActionParam) -> Template | Redirect:
    """Send ping, logs or restart and wait briefly for the ack; htmx gets the outcome as a fragment, a plain form
    post is redirected back to the device page (whose command list shows it)."""
    if action not in ACTIONS:
        raise ValidationException(f"unknown action '{action}': one of {', '.join(ACTIONS)}")
    _device(request, device_id)
    args, wait_s = ACTIONS[action]
    htmx = bool(request.headers.get("hx-request"))
    try:
        command = _devices(request).send_command(device_id, CommandCreate(kind=action, args=dict(args),
                                                                          wait_s=wait_s))
    except ControlPlaneError as exc:
        if not htmx:
            raise
        # htmx swaps only 2xx answers: the refusal is shown where the outcome would have been.
        return Template(template_name="_device_action.html", context={
            "action": action, "status": CommandStatus.ERROR, "reason": str(exc), "result": "", "oob": True,
            **_commands_context(request, device_id)})
    if not htmx:
        return Redirect(f"{PREFIX}/devices/{device_id}", status_code=303)
    return Template(template_name="_device_action.html", context={
        "action": action, "status": str(command.status), "reason": command.reason,
        "result": _result_text(command.result), "oob": True, **_commands_context(request, device_id)})


HANDLERS: Final[list[Any]] = [login_page, login, logout, fleet_page, fleet_live, device_page, device_commands,
                              device_telemetry, device_action]
