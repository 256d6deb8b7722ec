"""Console pages: rounds and schedules, models, deployments, jobs.

Every page reads the services the API uses (``request.app.state.fleet``) or, for lists and per-device progress,
the same tables through the paginated, SQL-aggregated reads of ``_queries_ops``. The only writes are the
operator's actions — start a round, pause / resume / cancel a deployment, cancel a job — and they go through the
very service methods the API's POST handlers call, with the same validation. A viewer sees those buttons disabled
and a POST answers 403. Ids in paths are checked here so that a malformed one is a 400 page and an unknown one a
404 page (never a 500, never the API's JSON).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any, Final

import msgspec
from litestar import Request, get, post
from litestar.enums import RequestEncodingType
from litestar.exceptions import HTTPException
from litestar.params import Body, Parameter
from litestar.response import Redirect, Template

from controlplane._bounds import MAX_OFFSET, NAME_PATTERN, ROW_ID_MAX
from controlplane._errors import ControlPlaneError, InvalidInput
from controlplane.auth import Role, TokenInfo
from controlplane.console import _queries_ops as q
from controlplane.console._auth import PREFIX, console_requires
from controlplane.rounds.schemas import RoundCreate, RoundRead, Strategy
from controlplane.statuses import DeploymentStatus, JobStatus, TargetStatus

if TYPE_CHECKING:
    from controlplane.wiring import Fleet

__all__ = ["HANDLERS"]

Offset = Annotated[int, Parameter(ge=0, le=MAX_OFFSET, description="the first row shown")]
TargetFilter = Annotated[TargetStatus | None, Parameter(description="show only devices with this status")]
PathText = Annotated[str, Parameter(description="checked by the handler: 400 if malformed, 404 if unknown")]
Form = Annotated[dict[str, Any], Body(media_type=RequestEncodingType.URL_ENCODED)]

_VIEW: Final = console_requires(Role.VIEWER)
_OPERATE: Final = console_requires(Role.OPERATOR)
_NAME: Final = re.compile(NAME_PATTERN)
_STATE_LOCK: Final = threading.Lock()
_SHOWN_IDS: Final = 200  # device ids listed on a round's page per list (the rest are counted)
_SHOWN_PER_REASON: Final = 12  # example devices per skip reason
_LOG_LINES: Final = 200  # lines of a job's log tail shown
_ROUND_FIELDS: Final = ("task", "strategy", "rounds", "min_clients", "max_clients", "local_epochs", "learning_rate",
                        "initial_model")
_DEPLOYMENT_ACTIONS: Final = ("pause", "resume", "cancel")


# -- helpers --------------------------------------------------------------------------------------------------
def _fleet(request: Request[Any, Any, Any]) -> Fleet:
    return request.app.state.fleet  # type: ignore[no-any-return]


def _context(request: Request[Any, Any, Any], **values: Any) -> dict[str, Any]:
    user: TokenInfo | None = request.scope.get("user")
    return {"user": user, "can_operate": user is not None and user.role.allows(Role.OPERATOR), **values}


def _row_id(text: str, what: str) -> int:
    """A path's row id: 400 when it is not a number, 404 when no row can have it."""
    if not text.isascii() or not text.isdigit():
        raise HTTPException(status_code=400, detail=f"not a {what} id: {text[:64]!r} (ids are numbers)")
    if len(text) > 10 or not 1 <= int(text) <= ROW_ID_MAX:
        raise HTTPException(status_code=404, detail=f"no {what} {text[:64]}")
    return int(text)


def _name(text: str, what: str) -> str:
    if not _NAME.match(text):
        raise HTTPException(status_code=400, detail=f"not a {what} name: {text[:64]!r}")
    return text


def _finished_rounds(request: Request[Any, Any, Any]) -> q.FinishedRounds:
    """This app's cache of finished rounds' counts (made on first use; a finished round never changes)."""
    state = request.app.state
    with _STATE_LOCK:
        cache = getattr(state, "console_finished_rounds", None)
        if cache is None:
            cache = q.FinishedRounds()
            state.console_finished_rounds = cache
    return cache


@contextmanager
def _service_errors() -> Iterator[None]:
    """A service's refusal (not found, conflict, invalid) becomes the console's error page with its status."""
    try:
        yield
    except ControlPlaneError as exc:
        raise HTTPException(status_code=exc.status_code, detail=str(exc)) from None


# -- rounds and schedules -------------------------------------------------------------------------------------
def _task_names() -> list[str]:
    from federated.tasks import TaskRegistry

    try:
        return TaskRegistry.from_env().names()
    except Exception:  # noqa: BLE001 - a broken registry entry only costs the suggestions; the service says why
        return []


def _rounds_page(request: Request[Any, Any, Any], offset: int, *, form: dict[str, Any] | None = None,
                 error: str | None = None, status_code: int = 200) -> Template:
    fleet = _fleet(request)
    page = q.rounds_page(fleet.engine, offset, finished=_finished_rounds(request))
    schedules = fleet.schedules.list_all()
    defaults = msgspec.to_builtins(RoundCreate())
    shown = {k: defaults.get(k) for k in _ROUND_FIELDS} | {"build": defaults["build"], "deploy": defaults["deploy"]}
    if form is not None:
        shown |= {k: form.get(k, "") for k in _ROUND_FIELDS} | {"build": "build" in form, "deploy": "deploy" in form}
    return Template(template_name="rounds.html", status_code=status_code, context=_context(
        request, page=page, schedules=schedules, form=shown, error=error, strategies=[s.value for s in Strategy],
        tasks=_task_names()))


@get("/rounds", guards=[_VIEW], sync_to_thread=True)
def rounds_list(request: Request[Any, Any, Any], offset: Offset = 0) -> Template:
    return _rounds_page(request, offset)


def round_create_from_form(form: dict[str, Any]) -> RoundCreate:
    """The start-a-round form as the API's RoundCreate: the same schema, the same bounds (InvalidInput if not)."""
    fields: dict[str, Any] = {}
    for key in _ROUND_FIELDS:
        value = form.get(key)
        if isinstance(value, list):
            raise InvalidInput(f"{key}: given more than once")
        text = "" if value is None else str(value).strip()
        if text:
            fields[key] = text
    fields["build"] = "build" in form
    fields["deploy"] = "deploy" in form
    try:
        return msgspec.convert(fields, RoundCreate, strict=False)
    except msgspec.ValidationError as exc:
        raise InvalidInput(str(exc).replace("$.", "")) from None


@post("/rounds", guards=[_OPERATE], sync_to_thread=True, status_code=303)
def round_start(request: Request[Any, Any, Any], data: Form) -> Template | Redirect:
    """Start a round now, through RoundService.start as POST /api/v1/rounds does."""
    try:
        created = _fleet(request).rounds.start(round_create_from_form(data))
    except InvalidInput as exc:
        return _rounds_page(request, 0, form=data, error=str(exc), status_code=400)
    return Redirect(f"{PREFIX}/rounds/{created.id}", status_code=303)


def _skipped_by_reason(skipped: dict[str, str]) -> list[tuple[str, int, list[str]]]:
    """(reason, how many, a few of them), the most common reason first: one line per reason, not per device."""
    groups: dict[str, list[str]] = {}
    for device_id, reason in skipped.items():
        groups.setdefault(reason, []).append(device_id)
    return [(reason, len(ids), sorted(ids)[:_SHOWN_PER_REASON])
            for reason, ids in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))]


def _chart(metrics: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """uPlot's columns: x = Flower round, then accuracy and loss (None where a round has none)."""
    rows = sorted((m for m in metrics if isinstance(m.get("round"), int)), key=lambda m: int(m["round"]))

    def number(value: Any) -> float | None:
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

    return {"round": [int(m["round"]) for m in rows], "accuracy": [number(m.get("accuracy")) for m in rows],
            "loss": [number(m.get("loss")) for m in rows]}


@get("/rounds/{round_id:str}", guards=[_VIEW], sync_to_thread=True)
def round_detail(request: Request[Any, Any, Any], round_id: PathText) -> Template:
    fleet = _fleet(request)
    with _service_errors():
        record: RoundRead = fleet.rounds.get(_row_id(round_id, "round"))
    return Template(template_name="round.html", context=_context(
        request, round=record, chart=_chart(record.metrics),
        per_round=sorted((m for m in record.metrics if isinstance(m.get("round"), int)), key=lambda m: m["round"]),
        invited=record.invited[:_SHOWN_IDS], participants=record.participants[:_SHOWN_IDS],
        skipped=_skipped_by_reason(record.skipped), dropped=list(record.dropped.items())[:_SHOWN_IDS],
        shown=_SHOWN_IDS))


@get("/rounds/{round_id:str}/live", guards=[_VIEW], sync_to_thread=True)
def round_live(request: Request[Any, Any, Any], round_id: PathText) -> Template:
    """The part of a round's page that changes while it runs (htmx polls it); once the round has finished, htmx
    is asked to reload the whole page (HX-Refresh), which then has its curve and lists."""
    with _service_errors():
        record = _fleet(request).rounds.get(_row_id(round_id, "round"))
    headers = {"HX-Refresh": "true"} if record.status.finished else None
    return Template(template_name="_ops_round_live.html", headers=headers, context=_context(request, round=record))


# -- models ---------------------------------------------------------------------------------------------------
@get("/models", guards=[_VIEW], sync_to_thread=True)
def models_list(request: Request[Any, Any, Any], offset: Offset = 0) -> Template:
    return Template(template_name="models.html",
                    context=_context(request, page=q.models_page(_fleet(request).engine, offset)))


@get("/models/{version:str}", guards=[_VIEW], sync_to_thread=True)
def model_detail(request: Request[Any, Any, Any], version: PathText) -> Template | Redirect:
    """A model version by its name, or by its release number (redirected to its name)."""
    fleet = _fleet(request)
    try:
        model = fleet.models.get(_name(version, "model version"))
    except ControlPlaneError as exc:
        named = q.version_of_release(fleet.engine, int(version)) if version.isdigit() and len(version) <= 10 else None
        if named is not None:
            return Redirect(f"{PREFIX}/models/{named}", status_code=303)
        raise HTTPException(status_code=exc.status_code, detail=str(exc)) from None
    lineage: dict[str, Any] = {"round_id": None, "job": None, "initial_model": None}
    if model.source_id.isdigit() and len(model.source_id) <= 10 and int(model.source_id) <= ROW_ID_MAX:
        source = int(model.source_id)
        if model.source_kind == "round":
            lineage["round_id"] = source
            lineage["initial_model"] = q.round_initial_model(fleet.engine, source)
        elif model.source_kind == "burst":
            try:
                job = fleet.jobs.get(source)
            except ControlPlaneError:
                job = None
            lineage["job"] = job
            if job is not None and job.round_id is not None:
                lineage["initial_model"] = q.round_initial_model(fleet.engine, job.round_id)
    metrics = {k: v for k, v in model.metrics.items() if isinstance(v, str | int | float | bool) or v is None}
    return Template(template_name="model.html", context=_context(
        request, model=model, lineage=lineage, metrics=metrics,
        deployments=q.deployments_of_model(fleet.engine, model.version)))


# -- deployments ----------------------------------------------------------------------------------------------
@get("/deployments", guards=[_VIEW], sync_to_thread=True)
def deployments_list(request: Request[Any, Any, Any], offset: Offset = 0) -> Template:
    return Template(template_name="deployments.html",
                    context=_context(request, page=q.deployments_page(_fleet(request).engine, offset)))


def _deployment_context(request: Request[Any, Any, Any], deployment_id: str, offset: int,
                        status: TargetStatus | None, **extra: Any) -> dict[str, Any]:
    engine = _fleet(request).engine
    number = _row_id(deployment_id, "deployment")
    detail = q.deployment_detail(engine, number)
    if detail is None:
        raise HTTPException(status_code=404, detail=f"no deployment {number}")
    targets = q.target_page(engine, number, offset, status)
    return _context(request, detail=detail, d=detail.deployment, targets=targets, status_filter=status,
                    statuses=[s.value for s in TargetStatus], actions=_actions(detail.deployment), **extra)


def _actions(deployment: q.DeploymentRow) -> list[str]:
    """What an operator may do to it now (the service refuses the rest with 409)."""
    if deployment.status == DeploymentStatus.RUNNING:
        return ["pause", "cancel"]
    if deployment.status == DeploymentStatus.PAUSED:
        return ["resume", "cancel"]
    return []


@get("/deployments/{deployment_id:str}", guards=[_VIEW], sync_to_thread=True)
def deployment_detail(request: Request[Any, Any, Any], deployment_id: PathText, offset: Offset = 0,
                      status: TargetFilter = None) -> Template:
    return Template(template_name="deployment.html",
                    context=_deployment_context(request, deployment_id, offset, status))


@get("/deployments/{deployment_id:str}/live", guards=[_VIEW], sync_to_thread=True)
def deployment_live(request: Request[Any, Any, Any], deployment_id: PathText, offset: Offset = 0,
                    status: TargetFilter = None) -> Template:
    """The part of a deployment's page that changes (htmx polls it while the deployment is active)."""
    return Template(template_name="_ops_deployment_live.html",
                    context=_deployment_context(request, deployment_id, offset, status))


@post("/deployments/{deployment_id:str}/{action:str}", guards=[_OPERATE], sync_to_thread=True, status_code=303)
def deployment_action(request: Request[Any, Any, Any], deployment_id: PathText, action: PathText) -> Template | Redirect:
    """Pause, resume or cancel, through the DeploymentService methods the API calls."""
    if action not in _DEPLOYMENT_ACTIONS:
        raise HTTPException(status_code=404, detail=f"no deployment action {action[:32]!r}")
    number = _row_id(deployment_id, "deployment")
    service = _fleet(request).deployments
    try:
        getattr(service, action)(number)
    except ControlPlaneError as exc:
        if exc.status_code == 404:
            raise HTTPException(status_code=404, detail=str(exc)) from None
        return Template(template_name="deployment.html", status_code=exc.status_code,
                        context=_deployment_context(request, deployment_id, 0, None, error=str(exc)))
    return Redirect(f"{PREFIX}/deployments/{number}", status_code=303)


# -- jobs -----------------------------------------------------------------------------------------------------
@get("/jobs", guards=[_VIEW], sync_to_thread=True)
def jobs_list(request: Request[Any, Any, Any], offset: Offset = 0) -> Template:
    return Template(template_name="jobs.html", context=_context(request, page=q.jobs_page(_fleet(request).engine,
                                                                                           offset)))


def _job_context(request: Request[Any, Any, Any], job_id: str, **extra: Any) -> dict[str, Any]:
    with _service_errors():
        job = _fleet(request).jobs.get(_row_id(job_id, "job"))
    lines = job.logs_tail.splitlines()
    return _context(request, job=job, live=not JobStatus(job.status).finished, logs="\n".join(lines[-_LOG_LINES:]),
                    log_lines=min(len(lines), _LOG_LINES), **extra)


@get("/jobs/{job_id:str}", guards=[_VIEW], sync_to_thread=True)
def job_detail(request: Request[Any, Any, Any], job_id: PathText) -> Template:
    return Template(template_name="job.html", context=_job_context(request, job_id))


@get("/jobs/{job_id:str}/live", guards=[_VIEW], sync_to_thread=True)
def job_live(request: Request[Any, Any, Any], job_id: PathText) -> Template:
    return Template(template_name="_ops_job_live.html", context=_job_context(request, job_id))


@post("/jobs/{job_id:str}/cancel", guards=[_OPERATE], sync_to_thread=True, status_code=303)
def job_cancel(request: Request[Any, Any, Any], job_id: PathText) -> Template | Redirect:
    number = _row_id(job_id, "job")
    try:
        _fleet(request).jobs.cancel(number)
    except ControlPlaneError as exc:
        if exc.status_code == 404:
            raise HTTPException(status_code=404, detail=str(exc)) from None
        return Template(template_name="job.html", status_code=exc.status_code,
                        context=_job_context(request, job_id, error=str(exc)))
    return Redirect(f"{PREFIX}/jobs/{number}", status_code=303)


HANDLERS: Final[list[Any]] = [rounds_list, round_start, round_detail, round_live, models_list, model_detail,
                              deployments_list, deployment_detail, deployment_live, deployment_action, jobs_list,
                              job_detail, job_live, job_cancel]
