"""How the API turns errors into HTTP answers and log lines — the one place that does (wired in the app factory).

Every error answer is ``{"status_code", "detail"}`` (plus ``extra``: the fields that failed validation):

====================================================  =====  ==========================================
raised                                                status logged
====================================================  =====  ==========================================
Litestar's own (validation 400, 401, 403, 404, 405,    4xx    one ``api.client_error`` line (info), no
413 body too large), our ``InvalidInput``/``NotFound``/       traceback: the client's mistake, not ours
``Conflict``, a JSON body nested too deeply, a value
the database refuses (``DataError``)
``BrokerUnavailable``/``BrokerAuthError``,             503    ``api.server_error`` (error) with the
``DatabaseError``/``OperationalError``                        traceback
anything else                                          500    ``api.server_error`` with the traceback
====================================================  =====  ==========================================

Bodies of the operations that take one are limited before they are decoded:
:data:`~controlplane._bounds.MAX_BODY_BYTES` (413 beyond) and :data:`~controlplane._bounds.MAX_JSON_DEPTH` levels
of nesting (400 beyond; the JSON decoder would otherwise recurse until Python's recursion limit, a 500), then
decoded strictly as their JSON types say (400 for ``0`` given for a boolean or ``"3"`` for an integer, which
Litestar's lenient conversion let through). An operation without a body never reads one. The OpenAPI document lists these answers per operation
(controlplane._openapi), with :class:`ErrorBody` as their schema.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Final

import msgspec
import structlog
from litestar import Request, Response
from litestar.exceptions import ClientException, HTTPException, ValidationException
from sqlalchemy.exc import DataError, OperationalError

from controlplane._bounds import MAX_JSON_DEPTH
from controlplane._errors import ControlPlaneError
from controlplane.broker import BrokerAuthError

__all__ = ["ErrorBody", "exception_handlers", "json_depth", "limit_json_nesting"]

log = structlog.get_logger("edgefleet.api")

_SHOWN: Final = 200  # characters of a path or a detail that make it into a log line
# A JSON string, possessive so that a long string is one linear scan.
_JSON_STRING: Final = re.compile(rb'"(?:[^"\\]++|\\.)*+"')
_BRACKET: Final = re.compile(rb"[\[\]{}]")
_OPEN: Final = frozenset(b"[{")
_BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH", "DELETE"})

Handler = Callable[[Request[Any, Any, Any], Any], Response[dict[str, Any]]]


class ErrorBody(msgspec.Struct):
    """Every error answer of the API."""

    status_code: int
    detail: str
    # Validation errors: one {"message", "key", "source"} per field that failed.
    extra: list[dict[str, Any]] | dict[str, Any] | msgspec.UnsetType = msgspec.UNSET


def json_depth(body: bytes, stop_at: int | None = None) -> int:
    """How deeply ``body``'s arrays and objects nest (brackets inside strings do not count); the scan stops once
    ``stop_at`` is exceeded."""
    depth = deepest = 0
    for match in _BRACKET.finditer(_JSON_STRING.sub(b"", body)):
        if match.group()[0] in _OPEN:
            depth += 1
            if depth > deepest:
                deepest = depth
                if stop_at is not None and deepest > stop_at:
                    break
        else:
            depth -= 1
    return deepest


async def limit_json_nesting(request: Request[Any, Any, Any]) -> None:
    """``before_request``: refuse a body nested deeper than MAX_JSON_DEPTH before anything decodes it (reading the
    body enforces the app's ``request_max_body_size``: 413), then one whose values have the wrong JSON types.
    Operations that take no body are left alone: they never read it, so it can be neither too large nor too deep
    for them."""
    parameters = request.route_handler.parsed_fn_signature.parameters
    if request.method not in _BODY_METHODS or "data" not in parameters:
        return
    body = await request.body()
    if body and json_depth(body, stop_at=MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise ClientException(f"the request body is nested deeper than {MAX_JSON_DEPTH} levels")
    if body:
        _refuse_coercions(request, body, parameters["data"].annotation)


_AT: Final = re.compile(r"^(?P<message>.*?)(?: - at `\$(?:\.(?P<key>.*))?`)?$", re.DOTALL)


def _refuse_coercions(request: Request[Any, Any, Any], body: bytes, body_type: Any) -> None:
    """Decode the body as its JSON types say (msgspec's strict mode), as the OpenAPI document describes it.

    Litestar converts request data leniently, which query strings need (``"5"`` is an integer there) but which
    made a body's ``"deploy": 0`` a ``false`` and ``"rounds": "3"`` a 3: values the document says are invalid.
    Malformed JSON is left to Litestar's own answer."""
    try:
        msgspec.json.decode(body, type=body_type, strict=True)
    except msgspec.ValidationError as exc:
        match = _AT.match(str(exc))
        message, key = (match["message"], match["key"] or "data") if match else (str(exc), "data")
        raise ValidationException(f"Validation failed for {request.method} {request.url.path}",
                                  extra=[{"message": message, "key": key, "source": "body"}]) from None
    except msgspec.DecodeError:
        return


def _short(text: str) -> str:
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "..."


def _answer(request: Request[Any, Any, Any], status: int, detail: str, exc: Exception, *,
            extra: Any = None, headers: dict[str, str] | None = None) -> Response[dict[str, Any]]:
    fields: dict[str, Any] = {"status": status, "method": request.method, "path": _short(request.url.path),
                              "detail": _short(detail)}
    if status >= 500:
        log.error("api.server_error", **fields, exc_info=exc)
    else:
        if isinstance(extra, list):
            fields["fields"] = sorted({str(e.get("key", "")) for e in extra if isinstance(e, dict)})
        log.info("api.client_error", **fields)
    body: dict[str, Any] = {"status_code": status, "detail": detail}
    if extra:
        body["extra"] = extra
    return Response(body, status_code=status, headers=headers)


def _http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[dict[str, Any]]:
    """Litestar's own: validation (400 with ``extra``), 401, 403, route 404/405, 413, ..."""
    return _answer(request, exc.status_code, exc.detail, exc, extra=exc.extra, headers=exc.headers)


def _control_plane_error(request: Request[Any, Any, Any], exc: ControlPlaneError) -> Response[dict[str, Any]]:
    return _answer(request, exc.status_code, str(exc), exc)


def _broker_auth_error(request: Request[Any, Any, Any], exc: BrokerAuthError) -> Response[dict[str, Any]]:
    return _answer(request, 503, f"broker: {exc}", exc)


def _database_unavailable(request: Request[Any, Any, Any], exc: OperationalError) -> Response[dict[str, Any]]:
    return _answer(request, 503, f"database unavailable: {str(exc.orig).splitlines()[0] if exc.orig else exc}", exc)


def _database_refused(request: Request[Any, Any, Any], exc: DataError) -> Response[dict[str, Any]]:
    """A value the schemas let through but the database refuses (its type's range, a NUL in text on PostgreSQL):
    the input's fault, so a 400 with the database's reason."""
    reason = str(exc.orig).splitlines()[0] if exc.orig else type(exc).__name__
    return _answer(request, 400, f"the database refused a value: {_short(reason)}", exc)


def _server_fault(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    return _answer(request, 500, "Internal Server Error", exc)


def exception_handlers() -> dict[type[Exception], Handler]:
    """The app's ``exception_handlers``: the most specific class of the exception (its MRO) picks the answer."""
    return {
        HTTPException: _http_error,
        ControlPlaneError: _control_plane_error,
        BrokerAuthError: _broker_auth_error,
        OperationalError: _database_unavailable,
        DataError: _database_refused,
        Exception: _server_fault,
    }
